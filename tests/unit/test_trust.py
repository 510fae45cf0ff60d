"""The agent's TUF client against a real packager repository served by an untrusted in-memory store.

One test per threat: each checks the rejection reason and that the device's trusted metadata is unchanged
(only python-tuf's own verified writes may touch it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.api.metadata import Metadata, Root, TargetFile, Timestamp
from tuf.ngclient import FetcherInterface

from agent.errors import BundleRejected, TransportError
from agent.trust.chunks import ChunkPlan
from agent.trust.client import TrustedClient, chunk_plan, target_url
from agent.trust.fetcher import ChunkFetcher
from agent.trust.http_fetcher import HttpFetcher
from packager import keystore, tuf_repo

META = "mqtt:///tuf/"
TARGETS = "mqtt:///targets/"
BUNDLE = "bundles/digits-1.bundle"
DEPLOYMENT = "deployments/lab.json"


class StoreFetcher(FetcherInterface):
    """An untrusted store (think: retained messages on a broker): URL -> bytes, freely editable by the attacker.
    A `ChunkFetcher`: `complete` holds whole files it hands over by `open_complete` (as MqttFetcher does)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.endless: set[str] = set()
        self.requests: list[str] = []
        self.complete: dict[str, bytes] = {}
        self.discarded: list[str] = []

    def expect(self, sha256: str, length: int, chunk_size: int, chunk_hashes: Sequence[str]) -> ChunkPlan:
        return ChunkPlan.create(sha256, length, chunk_size, chunk_hashes)

    def discard(self, sha256: str) -> None:
        self.discarded.append(sha256)

    @contextlib.contextmanager
    def open_complete(self, url: str, max_length: int) -> Iterator[IO[bytes] | None]:
        data = self.complete.get(url)
        yield None if data is None else io.BytesIO(data)

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requests.append(url)
        if url in self.endless:
            return _forever()
        data = self.files.get(url)
        if data is None:
            raise DownloadHTTPError(f"{url} not found", 404)
        return iter([data[i:i + 65536] for i in range(0, len(data), 65536)])


def _forever() -> Iterator[bytes]:
    while True:
        yield b"\0" * 65536


@dataclass
class World:
    tmp: Path
    repo: Path
    fetcher: StoreFetcher

    @property
    def root_key_dir(self) -> Path:
        return self.tmp / "repo-root-keys"

    @property
    def device_dir(self) -> Path:
        return self.tmp / "device" / "tuf"

    def publish(self) -> None:
        """What `packager publish` does: every current metadata file and target into the store."""
        for name, data in tuf_repo.current_metadata(self.repo).items():
            self.fetcher.files[META + name] = data
        for tf in tuf_repo.referenced_targets(self.repo).values():
            self.fetcher.files[target_url(TARGETS, tf)] = tuf_repo.target_file_path(self.repo, tf).read_bytes()

    def client(self, **kw: Any) -> TrustedClient:
        # A new client per call = the agent's next check cycle (or a restart) over the same state directory.
        provisioned = (self.tmp / "provisioned-root.json")
        return TrustedClient(self.device_dir, provisioned, self.fetcher, META, TARGETS, **kw)

    def trusted(self) -> dict[str, bytes | str]:
        """Every file in the device's trusted metadata directory (symlinks by target too)."""
        out: dict[str, bytes | str] = {}
        for p in sorted(self.device_dir.rglob("*")):
            rel = str(p.relative_to(self.device_dir))
            if p.is_symlink():
                out[rel + " ->"] = os.readlink(p)
            if p.is_file():
                out[rel] = p.read_bytes()
        return out

    def bundle_url(self) -> str:
        return target_url(TARGETS, tuf_repo.referenced_targets(self.repo)[BUNDLE])

    def root_signers(self) -> list[CryptoSigner]:
        return [CryptoSigner(keystore.load_private_key(p, "root")) for p in self.root_key_dir.glob("*.pem")]


@pytest.fixture
def world(tmp_path: Path) -> World:
    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    (tmp_path / "provisioned-root.json").write_bytes(tuf_repo.provisioning_root(repo).read_bytes())
    bundle = tmp_path / "digits-1.bundle"
    bundle.write_bytes(os.urandom(300_000))
    doc = tmp_path / "lab.json"
    doc.write_bytes(b'{"group": "lab", "bundle": "bundles/digits-1.bundle", "name": "digits", "version": 1}')
    tuf_repo.add_targets(repo, [(BUNDLE, bundle, {"name": "digits", "version": 1}), (DEPLOYMENT, doc, {})])
    w = World(tmp_path, repo, StoreFetcher())
    w.publish()
    return w


def _trusted_client(world: World) -> dict[str, bytes | str]:
    """Bring the device up to date with the genuine repository and return its trusted files."""
    world.client().refresh()
    return world.trusted()


def _rejected(world: World, reason: str, target: str | None = None) -> BundleRejected:
    client = world.client()
    with pytest.raises(BundleRejected) as info:
        client.refresh()
        if target is not None:
            client.download(client.require_target(target), world.tmp / "downloads")
    assert info.value.reason == reason, str(info.value)
    return info.value


# --- the normal path -----------------------------------------------------------------------------------------


def test_refresh_download_and_reuse(world: World) -> None:
    client = world.client()
    client.refresh()
    tf = client.require_target(BUNDLE)
    sha = tf.hashes["sha256"]
    assert client.target_url(tf) == f"mqtt:///targets/bundles/{sha}.digits-1.bundle"  # docs/transport.md
    assert client.target_info("bundles/nope.bundle") is None

    dest = world.tmp / "downloads"
    path = client.download(tf, dest)
    data = path.read_bytes()
    assert path == dest / "digits-1.bundle" and hashlib.sha256(data).hexdigest() == sha
    assert sorted(p.name for p in dest.iterdir()) == ["digits-1.bundle"]  # no partial files left

    plan = client.chunk_plan(tf)
    assert (plan.count, plan.chunk_size, plan.length) == (3, 128 * 1024, 300_000)
    for i in range(plan.count):
        plan.check_chunk(i, data[i * plan.chunk_size:(i + 1) * plan.chunk_size])

    fetched = len(world.fetcher.requests)
    assert world.client().download(tf, dest) == path  # the verified copy is reused ...
    # ... only the implicit refresh's root probe and timestamp, no target bytes.
    assert world.fetcher.requests[fetched:] == [META + "2.root.json", META + "timestamp.json"]

    assert set(world.trusted()) == {"root.json ->", "root.json", "root_history/1.root.json", "timestamp.json",
                                    "snapshot.json", "targets.json"}
    assert world.trusted()["root.json"] == (world.tmp / "provisioned-root.json").read_bytes()
    # URLs ngclient built: versioned root probe, plain timestamp, versioned snapshot and targets.
    assert world.fetcher.requests[:4] == [META + "2.root.json", META + "timestamp.json",
                                          META + "2.snapshot.json", META + "2.targets.json"]


def test_unreachable_timestamp_and_missing_target_are_transport_errors(world: World) -> None:
    client = world.client()
    client.refresh()
    del world.fetcher.files[world.bundle_url()]
    with pytest.raises(TransportError, match="status 404"):
        client.download(client.require_target(BUNDLE), world.tmp / "downloads")
    with pytest.raises(BundleRejected) as info:
        client.require_target("bundles/other-9.bundle")
    assert info.value.reason == "not_found"
    del world.fetcher.files[META + "timestamp.json"]
    with pytest.raises(TransportError, match=r"timestamp\.json"):
        world.client().refresh()


# --- one test per threat ---------------------------------------------------------------------------------------


def test_tampered_target_bytes(world: World) -> None:
    before = _trusted_client(world)
    url = world.bundle_url()
    data = bytearray(world.fetcher.files[url])
    data[1000] ^= 0xFF
    world.fetcher.files[url] = bytes(data)
    _rejected(world, "hash_mismatch", BUNDLE)
    assert world.trusted() == before
    assert list((world.tmp / "downloads").iterdir()) == []  # nothing unverified left where the agent looks


def test_swapped_target(world: World) -> None:
    """The store serves another genuine, signed bundle of the same size under this bundle's address."""
    other = world.tmp / "digits-2.bundle"
    other.write_bytes(os.urandom(300_000))
    tuf_repo.add_target(world.repo, "bundles/digits-2.bundle", other, {"name": "digits", "version": 2})
    world.publish()
    before = _trusted_client(world)
    tf2 = tuf_repo.referenced_targets(world.repo)["bundles/digits-2.bundle"]
    world.fetcher.files[target_url(TARGETS, tf2)] = world.fetcher.files[world.bundle_url()]
    _rejected(world, "hash_mismatch", "bundles/digits-2.bundle")
    assert world.trusted() == before


def test_mix_and_match_metadata(world: World) -> None:
    """Newest timestamp combined with a snapshot of another version (served under the expected name)."""
    before = _trusted_client(world)
    old_snapshot = world.fetcher.files[META + "2.snapshot.json"]
    tuf_repo.remove_target(world.repo, DEPLOYMENT)  # the next state: snapshot 3 no longer lists it
    world.publish()
    world.fetcher.files[META + "3.snapshot.json"] = old_snapshot
    _rejected(world, "hash_mismatch")
    after = world.trusted()
    # ngclient stores a timestamp as soon as it verifies, before looking at the snapshot: that genuine, newer
    # timestamp is the only change; the snapshot and targets the device trusts are untouched.
    assert after.pop("timestamp.json") == world.fetcher.files[META + "timestamp.json"]
    before.pop("timestamp.json")
    assert after == before
    client = world.client()
    with pytest.raises(BundleRejected):
        client.target_info(DEPLOYMENT)
    world.publish()  # the genuine snapshot again: the device moves on
    world.client().refresh()


def test_replayed_older_metadata_is_a_rollback(world: World) -> None:
    old_store = dict(world.fetcher.files)
    tuf_repo.remove_target(world.repo, DEPLOYMENT)
    world.publish()
    before = _trusted_client(world)
    world.fetcher.files = old_store  # every file validly signed, just older than what the device trusts
    _rejected(world, "rollback")
    assert world.trusted() == before


def test_expired_timestamp(world: World) -> None:
    before = _trusted_client(world)
    tuf_repo.refresh(world.repo, now=datetime.now(UTC) - timedelta(days=2))  # signed with expires = yesterday
    world.publish()
    _rejected(world, "expired")
    assert world.trusted() == before


def test_endless_target_data(world: World) -> None:
    before = _trusted_client(world)
    world.fetcher.endless.add(world.bundle_url())
    _rejected(world, "too_large", BUNDLE)
    assert world.trusted() == before
    assert list((world.tmp / "downloads").iterdir()) == []


def test_endless_timestamp(world: World) -> None:
    before = _trusted_client(world)
    world.fetcher.endless.add(META + "timestamp.json")
    _rejected(world, "too_large")
    assert world.trusted() == before


@pytest.mark.parametrize("name", ["timestamp.json", "2.root.json"])
def test_oversized_metadata(world: World, name: str) -> None:
    before = _trusted_client(world)
    if name == "2.root.json":
        tuf_repo.rotate_keys(world.repo, "timestamp")
        world.publish()
    # Still validly signed (the padding is outside the signed bytes), just bigger than the device allows.
    world.fetcher.files[META + name] += b" " * 8192
    client = world.client(max_metadata_bytes=8192)
    with pytest.raises(BundleRejected) as info:
        client.refresh()
    assert info.value.reason == "too_large"
    assert world.trusted() == before


def test_target_bigger_than_device_limit_is_not_fetched(world: World) -> None:
    client = world.client(max_target_bytes=100_000)
    client.refresh()
    fetched = len(world.fetcher.requests)
    with pytest.raises(BundleRejected) as info:
        client.download(client.require_target(BUNDLE), world.tmp / "downloads")
    assert info.value.reason == "too_large"
    assert len(world.fetcher.requests) == fetched


def test_signatures_below_threshold(world: World) -> None:
    before = _trusted_client(world)
    tuf_repo.rotate_keys(world.repo, "timestamp")  # root v2, needs 2 of the 3 root keys
    world.publish()
    md = Metadata.from_bytes(world.fetcher.files[META + "2.root.json"])
    first = next(iter(md.signatures))
    md.signatures = {first: md.signatures[first]}
    world.fetcher.files[META + "2.root.json"] = md.to_bytes()
    _rejected(world, "threshold")
    assert world.trusted() == before


def test_signature_by_unknown_key(world: World) -> None:
    before = _trusted_client(world)
    md = Metadata[Timestamp].from_bytes(world.fetcher.files[META + "timestamp.json"])
    md.signed.version += 1
    md.sign(CryptoSigner.generate_ed25519())  # the attacker's own key, replacing the genuine signature
    world.fetcher.files[META + "timestamp.json"] = md.to_bytes()
    _rejected(world, "unknown_key")
    assert world.trusted() == before


def test_valid_root_rotation_is_followed(world: World) -> None:
    _trusted_client(world)
    tuf_repo.rotate_keys(world.repo, "root")
    tuf_repo.rotate_keys(world.repo, "timestamp")  # signed by the new root keys only
    tuf_repo.remove_target(world.repo, DEPLOYMENT)
    world.publish()
    client = world.client()
    client.refresh()
    assert client.trusted_root_version() == 3
    assert client.target_info(DEPLOYMENT) is None
    assert {"root_history/2.root.json", "root_history/3.root.json"} <= set(world.trusted())
    # After a restart the cached newest root is the anchor, not the provisioned v1 root.
    world.fetcher.requests.clear()
    restarted = world.client()
    restarted.refresh()
    assert restarted.trusted_root_version() == 3
    assert world.fetcher.requests[0] == META + "4.root.json"


@pytest.mark.parametrize(("old_signatures", "reason"), [(0, "unknown_key"), (1, "threshold")])
def test_invalid_root_rotation_is_refused(world: World, old_signatures: int, reason: str) -> None:
    before = _trusted_client(world)
    root_md = Metadata[Root].from_bytes(world.fetcher.files[META + "1.root.json"])
    root = root_md.signed
    root.version = 2
    new_keys = [CryptoSigner.generate_ed25519() for _ in range(3)]
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    for s in new_keys:
        root.add_key(s.public_key, "root")
    root_md.signatures.clear()
    for s in [*world.root_signers()[:old_signatures], *new_keys]:
        root_md.sign(s, append=True)
    world.fetcher.files[META + "2.root.json"] = root_md.to_bytes()
    _rejected(world, reason)
    assert world.trusted() == before
    assert world.client().trusted_root_version() == 1


def test_fetcher_verdicts_pass_through(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fetcher that checks chunks itself may reject; other fetcher failures become TransportError."""
    client = world.client()
    client.refresh()
    tf = client.require_target(BUNDLE)

    def rejecting(url: str) -> Iterator[bytes]:
        raise BundleRejected("chunk 1 does not match its signed sha256", reason="hash_mismatch")

    monkeypatch.setattr(world.fetcher, "_fetch", rejecting)
    with pytest.raises(BundleRejected, match="chunk 1") as info:
        client.download(tf, world.tmp / "downloads")
    assert info.value.reason == "hash_mismatch"

    def broken(url: str) -> Iterator[bytes]:
        yield b"x"
        raise ConnectionResetError("broker went away")

    monkeypatch.setattr(world.fetcher, "_fetch", broken)
    with pytest.raises(TransportError, match="broker went away"):
        client.download(tf, world.tmp / "downloads")

    class FetchError(TransportError, DownloadError):  # the shape agent/trust/mqtt_fetcher.py raises
        pass

    def lost(url: str) -> Iterator[bytes]:
        raise FetchError("connection kept dropping")

    monkeypatch.setattr(world.fetcher, "_fetch", lost)
    with pytest.raises(FetchError, match="kept dropping"):
        client.download(tf, world.tmp / "downloads")


# --- the fetcher seam (agent/trust/fetcher.py) ----------------------------------------------------------------


def test_a_fetchers_own_complete_file_is_verified_and_used(world: World) -> None:
    """`open_complete` hands TUF the fetcher's own file (MqttFetcher's partial file): no fetch, still verified."""
    url = world.bundle_url()
    world.fetcher.complete[url] = world.fetcher.files.pop(url)
    client = world.client()
    tf = client.require_target(BUNDLE)
    path = client.download(tf, world.tmp / "downloads")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tf.hashes["sha256"]
    assert url not in world.fetcher.requests

    world.fetcher.complete[url] = b"x" * tf.length  # the right length, the wrong bytes
    with pytest.raises(BundleRejected) as info:
        client.download(tf, world.tmp / "elsewhere")
    assert info.value.reason == "hash_mismatch"
    assert not (world.tmp / "elsewhere" / "digits-1.bundle").exists()


def test_the_http_mirror_path_loads_no_mqtt_code() -> None:
    # the mirror is the fallback when MQTT fails: it must not need paho (nor our MQTT modules) to import
    code = ("import sys, agent.trust.http_fetcher; "
            "print([m for m in sys.modules if m.split('.')[0] == 'paho' or m.startswith(('agent.transport', "
            "'agent.trust.mqtt_fetcher'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_http_fetcher_implements_the_chunk_fetcher_methods(tmp_path: Path) -> None:
    data = os.urandom(2500)
    sha = hashlib.sha256(data).hexdigest()
    http = HttpFetcher(tmp_path / "partial", base_url="http://127.0.0.1:9/")
    fetcher: ChunkFetcher = http
    chunks = [hashlib.sha256(data[i:i + 1000]).hexdigest() for i in (0, 1000, 2000)]
    assert fetcher.expect(sha, len(data), 1000, chunks).count == 3
    with pytest.raises(BundleRejected):
        fetcher.expect(sha, len(data), 1000, chunks[:2])
    with fetcher.open_complete(f"mqtt:///targets/bundles/{sha}.x.bundle", len(data)) as f:
        assert f is None  # a mirror download is streamed: TUF spools its own copy
    http.partial_dir.mkdir()
    http.partial_path(sha).write_bytes(data[:1000])  # an interrupted download
    fetcher.discard(sha)
    assert not http.partial_path(sha).exists() and sha not in http._plans
    fetcher.discard(sha)  # nothing left to discard: fine


# --- chunk plans from signed metadata ------------------------------------------------------------------------


def _tf(length: int, custom: Any) -> TargetFile:
    return TargetFile(length, {"sha256": "a" * 64}, "bundles/x-1.bundle", {"custom": custom})


def test_chunk_plan_reads_the_signed_chunk_list() -> None:
    data = os.urandom(2500)
    chunks = [hashlib.sha256(data[i:i + 1000]).hexdigest() for i in (0, 1000, 2000)]
    plan = chunk_plan(_tf(2500, {"chunk_size": 1000, "chunks": chunks, "name": "x"}))
    assert plan == ChunkPlan("a" * 64, 2500, 1000, tuple(chunks), path="bundles/x-1.bundle")
    assert plan.path == "bundles/x-1.bundle"
    plan.check_chunk(2, data[2000:])  # chunk checks themselves: tests/unit/test_chunks.py
    with pytest.raises(BundleRejected, match=r"bundles/x-1\.bundle: chunk 1") as info:
        plan.check_chunk(1, data[:1000])
    assert info.value.reason == "hash_mismatch"
    assert chunk_plan(_tf(0, {"chunk_size": 1000, "chunks": []})).count == 0


@pytest.mark.parametrize("custom", [
    None,
    {"chunks": []},
    {"chunk_size": True, "chunks": ["a" * 64]},
    {"chunk_size": "1000", "chunks": ["a" * 64]},
    {"chunk_size": 0, "chunks": []},
    {"chunk_size": 128 * 1024 + 1, "chunks": ["a" * 64]},
    {"chunk_size": 1000, "chunks": ["a" * 64]},  # 2500 bytes need 3 chunks
    {"chunk_size": 1000, "chunks": ["a" * 64] * 4},
    {"chunk_size": 1000, "chunks": ["A" * 64] * 3},
    {"chunk_size": 1000, "chunks": "a" * 64},
    {"chunk_size": 1000, "chunks": ["a" * 64, "a" * 64, "a" * 64 + "\n"]},
])
def test_bad_chunk_plans_are_rejected(custom: Any) -> None:
    with pytest.raises(BundleRejected) as info:
        chunk_plan(_tf(2500, custom))
    assert info.value.reason == "bad_chunk_plan"
