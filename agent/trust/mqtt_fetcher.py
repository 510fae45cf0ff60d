"""A `ChunkFetcher` (a python-tuf `FetcherInterface`) over MQTT retained topics (docs/transport.md).

Metadata `mqtt:///tuf/<file>` is the retained message on the topic its wire name maps to (`timestamp.json` ->
`<prefix>tuf/timestamp`, `3.root.json` -> `<prefix>tuf/root/3`: no dots, agent/transport/topics.py); none there is a
404, with two exceptions that keep a read from ever depending on one broker's delivery order:
- "Is there a newer root?" (ngclient asks for root N+1 on every refresh) reads `tuf/root/<N+1>` together with
  `tuf/root/latest` (the packager's copy of its newest root) and answers 404 the moment latest says it is older than
  N+1, so the frequent not-found never waits out the retained grace.
- Metadata a signed document says must exist (a versioned snapshot or targets, named by the timestamp/snapshot
  ngclient verified just before) is "not there yet" when missing, never absent: it is read again until the fetch
  timeout, then the fetch fails as retryable (`not_found`), as a chunk missing from a signed chunk plan does. A target
`mqtt:///targets/<dir>/<sha256>.<name>` is the chunks `<prefix>targets/<sha256>/<i>`, checked one by one against the
signed chunk plan the caller registers with `expect()` first.

Each chunk that verifies is written at its offset in one preallocated file, `chunk_dir/<sha256>.partial`, the moment
it is taken from the queue, then acknowledged and handed on from memory. An interrupted download (cut connection,
agent killed) resumes by re-hashing the partial file's chunk slots against the signed plan: what matches is kept,
anything else (never written, torn by a crash) is fetched again. No separate index can disagree with the data.

Chunks are read in batches, `pipeline` batches subscribed at once: the broker queues the next batch while the agent
works on this one, and the messages outstanding stay few (mosquitto drops QoS 1 messages queued for a client beyond
its inflight + queue limits). Per-batch barriers still tell a chunk missing on the broker from one still on its way.
Give the client a small `receive_window` (`[mqtt] receive_window`, default 1): the broker then has at most that many
chunks on their way to us, each stored and acknowledged on paho's network thread as it arrives (the read's
`on_arrival` hook), so a SIGKILL loses at most that many received chunks. The price is at most that many chunks per
round trip to the broker (docs/transport.md).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from tuf.api.exceptions import DownloadError, DownloadHTTPError, DownloadLengthMismatchError
from tuf.ngclient.fetcher import FetcherInterface

from agent.errors import BundleRejected, TransportError
from agent.transport.mqtt import ConnectionLost, Message, MqttClient, RetainedRead, RetainedResult
from agent.transport.topics import Topics
from agent.trust.chunks import MAX_CHUNK_SIZE, ChunkPlan
from agent.trust.fetcher import FetchError, PlannedTargets, parse_tuf_url

log = logging.getLogger(__name__)

DEFAULT_BATCH = 16  # chunks per subscription (and per barrier)
DEFAULT_PIPELINE = 2  # batches subscribed at once: at most 2 x 16 x 128 KiB outstanding, well inside the broker's
# per-client limits (mosquitto: 20 inflight + 100 queued in 1.x, + 1000 in 2.x)


class MqttFetcher(PlannedTargets, FetcherInterface):
    """Fetch TUF metadata and chunked targets from retained MQTT topics.

    `bytes_received` counts every payload byte that came over the wire (refused ones too, and those of reads cut
    short by a reconnect); `chunks_stored` counts verified chunks written to the partial file in this process.
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
        pipeline: int = DEFAULT_PIPELINE,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if pipeline < 1:
            raise ValueError("pipeline must be >= 1")
        super().__init__()
        self.client = client
        self.topics = topics or client.topics
        self.partial_dir = Path(chunk_dir)
        self.timeout = timeout
        self.batch_size = batch_size
        self.pipeline = pipeline
        self.max_chunk_size = max_chunk_size
        self.reconnect_attempts = reconnect_attempts
        self.bytes_received = 0
        self.chunks_stored = 0

    def stored_chunks(self, sha256: str) -> list[int]:
        """Indices of the chunks of a registered target that are on disk and match their signed hash."""
        plan = self._plans[sha256]
        try:
            fd = os.open(self.partial_path(sha256), os.O_RDONLY)
        except FileNotFoundError:
            return []
        try:
            return sorted(stored_slots(fd, plan))
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def open_complete(self, url: str, max_length: int) -> Iterator[IO[bytes] | None]:
        """For a target: fetch whatever is missing, then yield its partial file opened for reading, every chunk in
        it verified, so the caller (TUF's download_file) can check and copy it instead of spooling a copy of its
        own, which on a device is one write of the whole bundle less. None for metadata or other URLs."""
        kind, value = parse_tuf_url(url)
        plan = self._plans.get(value) if kind == "target" and urlsplit(url).scheme == "mqtt" else None
        if plan is None:
            yield None
            return
        if plan.length > max_length:
            raise DownloadLengthMismatchError(f"{url}: the signed chunk plan says {plan.length} bytes, more than "
                                              f"{max_length}")
        for _ in self._fetch_target(plan):
            pass
        with open(self.partial_path(plan.sha256), "rb") as f:
            yield f

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
        try:
            topic = self.topics.tuf(filename)
        except ValueError as e:  # a name no topic maps to (a delegated role with a '.'): nothing can be there
            raise DownloadHTTPError(f"{url} not found: {e}", 404) from e
        role, _, version = topic[len(self.topics.prefix) + len("tuf/"):].partition("/")
        if role == "root" and version:
            return self._fetch_root(url, topic, int(version))
        if version:  # a versioned snapshot/targets: the metadata ngclient just verified names it
            return self._fetch_required(url, topic, f"metadata {filename}")
        payload = self._retained([topic], None, f"metadata {filename}").messages.get(topic)
        if payload is None:
            raise DownloadHTTPError(f"{url} not found: no retained message on {topic}", 404)
        return payload

    def _fetch_root(self, url: str, topic: str, version: int) -> bytes:
        """Root `version` (ngclient asks for the trusted root's version + 1 on every refresh): read with
        `tuf/root/latest`, so its absence is known the moment latest arrives, not after the retained grace."""
        latest_topic = self.topics.root_latest
        what = f"root {version}"
        for attempt in range(self.reconnect_attempts + 1):
            latest: int | None = None
            try:
                self._wait_connected(what)
                with self.client.start_retained([topic, latest_topic], self.timeout) as read:
                    for msg in read:
                        if msg.topic == topic and msg.payload:
                            self.bytes_received += read.bytes_received
                            return msg.payload
                        if msg.topic == latest_topic:
                            latest = _root_version(msg.payload)
                            if latest is not None and latest < version:
                                break  # the newest root is older: root `version` does not exist (yet)
                    self.bytes_received += read.bytes_received
            except ConnectionLost as e:
                self.bytes_received += e.bytes_received
                if attempt == self.reconnect_attempts:
                    raise FetchError(f"connection to {self.client.url} kept dropping while fetching {what}") from e
                continue
            except TransportError as e:
                raise FetchError(f"fetching {what}: {e}") from e
            if latest is not None and latest >= version:
                # the packager says root `version` exists; it may still be on its way to this broker (a cluster)
                return self._fetch_required(url, topic, what)
            raise DownloadHTTPError(f"{url} not found: no retained message on {topic} (newest root: "
                                    f"{latest if latest is not None else 'unknown'})", 404)
        raise AssertionError("unreachable")

    def _fetch_required(self, url: str, topic: str, what: str) -> bytes:
        """A topic signed metadata says exists: missing means not there yet (a cluster still replicating, a publish
        under way), so it is read again, backing off, until the fetch timeout; then a retryable FetchError."""
        deadline = time.monotonic() + self.timeout
        pause = 0.05
        while True:
            payload = self._retained([topic], None, what).messages.get(topic)
            if payload is not None:
                return payload
            if time.monotonic() + pause > deadline:
                raise FetchError(f"{url}: no retained message on {topic} yet, though signed metadata names it "
                                 f"(waited {self.timeout:g}s)", "not_found")
            log.info("%s is not on the broker yet (signed metadata names it): reading it again", topic)
            time.sleep(pause)
            pause = min(2 * pause, 1.0)

    def _wait_connected(self, what: str) -> None:
        if not self.client.is_connected and not self.client.wait_connected(self.timeout):
            raise FetchError(f"not connected to {self.client.url} (waited {self.timeout:g}s) fetching {what}")

    def _retained(self, topics: list[str], max_payload: int | None, what: str) -> RetainedResult:
        """fetch_retained, waiting out broker reconnects (paho reconnects by itself) a few times."""
        for attempt in range(self.reconnect_attempts + 1):
            try:
                self._wait_connected(what)
                result = self.client.fetch_retained(topics, self.timeout, max_payload=max_payload)
            except ConnectionLost as e:
                self.bytes_received += e.bytes_received
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

    # ---- targets: the partial file

    def _open_partial(self, plan: ChunkPlan) -> tuple[_PartialFile, set[int]]:
        """Open (or create) the target's partial file at its full length; return it with the chunks it already
        holds intact. Chunks are written without fsync: after a crash or power cut a slot may be torn or empty,
        and re-hashing every slot here (cheap next to fetching) finds it."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        path = self.partial_path(plan.sha256)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            have = stored_slots(fd, plan) if size else set()
            if size != plan.length:
                os.ftruncate(fd, plan.length)
                if plan.length:
                    _reserve(fd, plan.length, path)
        except BaseException:
            os.close(fd)
            raise
        return _PartialFile(fd, plan), have

    def _read_stored(self, part: _PartialFile, plan: ChunkPlan, index: int, stored: set[int]) -> bytes:
        data = part.read(index)
        if hashlib.sha256(data).hexdigest() != plan.chunk_hashes[index]:
            stored.discard(index)  # changed on disk after it was checked: the next attempt fetches it
            raise FetchError(f"target {plan.sha256[:12]}: stored chunk {index} changed on disk while in use")
        return data

    # ---- targets: download

    def _fetch_target(self, plan: ChunkPlan) -> Iterator[bytes]:
        part, stored = self._open_partial(plan)
        try:
            if stored:
                log.info("target %s: resuming, %d of %d chunks already stored", plan.sha256[:12], len(stored),
                         plan.count)
            missing = [i for i in range(plan.count) if i not in stored]
            ready: dict[int, bytes] = {}  # arrived, verified and stored in this run; not handed on yet
            position = 0
            if missing:
                # closing(): a consumer that stops early (or an error) closes the reads still open at once
                with contextlib.closing(self._receive(plan, part, missing, stored, ready)) as arrivals:
                    for _ in arrivals:
                        # hand on in order whatever is now contiguous: fresh chunks from memory, older ones from disk
                        while position < plan.count and position in stored:
                            yield ready.pop(position) if position in ready else self._read_stored(
                                part, plan, position, stored)
                            position += 1
            while position < plan.count:
                yield ready.pop(position) if position in ready else self._read_stored(part, plan, position, stored)
                position += 1
        finally:
            part.close()

    def _receive(
        self, plan: ChunkPlan, part: _PartialFile, missing: list[int], stored: set[int], ready: dict[int, bytes]
    ) -> Generator[None, None, None]:
        """Fetch `missing`, `pipeline` batches subscribed at once; store every chunk that verifies as soon as it is
        taken from the queue (adding it to `stored` and `ready`) and yield after each. After a reconnect only what
        is still missing is asked for. A batch whose barrier came with chunks missing or bad stops new batches; the
        open ones are finished (their good chunks kept), then FetchError names the problems."""
        label = f"target {plan.sha256[:12]}"
        todo = deque(self._batches(missing))
        problems: list[tuple[str, str]] = []  # (reason, message)
        drops = 0  # connection drops in a row without a chunk stored in between
        while todo and not problems:
            reads: deque[tuple[list[int], RetainedRead]] = deque()
            progress = len(stored)
            try:
                self._wait_connected(f"{label} chunks {todo[0][0]}..")
                while reads or (todo and not problems):
                    while todo and not problems and len(reads) < self.pipeline:
                        batch = todo.popleft()
                        topics = self.topics.chunks(plan.sha256, batch)
                        try:
                            read = self.client.start_retained(
                                topics, self.timeout, max_payload=plan.chunk_size,
                                on_arrival=functools.partial(part.store_arrival, dict(zip(topics, batch, strict=True))),
                            )
                        except BaseException:
                            todo.appendleft(batch)
                            raise
                        reads.append((batch, read))
                    batch, read = reads[0]
                    names = dict(zip(read.topics, batch, strict=True))
                    bad: dict[int, tuple[str, str]] = {}
                    for msg in read:
                        if self._accept(plan, names, msg, part, stored, ready, bad):
                            yield
                    problems += self._batch_problems(plan, batch, read, stored, bad)
                    reads.popleft()
                    self._close(read)
            except ConnectionLost as e:
                for batch, read in reads:  # keep what already arrived for the open batches
                    self._salvage(plan, batch, read, part, stored, ready)
                drops = 0 if len(stored) > progress else drops + 1
                if drops > self.reconnect_attempts:
                    raise FetchError(f"connection to {self.client.url} kept dropping while fetching {label}") from e
                log.info("connection lost while fetching %s; %d of %d chunks stored, going on after reconnect",
                         label, len(stored), plan.count)
                problems = []  # asked again after the reconnect
                todo = deque(self._batches([i for i in missing if i not in stored]))
            except FetchError:
                raise
            except TransportError as e:
                raise FetchError(f"fetching {label}: {e}") from e
            finally:
                for _, read in reads:
                    self._close(read)
        if problems:
            for _, p in problems:
                log.warning("%s: %s", label, p)
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            reasons = {r for r, _ in problems}
            reason = next(r for r in ("too_large", "hash_mismatch", "not_found") if r in reasons)
            raise FetchError(f"{label}: " + "; ".join(p for _, p in problems[:3]) + more, reason)

    def _batches(self, indices: list[int]) -> list[list[int]]:
        return [indices[k : k + self.batch_size] for k in range(0, len(indices), self.batch_size)]

    def _close(self, read: RetainedRead) -> None:
        read.close()
        self.bytes_received += read.bytes_received

    def _accept(
        self, plan: ChunkPlan, names: dict[str, int], msg: Message, part: _PartialFile, stored: set[int],
        ready: dict[int, bytes], bad: dict[int, tuple[str, str]],
    ) -> bool:
        """Take one chunk message: already verified and stored by the network thread (`store_arrival`), or else
        verified against the signed plan and stored now; then acknowledge it (with a receive window the broker
        sends the next chunk only now, if the network thread has not already). True when it was stored."""
        try:
            return self._check_and_store(plan, names, msg, part, stored, ready, bad)
        finally:
            msg.ack()

    def _check_and_store(
        self, plan: ChunkPlan, names: dict[str, int], msg: Message, part: _PartialFile, stored: set[int],
        ready: dict[int, bytes], bad: dict[int, tuple[str, str]],
    ) -> bool:
        index = names.get(msg.topic)
        payload = msg.payload
        if index is None or not payload or index in stored:  # a live delete, or a chunk we already hold
            return False
        if part.take_arrival(index, msg):
            self._took(index, payload, stored, ready, bad)
            return True
        expected = plan.chunk_length(index)
        if len(payload) != expected:
            reason = "too_large" if len(payload) > expected else "hash_mismatch"
            bad[index] = (reason, f"chunk {index} is {len(payload)} bytes, the signed plan says {expected}: discarded")
            return False
        if hashlib.sha256(payload).hexdigest() != plan.chunk_hashes[index]:
            bad[index] = ("hash_mismatch", f"chunk {index} does not match its signed hash: discarded")
            return False
        part.write(index, payload)
        self._took(index, payload, stored, ready, bad)
        return True

    def _took(
        self, index: int, payload: bytes, stored: set[int], ready: dict[int, bytes], bad: dict[int, tuple[str, str]]
    ) -> None:
        self.chunks_stored += 1
        stored.add(index)
        ready[index] = payload
        bad.pop(index, None)

    def _salvage(
        self, plan: ChunkPlan, batch: list[int], read: RetainedRead, part: _PartialFile, stored: set[int],
        ready: dict[int, bytes],
    ) -> None:
        """After a connection drop: store the chunks of `read` that had already arrived (they verify like any)."""
        names = dict(zip(read.topics, batch, strict=True))
        with contextlib.suppress(TransportError):  # ConnectionLost at the drop's marker in the queue
            while (msg := read.get(block=False)) is not None:
                self._accept(plan, names, msg, part, stored, ready, {})

    @staticmethod
    def _batch_problems(
        plan: ChunkPlan, batch: list[int], read: RetainedRead, stored: set[int], bad: dict[int, tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """What is wrong with the chunks of a batch whose barrier arrived: refused, bad or missing on the broker."""
        out: list[tuple[str, str]] = []
        oversize = read.oversize
        for index, topic in zip(batch, read.topics, strict=True):
            if index in stored:
                continue
            if index in bad:
                out.append(bad[index])
            elif topic in oversize:
                out.append(("too_large", f"chunk {index} is {oversize[topic]} bytes, more than the signed chunk size "
                                         f"{plan.chunk_size}: refused"))
            else:
                out.append(("not_found", f"chunk {index} is missing on the broker"))
        return out


class _PartialFile:
    """A target's open partial file, written from two threads: the caller's, and paho's network thread storing
    chunks as they arrive (`store_arrival`, the read's on_arrival hook). Writes hold one lock, and once closed a late
    hook writes nothing (the descriptor's number may already belong to another file). No fsync: after a crash a slot
    may be torn, and `_open_partial` re-hashes every slot on resume."""

    def __init__(self, fd: int, plan: ChunkPlan) -> None:
        self._fd, self._plan = fd, plan
        self._lock = threading.Lock()
        self._closed = False
        self._arrived: dict[int, Message] = {}  # verified and written by the hook, not yet taken by the caller

    def store_arrival(self, names: dict[str, int], msg: Message) -> None:
        """on_arrival hook: write the chunk at once if it is exactly what the plan signed (else leave it to the
        caller, who reports it)."""
        index = names.get(msg.topic)
        if index is None:
            return
        payload = msg.payload
        try:
            self._plan.check_chunk(index, payload)
        except BundleRejected:
            return
        with self._lock:
            if not self._closed:
                os.pwrite(self._fd, payload, index * self._plan.chunk_size)
                self._arrived[index] = msg

    def take_arrival(self, index: int, msg: Message) -> bool:
        """True (once) when the hook verified and wrote this very message as chunk `index` (another message for
        the same topic, say a bad one that came first, is checked by the caller as usual)."""
        with self._lock:
            if self._arrived.get(index) is msg:
                del self._arrived[index]
                return True
            return False

    def write(self, index: int, payload: bytes) -> None:
        with self._lock:
            os.pwrite(self._fd, payload, index * self._plan.chunk_size)

    def read(self, index: int) -> bytes:
        return os.pread(self._fd, self._plan.chunk_length(index), index * self._plan.chunk_size)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)


def _root_version(payload: bytes) -> int | None:
    """The version `tuf/root/latest` claims (untrusted: it only decides between 404 and waiting), or None."""
    try:
        version = json.loads(payload)["signed"]["version"]
    except (ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def stored_slots(fd: int, plan: ChunkPlan) -> set[int]:
    """The chunk slots of a partial file that hold exactly their signed bytes."""
    size = os.fstat(fd).st_size
    have: set[int] = set()
    for index in range(plan.count):
        offset, n = index * plan.chunk_size, plan.chunk_length(index)
        if offset + n > size:
            break
        if hashlib.sha256(os.pread(fd, n, offset)).hexdigest() == plan.chunk_hashes[index]:
            have.add(index)
    return have


def _reserve(fd: int, length: int, path: Path) -> None:
    """Allocate the whole file now, so a full disk fails the download at its start rather than half way."""
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FetchError(f"no space for {length} bytes at {path}", "no_space") from e
        # the filesystem cannot preallocate (EOPNOTSUPP, EINVAL): the sparse file still works
