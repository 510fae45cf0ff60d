"""Fuzz the TUF metadata path through the agent's TrustedClient (agent.trust.client) with an in-memory fetcher.

Input: up to five parts separated by SEPARATOR, what an attacker holding the broker serves: `2.root.json` (a root
rotation), `timestamp.json`, `<v>.snapshot.json`, `<v>.targets.json` (any version asked for) and the bytes of any
target; an empty part is a 404. The device trusts tests/fuzz/tuf_fixture/root.json (a throwaway repository's,
written by make_corpus.py with the seeds: genuine metadata signed by it). Each input starts from a fresh device
(only the provisioned root): refresh, look up the bundle and the deployment document, read the bundle's chunk plan
and download it.

Invariants: only our typed errors (agent.errors.EdgeshipError: BundleRejected, TransportError) come out, anything
else is a crash; every metadata file the device then trusts on disk is one the repository really signed (its
`signed` part is, canonically, one of tuf_fixture/genuine.json's: the fuzzer cannot sign, so the trusted root stays
version 1 and timestamp, snapshot and targets are genuine ones); a downloaded target has its signed length and
sha256.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from tuf.api.exceptions import DownloadHTTPError, RepositoryError
from tuf.api.metadata import Metadata
from tuf.ngclient import FetcherInterface

from agent.errors import EdgeshipError
from agent.trust.chunks import ChunkPlan
from agent.trust.client import TrustedClient
from tests.fuzz.common import check, scratch

SEPARATOR = b"\x00PART\x00"
FIXTURE = Path(__file__).parent / "tuf_fixture"
META = "mqtt:///tuf/"
TARGETS = "mqtt:///targets/"
BUNDLE = "bundles/digits-3.bundle"
DEPLOYMENT = "deployments/lab.json"
_DIR = scratch("tuf")


def canonical_signed_digest(data: bytes) -> str:
    """The sha256 of what a metadata file's signatures cover: its `signed` part as python-tuf re-encodes it
    (canonical JSON of the parsed fields). Not the raw bytes: spellings that parse the same ("...Z" or "...z" in
    `expires`, whitespace, key order) carry the same valid signature, and the device keeps the bytes it received."""
    return hashlib.sha256(Metadata.from_bytes(data).signed_bytes).hexdigest()


class StoreFetcher(FetcherInterface):
    """The untrusted broker: serves the input's parts by file name; a `ChunkFetcher` with no chunk store."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts + [b""] * (5 - len(parts))

    def expect(self, sha256: str, length: int, chunk_size: int, chunk_hashes: Sequence[str]) -> ChunkPlan:
        return ChunkPlan.create(sha256, length, chunk_size, chunk_hashes)

    def discard(self, sha256: str) -> None:
        pass

    @contextlib.contextmanager
    def open_complete(self, url: str, max_length: int) -> Iterator[IO[bytes] | None]:
        yield None

    def _fetch(self, url: str) -> Iterator[bytes]:
        data = self._lookup(url)
        if not data:
            raise DownloadHTTPError(f"{url} not found", 404)
        return iter([data[i:i + 4096] for i in range(0, len(data), 4096)])

    def _lookup(self, url: str) -> bytes:
        if url.startswith(TARGETS):
            return self.parts[4]
        name = url.rpartition("/")[2]
        if name == "2.root.json":
            return self.parts[0]
        if name == "timestamp.json":
            return self.parts[1]
        if name.endswith(".snapshot.json"):
            return self.parts[2]
        if name.endswith(".targets.json"):
            return self.parts[3]
        return b""


@functools.cache
def fixture() -> tuple[bytes, dict[str, frozenset[str]]]:
    """The provisioned root and, per role, the canonical digests of everything the repository signed."""
    root = (FIXTURE / "root.json").read_bytes()
    doc = json.loads((FIXTURE / "genuine.json").read_text())
    return root, {role: frozenset(v) for role, v in doc.items()}


def check_trusted(metadata_dir: Path) -> None:
    genuine = fixture()[1]
    for name in ("root.json", "timestamp.json", "snapshot.json", "targets.json"):
        path = metadata_dir / name
        if not path.exists():
            check(name != "root.json", "the device lost its trusted root")
            continue
        data = path.read_bytes()
        try:
            digest = canonical_signed_digest(data)
        except RepositoryError as e:  # DeserializationError
            raise AssertionError(f"trusted {name} does not parse: {e}") from e
        check(digest in genuine[name.split(".")[0]], f"the device trusts a {name} the repository never signed")


def test_one_input(data: bytes) -> None:
    parts = data.split(SEPARATOR)[:5]
    metadata_dir = _DIR / "tuf"
    downloads = _DIR / "targets"
    for d in (metadata_dir, downloads):
        if d.exists():
            shutil.rmtree(d)
    client = TrustedClient(metadata_dir, fixture()[0], StoreFetcher(parts), META, TARGETS, max_target_bytes=1 << 20)
    try:
        client.refresh()
        client.target_info(DEPLOYMENT)
        tf = client.target_info(BUNDLE)
        if tf is not None:
            client.chunk_plan(tf)
            path = client.download(tf, downloads)
            got = path.read_bytes()
            check(len(got) == tf.length and hashlib.sha256(got).hexdigest() == tf.hashes["sha256"],
                  "a downloaded target is not what was signed")
    except EdgeshipError:
        pass
    finally:
        check_trusted(metadata_dir)
    check(client.trusted_root_version() == 1, "the trusted root changed version")


def main() -> None:
    from tests.fuzz.runner import fuzz

    fuzz("tuf", sys.argv)


if __name__ == "__main__":
    main()
