"""What every fetcher shares: the `ChunkFetcher` protocol, `FetchError` and the TUF URL parser.

No transport here (no paho, no requests): the HTTP mirror path imports this module, never the MQTT fetcher.
A fetcher is a python-tuf `FetcherInterface` (ngclient calls `fetch` and `download_bytes`) plus three methods of
ours that the trust client and `BundleSource` call:
    expect         register a target's signed chunk plan before it is downloaded (every chunk is checked against it)
    discard        forget a plan and delete what is stored for it (the target was installed, or given up)
    open_complete  for a target, the fetcher's own verified copy of the whole file, so TUF hashes and copies that
                   instead of spooling one of its own; None where the fetcher keeps no such file
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import unquote, urlsplit

from tuf.api.exceptions import DownloadError

from agent.errors import TransportError
from agent.trust.chunks import ChunkPlan, is_sha256


class ChunkFetcher(Protocol):
    """A python-tuf fetcher that checks targets chunk by chunk against their signed plan (MqttFetcher,
    HttpFetcher). Structural: the fetchers subclass `FetcherInterface` and mypy checks them against this."""

    def fetch(self, url: str) -> Iterator[bytes]: ...

    def download_bytes(self, url: str, max_length: int) -> bytes: ...

    def expect(self, sha256: str, length: int, chunk_size: int, chunk_hashes: Sequence[str]) -> ChunkPlan: ...

    def discard(self, sha256: str) -> None: ...

    def open_complete(self, url: str, max_length: int) -> AbstractContextManager[IO[bytes] | None]: ...


class PlannedTargets:
    """The signed chunk plans a fetcher holds and the partial file each target is stored in: `expect` and `discard`
    of `ChunkFetcher`, shared by both fetchers (which set `partial_dir` and `max_chunk_size`)."""

    partial_dir: Path
    max_chunk_size: int

    def __init__(self) -> None:
        self._plans: dict[str, ChunkPlan] = {}

    def expect(self, sha256: str, length: int, chunk_size: int, chunk_hashes: Sequence[str]) -> ChunkPlan:
        """Register the signed chunk plan of a target before downloading it (from its TUF `custom` metadata)."""
        plan = ChunkPlan.create(sha256, length, chunk_size, chunk_hashes, self.max_chunk_size)
        self._plans[sha256] = plan
        return plan

    def partial_path(self, sha256: str) -> Path:
        return self.partial_dir / f"{sha256}.partial"

    def discard(self, sha256: str) -> None:
        """Forget a plan and delete its partial file (after the target was installed, or given up)."""
        self._plans.pop(sha256, None)
        self.partial_path(sha256).unlink(missing_ok=True)


class FetchError(TransportError, DownloadError):
    """The transport could not deliver a file: both our transport family and what python-tuf expects."""


def parse_tuf_url(url: str) -> tuple[str, str]:
    """`.../tuf/<file>` -> ("metadata", file); `.../targets/<dir>/<sha256>.<name>` -> ("target", sha256).

    Only the path counts, so the same function serves `mqtt:///...` and mirror `https://host/base/...` URLs."""
    path = urlsplit(url).path
    segments = path.split("/")
    name = unquote(segments[-1])
    if len(segments) >= 2 and segments[-2] == "tuf" and name and "/" not in name:
        return "metadata", name
    if "targets" in segments[:-1]:
        sha, dot, rest = name.partition(".")
        if is_sha256(sha) and dot and rest:
            return "target", sha
    raise DownloadError(f"not a TUF metadata or hash-prefixed target URL: {url}")
