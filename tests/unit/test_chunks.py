"""The signed chunk plan of a target (agent.trust.chunks): validation, chunk lengths, per-chunk checks, and the one
definition of chunk hashes that the packager signs with."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest

from agent.errors import BundleRejected
from agent.trust.chunks import MAX_CHUNK_SIZE, ChunkPlan, chunk_hashes
from packager import tuf_repo

SHA = "a" * 64


def _plan(data: bytes, chunk_size: int = 1000, path: str = "") -> ChunkPlan:
    return ChunkPlan.create(hashlib.sha256(data).hexdigest(), len(data), chunk_size, chunk_hashes(data, chunk_size),
                            path=path)


def test_chunk_hashes() -> None:
    data = os.urandom(2500)
    assert chunk_hashes(data, 1000) == [hashlib.sha256(data[i:i + 1000]).hexdigest() for i in (0, 1000, 2000)]
    assert chunk_hashes(data[:2000], 1000) == chunk_hashes(data, 1000)[:2]
    assert chunk_hashes(b"", 1000) == []
    with pytest.raises(ValueError):
        chunk_hashes(data, 0)


def test_chunk_hashes_of_a_file_in_one_pass() -> None:
    data = os.urandom(2500)
    f = io.BytesIO(data)
    seen: list[bytes] = []
    assert chunk_hashes(f, 1000, each=seen.append) == chunk_hashes(data, 1000)
    assert seen == [data[:1000], data[1000:2000], data[2000:]]
    assert chunk_hashes(io.BytesIO(b""), 1000, each=seen.append) == [] and len(seen) == 3


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 2500])
def test_the_packager_signs_the_agents_chunk_hashes(tmp_path: Path, size: int) -> None:
    # one definition: what the agent checks each chunk against is what the packager signs
    assert getattr(tuf_repo, "chunk_hashes", chunk_hashes) is chunk_hashes
    repo, data = tmp_path / "repo", os.urandom(size)
    tuf_repo.init_repo(repo)
    (tmp_path / "x.bundle").write_bytes(data)
    tf = tuf_repo.add_target(repo, "bundles/x.bundle", tmp_path / "x.bundle", {"name": "x"}, chunk_size=1000)
    assert tf.custom == {"name": "x", "chunk_size": 1000, "chunks": chunk_hashes(data, 1000)}
    assert tf.length == size and tf.hashes["sha256"] == hashlib.sha256(data).hexdigest()
    assert tuf_repo.target_file_path(repo, tf).read_bytes() == data


def test_plan_checks_each_chunk() -> None:
    data = os.urandom(2500)
    plan = _plan(data)
    assert (plan.count, plan.length, plan.chunk_size) == (3, 2500, 1000)
    assert [plan.chunk_length(i) for i in range(3)] == [1000, 1000, 500]
    for i in range(3):
        plan.check_chunk(i, data[i * 1000:(i + 1) * 1000])
    for index, piece, reason in [(1, data[:1000], "hash_mismatch"), (2, data[2000:] + b"x", "too_large"),
                                 (2, data[2000:-1], "chunk_mismatch"), (3, b"", "chunk_mismatch"),
                                 (-1, data[2000:], "chunk_mismatch")]:
        with pytest.raises(BundleRejected) as info:
            plan.check_chunk(index, piece)
        assert info.value.reason == reason
    with pytest.raises(BundleRejected) as info:
        plan.chunk_length(3)
    assert info.value.reason == "chunk_mismatch"


def test_empty_target_has_no_chunks() -> None:
    plan = _plan(b"")
    assert plan.count == 0 and plan.chunk_hashes == ()
    with pytest.raises(BundleRejected):
        plan.chunk_length(0)


def test_path_names_the_target_but_is_not_compared() -> None:
    data = os.urandom(1500)
    named, anonymous = _plan(data, path="bundles/x-1.bundle"), _plan(data)
    assert named == anonymous and named.path == "bundles/x-1.bundle" and anonymous.path == ""
    with pytest.raises(BundleRejected, match=r"^bundles/x-1\.bundle: chunk 0"):
        named.check_chunk(0, b"x")
    with pytest.raises(BundleRejected, match=rf"^target {named.sha256[:12]}: chunk 0"):
        anonymous.check_chunk(0, b"x")
    with pytest.raises(BundleRejected, match=r"^bundles/x-1\.bundle: invalid chunk plan"):
        ChunkPlan.create(SHA, 1500, 1000, [], path="bundles/x-1.bundle")


def test_chunk_size_bounds() -> None:
    assert ChunkPlan.create(SHA, MAX_CHUNK_SIZE, MAX_CHUNK_SIZE, [SHA]).count == 1
    assert MAX_CHUNK_SIZE == 128 * 1024  # docs/transport.md
    with pytest.raises(BundleRejected) as info:
        ChunkPlan.create(SHA, 2000, 1000, [SHA, SHA], max_chunk_size=999)  # a fetcher's own tighter bound
    assert info.value.reason == "bad_chunk_plan"


@pytest.mark.parametrize(("sha256", "length", "chunk_size", "chunks"), [
    ("A" * 64, 2500, 1000, [SHA] * 3),
    ("a" * 63, 2500, 1000, [SHA] * 3),
    (SHA + "\n", 2500, 1000, [SHA] * 3),
    (None, 2500, 1000, [SHA] * 3),
    (SHA, -1, 1000, []),
    (SHA, True, 1000, [SHA]),
    (SHA, "2500", 1000, [SHA] * 3),
    (SHA, 2500, 0, [SHA] * 3),
    (SHA, 2500, -1000, [SHA] * 3),
    (SHA, 2500, True, [SHA] * 3),
    (SHA, 2500, "1000", [SHA] * 3),
    (SHA, 2500, MAX_CHUNK_SIZE + 1, [SHA]),
    (SHA, 2500, 1000, None),
    (SHA, 2500, 1000, SHA),
    (SHA, 2500, 1000, [SHA]),  # 2500 bytes need 3 chunks
    (SHA, 2500, 1000, [SHA] * 4),
    (SHA, 2500, 1000, ["A" * 64] * 3),
    (SHA, 2500, 1000, [SHA, SHA, SHA + "\n"]),
    (SHA, 2500, 1000, [SHA, SHA, 7]),
])
def test_bad_plans_are_rejected(sha256: Any, length: Any, chunk_size: Any, chunks: Any) -> None:
    with pytest.raises(BundleRejected) as info:
        ChunkPlan.create(sha256, length, chunk_size, chunks)
    assert info.value.reason == "bad_chunk_plan"
