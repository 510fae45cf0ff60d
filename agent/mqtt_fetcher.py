"""python-tuf `FetcherInterface` over MQTT retained topics (docs/transport.md).

Metadata `mqtt:///tuf/<file>` is the retained message on `<prefix>tuf/<file>`; none there is a 404. A target
`mqtt:///targets/<dir>/<sha256>.<name>` is the chunks `<prefix>targets/<sha256>/<i>`, checked one by one against the
signed chunk plan the caller registers with `expect()` first. Verified chunks are kept under `chunk_dir/<sha256>/<i>`,
so an interrupted download (cut connection, agent restart) only fetches what is still missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

from agent.chunks import MAX_CHUNK_SIZE, ChunkPlan, is_sha256
from agent.errors import TransportError
from agent.mqtt_client import ConnectionLost, MqttClient, RetainedResult, Topics

log = logging.getLogger(__name__)

DEFAULT_BATCH = 16  # chunks subscribed at once: bounds memory (16 x 128 KiB) and the broker's per-client queue


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


class MqttFetcher(FetcherInterface):
    """Fetch TUF metadata and chunked targets from retained MQTT topics.

    `bytes_received` counts every payload byte that came over the wire (refused ones too); `chunks_stored` counts
    verified chunks written to `chunk_dir`.
    """

    def __init__(
        self,
        client: MqttClient,
        chunk_dir: Path,
        *,
        topics: Topics | None = None,
        timeout: float = 30.0,
        batch_size: int = DEFAULT_BATCH,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        reconnect_attempts: int = 3,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.client = client
        self.topics = topics or client.topics
        self.chunk_dir = Path(chunk_dir)
        self.timeout = timeout
        self.batch_size = batch_size
        self.max_chunk_size = max_chunk_size
        self.reconnect_attempts = reconnect_attempts
        self.bytes_received = 0
        self.chunks_stored = 0
        self._plans: dict[str, ChunkPlan] = {}

    # ---- plans

    def expect(self, sha256: str, length: int, chunk_size: int, chunk_hashes: Sequence[str]) -> ChunkPlan:
        """Register the signed chunk plan of a target before downloading it (from its TUF `custom` metadata)."""
        plan = ChunkPlan.create(sha256, length, chunk_size, chunk_hashes, self.max_chunk_size)
        self._plans[sha256] = plan
        return plan

    def discard(self, sha256: str) -> None:
        """Forget a plan and delete its stored chunks (after the target was installed, or given up)."""
        self._plans.pop(sha256, None)
        d = self.chunk_dir / sha256
        if d.is_dir():
            for f in d.iterdir():
                f.unlink(missing_ok=True)
            d.rmdir()

    def stored_chunks(self, sha256: str) -> list[int]:
        """Indices of chunks already on disk for a registered target (size-checked, not re-hashed)."""
        return sorted(self._scan(self._plans[sha256]))

    # ---- FetcherInterface

    def _fetch(self, url: str) -> Iterator[bytes]:
        scheme = urlsplit(url).scheme
        if scheme != "mqtt":
            raise DownloadError(f"MqttFetcher only fetches mqtt:/// URLs, not {url}")
        kind, value = parse_tuf_url(url)
        if kind == "metadata":
            return iter([self._fetch_metadata(url, value)])
        plan = self._plans.get(value)
        if plan is None:
            # Without the signed chunk map nothing bounds or checks what the broker sends: refuse.
            raise DownloadError(f"no signed chunk plan registered for target {value}; call expect() first ({url})")
        return self._fetch_target(plan)

    # ---- metadata

    def _fetch_metadata(self, url: str, filename: str) -> bytes:
        topic = self.topics.tuf(filename)
        result = self._retained([topic], None, f"metadata {filename}")
        payload = result.messages.get(topic)
        if payload is None:
            raise DownloadHTTPError(f"{url} not found: no retained message on {topic}", 404)
        return payload

    # ---- targets

    def _retained(self, topics: list[str], max_payload: int | None, what: str) -> RetainedResult:
        """fetch_retained, waiting out broker reconnects (paho reconnects by itself) a few times."""
        for attempt in range(self.reconnect_attempts + 1):
            try:
                if not self.client.is_connected and not self.client.wait_connected(self.timeout):
                    raise FetchError(f"not connected to {self.client.url} (waited {self.timeout:g}s) fetching {what}")
                result = self.client.fetch_retained(topics, self.timeout, max_payload=max_payload)
            except ConnectionLost as e:
                if attempt == self.reconnect_attempts:
                    raise FetchError(f"connection to {self.client.url} kept dropping while fetching {what}") from e
                log.info("connection lost while fetching %s; retrying after reconnect", what)
                continue
            except FetchError:
                raise
            except TransportError as e:
                raise FetchError(f"fetching {what}: {e}") from e
            self.bytes_received += result.bytes_received
            return result
        raise AssertionError("unreachable")

    def _dir(self, plan: ChunkPlan) -> Path:
        d = self.chunk_dir / plan.sha256
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _scan(self, plan: ChunkPlan) -> set[int]:
        """Chunks on disk with the right size; stray temp files and wrong sizes are removed."""
        d = self.chunk_dir / plan.sha256
        have: set[int] = set()
        if not d.is_dir():
            return have
        for f in d.iterdir():
            ok = f.name.isdigit() and int(f.name) < plan.count and f.stat().st_size == plan.chunk_length(int(f.name))
            if ok:
                have.add(int(f.name))
            else:
                f.unlink(missing_ok=True)
        return have

    def _store(self, plan: ChunkPlan, index: int, data: bytes) -> None:
        d = self._dir(plan)
        tmp = d / f".{index}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        # No fsync per chunk: after a power cut a torn chunk fails its hash when read back and is fetched again.
        os.replace(tmp, d / str(index))
        self.chunks_stored += 1

    def _download(self, plan: ChunkPlan, indices: list[int]) -> None:
        """Fetch `indices`, store those matching their signed hash; raise if any is missing or bad."""
        topics = self.topics.chunks(plan.sha256, indices)
        result = self._retained(topics, plan.chunk_size, f"target {plan.sha256[:12]} chunks {indices[0]}..")
        problems: list[str] = []
        reasons: set[str] = set()
        for index, topic in zip(indices, topics, strict=True):
            payload = result.messages.get(topic)
            expected = plan.chunk_length(index)
            if payload is None:
                if topic in result.oversize:
                    reasons.add("too_large")
                    problems.append(
                        f"chunk {index} is {result.oversize[topic]} bytes, more than the signed chunk size "
                        f"{plan.chunk_size}: refused"
                    )
                else:
                    reasons.add("not_found")
                    problems.append(f"chunk {index} is missing on the broker")
            elif len(payload) != expected:
                reasons.add("too_large" if len(payload) > expected else "hash_mismatch")
                problems.append(f"chunk {index} is {len(payload)} bytes, the signed plan says {expected}: discarded")
            elif hashlib.sha256(payload).hexdigest() != plan.chunk_hashes[index]:
                reasons.add("hash_mismatch")
                problems.append(f"chunk {index} does not match its signed hash: discarded")
            else:
                self._store(plan, index, payload)
        if problems:
            for p in problems:
                log.warning("target %s: %s", plan.sha256[:12], p)
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            reason = next(r for r in ("too_large", "hash_mismatch", "not_found") if r in reasons)
            raise FetchError(f"target {plan.sha256[:12]}: " + "; ".join(problems[:3]) + more, reason)

    def _read(self, plan: ChunkPlan, index: int, just_stored: bool) -> bytes:
        path = self.chunk_dir / plan.sha256 / str(index)
        if just_stored:  # hashed on arrival moments ago; chunks from an earlier run are hashed again below
            return path.read_bytes()
        for attempt in range(2):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = b""
            if hashlib.sha256(data).hexdigest() == plan.chunk_hashes[index] and len(data) == plan.chunk_length(index):
                return data
            # damaged on disk (torn write, bit rot): fetch that one chunk again
            path.unlink(missing_ok=True)
            if attempt == 0:
                log.warning("stored chunk %d of %s is damaged; fetching it again", index, plan.sha256[:12])
                self._download(plan, [index])
        raise FetchError(f"target {plan.sha256[:12]}: chunk {index} keeps failing its hash on disk")

    def _fetch_target(self, plan: ChunkPlan) -> Iterator[bytes]:
        have = self._scan(plan)
        missing = [i for i in range(plan.count) if i not in have]
        if have:
            log.info("target %s: resuming, %d of %d chunks already stored", plan.sha256[:12], len(have), plan.count)
        pending = set(missing)
        fresh = set(missing)
        position = 0
        batches = [missing[k : k + self.batch_size] for k in range(0, len(missing), self.batch_size)]
        for batch in [*batches, []]:
            if batch:
                self._download(plan, batch)
                pending.difference_update(batch)
            # yield in order whatever is now contiguous, straight from disk
            while position < plan.count and position not in pending:
                yield self._read(plan, position, position in fresh)
                position += 1
