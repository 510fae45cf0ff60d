"""Publish a TUF repository's metadata and chunked targets as retained MQTT messages (docs/transport.md), or write
the same layout as a static HTTP mirror tree.

Publishing is idempotent and resumable: it first reads back what the broker holds and only publishes chunks that
are missing or damaged. Order matters because devices may look at any moment: chunks and hints first, then
metadata with root versions first (the newest root then again on `tuf/root/latest`, which lets a device tell at once
that there is no newer root) and timestamp last, so a timestamp never points at data that is not there yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agent.transport.mqtt import MqttClient, PublishHandle
from agent.transport.topics import Topics
from packager.errors import PublishError

log = logging.getLogger(__name__)

READBACK_BATCH = 32  # chunks read back per barrier round (32 x 128 KiB in memory)
WINDOW = 32  # publishes awaiting PUBACK at once
_VERSIONED = re.compile(r"(\d+)\.(.+)\.json")

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class TargetSpec(NamedTuple):
    """One target to publish: its sha256, the file, the signed chunk size and chunk hashes. `target_path` (the
    TUF path, e.g. `bundles/digits-3.bundle`) is needed only for the HTTP tree's whole-file copy."""

    sha256: str
    path: Path
    chunk_size: int
    chunk_hashes: list[str]
    target_path: str | None = None


TargetLike = TargetSpec | tuple[str, Path, int, list[str]]


@dataclass
class PublishStats:
    chunks_published: int = 0
    chunks_skipped: int = 0
    bytes_published: int = 0
    bytes_skipped: int = 0
    metadata_published: int = 0
    metadata_skipped: int = 0
    bytes_read_back: int = 0
    seconds: float = 0.0


def _spec(t: TargetLike) -> TargetSpec:
    spec = t if isinstance(t, TargetSpec) else TargetSpec(*t)
    size = spec.path.stat().st_size
    expected = -(-size // spec.chunk_size) if spec.chunk_size > 0 else -1
    if expected != len(spec.chunk_hashes):
        raise PublishError(
            f"{spec.path}: {len(spec.chunk_hashes)} chunk hashes for {size} bytes in {spec.chunk_size}-byte chunks"
        )
    return spec


def _read_chunk(spec: TargetSpec, index: int) -> bytes:
    with open(spec.path, "rb") as f:
        f.seek(index * spec.chunk_size)
        data = f.read(spec.chunk_size)
    if hashlib.sha256(data).hexdigest() != spec.chunk_hashes[index]:
        raise PublishError(f"{spec.path}: chunk {index} does not match its signed hash (file changed since signing?)")
    return data


def meta_hint(spec: TargetSpec) -> bytes:
    """The untrusted `targets/<sha>/meta` hint: the signed copy is in the targets metadata."""
    length = spec.path.stat().st_size
    doc = {"length": length, "chunk_size": spec.chunk_size, "chunks": list(spec.chunk_hashes)}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def metadata_order(names: Iterable[str]) -> list[str]:
    """Roots by version, then targets and delegated roles, then snapshot, then timestamp last."""

    def key(name: str) -> tuple[int, int, str]:
        m = _VERSIONED.fullmatch(name)
        role, version = (m.group(2), int(m.group(1))) if m else (name.removesuffix(".json"), 0)
        rank = {"root": 0, "snapshot": 2, "timestamp": 3}.get(role, 1)
        return rank, version, name

    return sorted(names, key=key)


class _Window:
    """At most `size` publishes awaiting PUBACK: bounded memory, without one round trip per chunk."""

    def __init__(self, client: MqttClient, size: int, timeout: float) -> None:
        self.client = client
        self.size = size
        self.timeout = timeout
        self.pending: deque[PublishHandle] = deque()

    def publish(self, topic: str, payload: bytes) -> None:
        while len(self.pending) >= self.size:
            self.pending.popleft().wait(self.timeout)
        self.pending.append(self.client.publish(topic, payload, retain=True, qos=1, wait=False))

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().wait(self.timeout)


def publish_tree(
    client: MqttClient,
    topics: Topics,
    metadata: dict[str, bytes],
    targets: Sequence[TargetLike],
    progress: Progress | None = None,
    notify_version: int | None = None,
    *,
    timeout: float = 60.0,
    readback_batch: int = READBACK_BATCH,
    window: int = WINDOW,
) -> PublishStats:
    """Make the broker hold `metadata` (wire names: `<N>.root.json`, `timestamp.json`, ...) and every target's
    chunks and meta hint, publishing only what is missing or different; then poke `notify`."""
    started = time.monotonic()
    stats = PublishStats()
    specs = [_spec(t) for t in targets]
    for name in metadata:
        topics.tuf(name)  # validates the name before anything is sent
    pub = _Window(client, window, timeout)

    for spec in specs:
        _publish_target(client, topics, spec, pub, stats, progress, timeout, readback_batch)
    pub.drain()  # every chunk acknowledged before any metadata can point at it

    names = metadata_order(metadata)
    # (topic, payload) in publish order: the newest root goes to tuf/root/latest right after the last root
    items = [(topics.tuf(n), metadata[n]) for n in names]
    roots = [n for n in names if _VERSIONED.fullmatch(n) and n.split(".")[1] == "root"]
    if roots:
        items.insert(names.index(roots[-1]) + 1, (topics.root_latest, metadata[roots[-1]]))
    held = client.fetch_retained([t for t, _ in items], timeout, grace=0)  # a topic missed is only sent again
    stats.bytes_read_back += held.bytes_received
    for done, (topic, payload) in enumerate(items, 1):
        if held.messages.get(topic) == payload:
            stats.metadata_skipped += 1
        else:
            # one at a time, acknowledged: the broker then holds root < latest < targets < snapshot < timestamp
            client.publish(topic, payload, retain=True, qos=1, wait=True, timeout=timeout)
            stats.metadata_published += 1
        if progress:
            progress("metadata", done, len(items))

    if notify_version is not None:
        client.publish(topics.notify, str(int(notify_version)).encode(), retain=True, qos=1, timeout=timeout)
    stats.seconds = time.monotonic() - started
    log.info(
        "published %d chunks (%d bytes), skipped %d already on the broker; metadata %d published, %d unchanged",
        stats.chunks_published, stats.bytes_published, stats.chunks_skipped, stats.metadata_published,
        stats.metadata_skipped,
    )
    return stats


def _publish_target(
    client: MqttClient,
    topics: Topics,
    spec: TargetSpec,
    pub: _Window,
    stats: PublishStats,
    progress: Progress | None,
    timeout: float,
    readback_batch: int,
) -> None:
    count = len(spec.chunk_hashes)
    hint = meta_hint(spec)
    for start in range(0, max(count, 1), readback_batch):
        indices = list(range(start, min(count, start + readback_batch)))
        wanted = [topics.chunk(spec.sha256, i) for i in indices]
        if start == 0:
            wanted.append(topics.target_meta(spec.sha256))
        # Bounded by the chunk size: a bigger payload on a chunk topic is wrong by definition and gets replaced.
        # No grace after the barrier: on a first publish nothing is there, and a chunk missed is only sent again
        # (0.5 s a batch of 32 chunks cut a 50 MB publish from ~100 MB/s to ~6 MB/s).
        held = client.fetch_retained(wanted, timeout, max_payload=max(spec.chunk_size, len(hint)), grace=0)
        stats.bytes_read_back += held.bytes_received
        for i in indices:
            on_broker = held.messages.get(topics.chunk(spec.sha256, i))
            if on_broker is not None and hashlib.sha256(on_broker).hexdigest() == spec.chunk_hashes[i]:
                stats.chunks_skipped += 1
                stats.bytes_skipped += len(on_broker)
            else:
                data = _read_chunk(spec, i)
                pub.publish(topics.chunk(spec.sha256, i), data)
                stats.chunks_published += 1
                stats.bytes_published += len(data)
            if progress:
                progress(f"target {spec.sha256[:12]}", i + 1, count)
        if start == 0 and held.messages.get(topics.target_meta(spec.sha256)) != hint:
            pub.publish(topics.target_meta(spec.sha256), hint)


def delete_targets(
    client: MqttClient, topics: Topics, sha256: str, chunks: int, *, timeout: float = 60.0, window: int = WINDOW
) -> int:
    """Clear a target's retained chunks and meta hint (garbage collection); returns the number of topics cleared.
    Clearing a topic that holds nothing is harmless, so this is safe to repeat."""
    pub = _Window(client, window, timeout)
    names = [*topics.chunks(sha256, range(chunks)), topics.target_meta(sha256)]
    for topic in names:
        pub.publish(topic, b"")
    pub.drain()
    return len(names)


# ---- static HTTP mirror


def _write_atomic(path: Path, data: bytes | Path) -> bool:
    """Write bytes (or copy a file) unless identical; temp file + fsync + rename so a mirror never serves half a
    file."""
    if isinstance(data, Path):
        if path.is_file() and path.stat().st_size == data.stat().st_size and _file_sha(path) == _file_sha(data):
            return False
    elif path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, Path):
                with open(data, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _whole_file_path(spec: TargetSpec) -> str:
    if spec.target_path is None:
        kind = {".bundle": "bundles", ".json": "deployments"}.get(spec.path.suffix)
        if kind is None:
            raise PublishError(f"{spec.path}: give TargetSpec.target_path (cannot tell bundle from deployment)")
        target_path = f"{kind}/{spec.path.name}"
    else:
        target_path = spec.target_path
    dirname, sep, basename = target_path.rpartition("/")
    if not basename or ".." in target_path.split("/") or target_path.startswith("/"):
        raise PublishError(f"bad target path {target_path!r}")
    return f"{dirname}{sep}{spec.sha256}.{basename}"


def write_http_tree(out_dir: Path, metadata: dict[str, bytes], targets: Sequence[TargetLike]) -> int:
    """Write the mirror layout under `out_dir`: `targets/<sha>/meta`, `targets/<sha>/<i>`, the whole file at
    `targets/<dir>/<sha>.<basename>`, then `tuf/<file>` (timestamp last). Returns the number of files written."""
    written = 0
    for t in targets:
        spec = _spec(t)
        base = out_dir / "targets" / spec.sha256
        whole = hashlib.sha256()
        for i in range(len(spec.chunk_hashes)):
            data = _read_chunk(spec, i)
            whole.update(data)
            written += _write_atomic(base / str(i), data)
        if whole.hexdigest() != spec.sha256:
            raise PublishError(f"{spec.path}: sha256 is {whole.hexdigest()}, expected {spec.sha256}")
        written += _write_atomic(base / "meta", meta_hint(spec))
        written += _write_atomic(out_dir / "targets" / _whole_file_path(spec), spec.path)
    for name in metadata_order(metadata):
        Topics().tuf(name)  # same name rules as on the broker
        written += _write_atomic(out_dir / "tuf" / name, metadata[name])
    return written

