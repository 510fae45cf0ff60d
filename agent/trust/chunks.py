"""The signed chunking of a TUF target (docs/transport.md). Pure: no tuf, no MQTT.

The packager signs, in each target's custom metadata, `chunk_size` and the sha256 of every chunk; chunk i is
bytes [i*chunk_size, (i+1)*chunk_size) of the file (the last one may be shorter, an empty file has none).
Fetchers check every chunk against this plan as it arrives, so no unverified byte is ever kept.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, TypeGuard

from agent.errors import BundleRejected, RejectReason

MAX_CHUNK_SIZE = 128 * 1024  # docs/transport.md: one MQTT chunk message is at most 128 KiB
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: object) -> TypeGuard[str]:
    """A lowercase hex sha256 digest, nothing around it."""
    return isinstance(value, str) and _SHA256_RE.fullmatch(value) is not None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ChunkPlan:
    """The signed chunk map of one target: its sha256, total length, chunk size and each chunk's sha256.

    Build it with `create()`, which validates. `path` (the TUF target path, when known) only names the target in
    messages; it takes no part in comparisons.
    """

    sha256: str
    length: int
    chunk_size: int
    chunk_hashes: tuple[str, ...]
    path: str = field(default="", compare=False)

    @classmethod
    def create(
        cls,
        sha256: object,
        length: object,
        chunk_size: object,
        chunk_hashes: object,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        *,
        path: str = "",
    ) -> ChunkPlan:
        """Validate and build a plan; any inconsistency is BundleRejected(reason="bad_chunk_plan").

        The values may come straight from signed JSON (hence `object`): every type is checked too."""
        label = path or ("target " + sha256[:12] if is_sha256(sha256) else "target")

        def bad(why: str) -> BundleRejected:
            return BundleRejected(f"{label}: invalid chunk plan: {why}", reason="bad_chunk_plan")

        if not is_sha256(sha256):
            raise bad(f"the target hash is not a lowercase hex sha256: {sha256!r}")
        if not _is_int(length) or length < 0:
            raise bad(f"length must be a non-negative integer, got {length!r}")
        if not _is_int(chunk_size) or not 0 < chunk_size <= max_chunk_size:
            raise bad(f"chunk_size must be an integer in 1..{max_chunk_size}, got {chunk_size!r}")
        if isinstance(chunk_hashes, str | bytes) or not isinstance(chunk_hashes, Sequence):
            raise bad("chunks must be a list of sha256 hex digests")
        expected = -(-length // chunk_size)
        if len(chunk_hashes) != expected:
            raise bad(
                f"{len(chunk_hashes)} chunk hashes listed, a {length}-byte target in {chunk_size}-byte chunks "
                f"has {expected}"
            )
        for index, h in enumerate(chunk_hashes):
            if not is_sha256(h):
                raise bad(f"chunk {index} hash is not a lowercase hex sha256: {h!r}")
        return cls(sha256, length, chunk_size, tuple(chunk_hashes), path)

    @property
    def count(self) -> int:
        return len(self.chunk_hashes)

    def _label(self) -> str:
        return self.path or f"target {self.sha256[:12]}"

    def chunk_length(self, index: int) -> int:
        """The signed length of chunk `index`; BundleRejected(reason="chunk_mismatch") if there is no such chunk."""
        if not 0 <= index < self.count:
            raise BundleRejected(f"{self._label()}: chunk {index} does not exist (the target has {self.count})",
                                 reason="chunk_mismatch")
        return min(self.chunk_size, self.length - index * self.chunk_size)

    def check_chunk(self, index: int, data: bytes) -> None:
        """Raise BundleRejected unless `data` is exactly chunk `index` as signed."""
        expected = self.chunk_length(index)
        if len(data) != expected:
            reason: RejectReason = "too_large" if len(data) > expected else "chunk_mismatch"
            raise BundleRejected(f"{self._label()}: chunk {index} is {len(data)} bytes, signed length is {expected}",
                                 reason=reason)
        if hashlib.sha256(data).hexdigest() != self.chunk_hashes[index]:
            raise BundleRejected(f"{self._label()}: chunk {index} does not match its signed sha256",
                                 reason="hash_mismatch")


def chunk_hashes(data: bytes | IO[bytes], chunk_size: int,
                 each: Callable[[bytes], object] | None = None) -> list[str]:
    """The sha256 of each `chunk_size` slice of `data` (what the packager signs): bytes, or a file read from its
    current position to its end. `each`, if given, sees every chunk in order, so the packager copies and hashes the
    whole file in the same pass."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    f = io.BytesIO(data) if isinstance(data, bytes) else data
    out = []
    while chunk := f.read(chunk_size):  # a regular file returns chunk_size bytes until its last chunk
        out.append(hashlib.sha256(chunk).hexdigest())
        if each is not None:
            each(chunk)
    return out
