"""The store-and-forward queue: telemetry and events on disk (SQLite, standard library) until the broker acknowledged
them, bounded in messages and bytes, surviving restarts.

    q = DiskQueue(state_dir / "telemetry.db", max_messages=100_000, max_bytes=50_000_000)
    seq = q.put(TELEMETRY, "telemetry", {...})   # the payload gets `seq` (per kind, persisted) and is stored
    batch = q.peek(500)                          # oldest first
    ... publish them in order with QoS 1, wait for the PUBACKs ...
    q.remove_through(batch[k].id)                # only what the broker acknowledged

Policy (pure and in one place, `_make_room`): when a new message does not fit, the oldest TELEMETRY goes first;
events are never dropped to make room. When only events are left and the queue is full, a new telemetry message
is refused (counted in `telemetry_dropped_total`) and a new event is refused too (counted in `events_dropped_total`,
logged): the bounds are hard, so the disk use is, but no stored event is ever lost. Both counters persist.

Durability: WAL with synchronous=NORMAL. A committed put survives the agent being killed (SIGKILL, a crash); a power
cut may lose the last puts since the WAL was last synced (at most about a checkpoint's worth), never corrupt the
database. That is the right trade for telemetry: a full fsync per message would cost more than the message.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

TELEMETRY: Final = 0
EVENT: Final = 1
KINDS = (TELEMETRY, EVENT)
# Bytes counted per stored row beyond its payload (the row header, id, kind, leaf, codec, cell pointer, index entry
# and the unused tail of pages): keeps the file size, not just the payload sum, under the bound
# (tests/unit/test_telemetry_queue.py measures the files).
ROW_OVERHEAD = 64

# The disk footprint is the database plus its -wal and -shm files. The WAL is checkpointed every WAL_PAGES pages and
# cut back to that size after a checkpoint (journal_size_limit), so it stays below WAL_PAGES + one transaction's
# pages (TXN_SLACK_PAGES: a put, a drop or an acknowledged batch touches a few); the -shm index is 32 KiB per 4,000
# WAL frames; FIXED_PAGES cover the schema, meta and index roots. All that is set aside from max_bytes before any
# row is counted, so the three files together stay within max_bytes.
PAGE_SIZE: Final = 4096
WAL_FRAME = PAGE_SIZE + 24
TXN_SLACK_PAGES = 32
FIXED_PAGES = 8
SHM_BYTES = 32 * 1024


def wal_pages(max_bytes: int) -> int:
    """The autocheckpoint interval for a bound: about 2% of it, between 8 and 256 pages."""
    return max(8, min(256, max_bytes // 50 // PAGE_SIZE))


def disk_allowance(max_bytes: int) -> int:
    """Bytes of max_bytes kept for the WAL, the -shm index and the fixed pages (not for rows)."""
    return 32 + (wal_pages(max_bytes) + TXN_SLACK_PAGES) * WAL_FRAME + SHM_BYTES + FIXED_PAGES * PAGE_SIZE

# Payloads are stored zlib-compressed against a preset dictionary of the messages' usual keys and values. The
# dictionary of a codec must never change (rows on disk name their codec); a new dictionary is a new codec number,
# and old codecs stay decodable so a queue written by an older agent still flushes.
# - codec 1: the keys of the first telemetry schema (a 1.85 KB message of today takes ~465 bytes).
# - codec 2 (written now): a whole current telemetry message in the order Publisher builds it (rollout_*, drift_input_*,
#   shadow_* included), values neutral, level 9; the event fields before it (zlib finds the dictionary's end most
#   cheaply, and telemetry is most of the queue). A real 1,853-byte message takes ~240 bytes.
# The stored bytes decompress to exactly the published JSON: nothing is left out or rewritten.
RAW, ZLIB_V1, ZLIB_V2 = 0, 1, 2
_ZDICT_V1 = json.dumps({
    "schema": 1, "device": "dev-", "name": "", "version": 1, "ts": 1.7e9, "requests_total": 0, "errors_total": 0,
    "rejected_total": 0, "error_rate": None, "latency_ms_p50": None, "latency_ms_p95": None, "latency_ms_p99": None,
    "latency_ms_buckets": [0] * 14,
    "latency_ms_bucket_bounds": [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
                                 None],
    "latency_ms_count": 0, "latency_ms_sum": 0.0, "throughput_rps": None, "accuracy": None, "accuracy_low": None,
    "accuracy_high": None, "feedback_mae": None, "feedback_total": 0, "feedback_unknown_total": 0,
    "feedback_expired_total": 0, "feedback_duplicate_total": 0, "drift_psi": None, "drift_status": "unknown",
    "drift_samples": 0, "drift_bin_counts": [0] * 10, "drift_reference_counts": [0] * 10, "parity_ok": True,
    "parity_score": None, "parity_checked_at": None, "parity_detail": "", "cpu_percent": 0.0,
    "agent_cpu_percent": 0.0, "load1": 0.0, "mem_available_bytes": 0, "rss_bytes": 0, "disk_free_bytes": 0,
    "temp_celsius": None, "throttled_flags": None, "under_voltage_now": None, "throttled_now": None,
    "net_rx_bytes": 0, "net_tx_bytes": 0, "telemetry_dropped_total": 0, "events_dropped_total": 0,
    "queue_messages": 0, "queue_bytes": 0, "from": "idle", "to": "check", "event": "no_update", "reason": None,
    "at": 1.7e9, "bundle": {"name": "", "version": 1, "sha256": "", "format": "onnx"}, "seq": 1,
}, separators=(",", ":")).encode()
_ZDICT_V2 = b"".join(json.dumps(doc, separators=(",", ":")).encode() for doc in (
    {"schema": 1, "device": "dev-", "name": "", "version": 1, "ts": 1.7e9, "from": "idle", "to": "check",
     "event": "no_update", "reason": None, "at": 1.7e9,
     "bundle": {"name": "", "version": 1, "sha256": "", "format": "onnx"}, "rollout_id": None, "rollout_wave": None,
     "seq": 1},
    {"schema": 1, "device": "dev-", "name": "", "version": 0, "ts": 0.0, "rollout_id": None, "rollout_wave": None,
     "requests_total": 0, "errors_total": 0, "rejected_total": 0, "error_rate": 0.0, "latency_ms_p50": 0.0,
     "latency_ms_p95": 0.0, "latency_ms_p99": 0.0, "latency_ms_buckets": [0] * 14,
     "latency_ms_bucket_bounds": [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
                                  None],
     "latency_ms_count": 0, "latency_ms_sum": 0.0, "throughput_rps": 0.0, "accuracy": None, "accuracy_low": None,
     "accuracy_high": None, "feedback_mae": None, "feedback_total": 0, "feedback_unknown_total": 0,
     "feedback_expired_total": 0, "feedback_duplicate_total": 0, "drift_psi": 0.0, "drift_status": "unknown",
     "drift_samples": 0, "drift_bin_counts": [0] * 10, "drift_reference_counts": [0] * 10, "drift_input_psi": 0.0,
     "drift_input_status": "ok", "drift_input_samples": 0, "parity_ok": True, "parity_score": 1.0,
     "parity_checked_at": 0.0, "parity_detail": "top1 agreement 1.0000 (64/64 rows) >= 0.97", "shadow_name": None,
     "shadow_version": None, "shadow_agreement": None, "shadow_agreement_kind": None, "shadow_samples": None,
     "shadow_rows": None, "shadow_latency_ms_p50": None, "shadow_latency_ms_p95": None, "shadow_skipped_total": None,
     "shadow_errors_total": None, "shadow_cpu_seconds_total": None, "shadow_cpu_budget": None, "cpu_percent": 0.0,
     "agent_cpu_percent": 0.0, "load1": 0.0, "mem_available_bytes": 0, "rss_bytes": 0, "disk_free_bytes": 0,
     "temp_celsius": None, "throttled_flags": None, "under_voltage_now": None, "throttled_now": None,
     "net_rx_bytes": 0, "net_tx_bytes": 0, "telemetry_dropped_total": 0, "events_dropped_total": 0,
     "queue_messages": 0, "queue_bytes": 0, "seq": 1},
))
_ZDICTS = {ZLIB_V1: _ZDICT_V1, ZLIB_V2: _ZDICT_V2}
CODEC: Final = ZLIB_V2  # what put() writes


def encode(body: bytes) -> bytes:
    c = zlib.compressobj(9, zdict=_ZDICTS[CODEC])
    return c.compress(body) + c.flush()


def decode(codec: int, stored: bytes) -> bytes:
    if codec == RAW:
        return stored
    zdict = _ZDICTS.get(codec)
    if zdict is None:
        raise ValueError(f"unknown telemetry queue codec {codec}")
    d = zlib.decompressobj(zdict=zdict)
    return d.decompress(stored) + d.flush()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    leaf TEXT NOT NULL,
    codec INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_kind ON queue (kind, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Queued:
    id: int
    kind: int
    leaf: str  # the device topic's last level(s): "telemetry", "events"
    payload: bytes  # the JSON message, decoded


class DiskQueue:
    """Thread-safe: one connection behind a lock (puts come from the publisher and the deployment threads, peeks
    and removals from the flusher). Database failures (disk full, an unwritable state directory) raise OSError;
    a file that is no database at all is moved aside (`telemetry.db.corrupt`) and an empty queue started."""

    def __init__(self, path: Path, *, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("queue bounds must be positive")
        if max_bytes < 2 * disk_allowance(max_bytes):
            raise ValueError(f"queue max_bytes {max_bytes} is too small: {disk_allowance(max_bytes)} of it is "
                             "kept for the WAL")
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.row_budget = max_bytes - disk_allowance(max_bytes)  # what `bytes` (rows) may reach
        self._lock = threading.Lock()
        try:
            self._db, count, size = self._open()
        except sqlite3.DatabaseError as e:  # not a database any more (a torn or overwritten file): start afresh
            aside = path.with_name(f"{path.name}.corrupt")
            log.warning("telemetry queue %s is unreadable (%s); moved to %s, starting an empty queue", path, e,
                        aside.name)
            for suffix in ("-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            try:
                os.replace(path, aside)
                self._db, count, size = self._open()
            except (OSError, sqlite3.Error) as again:
                raise OSError(f"telemetry queue {path}: {again}") from again
        except sqlite3.Error as e:
            raise OSError(f"telemetry queue {path}: {e}") from e
        self._count = int(count)
        self._bytes = int(size) + self._count * ROW_OVERHEAD

    def _open(self) -> tuple[sqlite3.Connection, int, int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # before the first table: fixes the file's page size
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            pages = wal_pages(self.max_bytes)
            db.execute(f"PRAGMA wal_autocheckpoint={pages}")
            db.execute(f"PRAGMA journal_size_limit={pages * WAL_FRAME + 32}")
            db.executescript(_SCHEMA)
            count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM queue").fetchone()
            self._meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except BaseException:
            db.close()
            raise
        return db, int(count), int(size)

    # --- figures ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        """Stored (compressed) payload bytes plus ROW_OVERHEAD per row: what `row_budget` (max_bytes less the
        WAL allowance) is checked against."""
        return self._bytes

    @property
    def telemetry_dropped_total(self) -> int:
        return self._meta.get("telemetry_dropped", 0)

    @property
    def events_dropped_total(self) -> int:
        return self._meta.get("events_dropped", 0)

    def last_seq(self, kind: int) -> int:
        return self._meta.get(f"seq.{kind}", 0)

    # --- writing ---------------------------------------------------------------------------------------------

    def put(self, kind: int, leaf: str, payload: dict[str, Any]) -> int | None:
        """Give `payload` the next sequence number of `kind` (`seq`: 1, 2, ... per device, persisted; a refused
        message uses none) and store it. Returns the seq, or None when the bounds refused it."""
        if kind not in KINDS:
            raise ValueError(f"unknown queue kind {kind!r}")
        with self._lock:
            seq = self.last_seq(kind) + 1
            body = encode(json.dumps({**payload, "seq": seq}, separators=(",", ":")).encode())
            need = len(body) + ROW_OVERHEAD
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    if not self._make_room(kind, need):
                        key = "telemetry_dropped" if kind == TELEMETRY else "events_dropped"
                        self._bump(key, 1)
                        self._db.execute("COMMIT")
                        if kind == EVENT:
                            log.warning("telemetry queue full of events (%d); an event was refused", self._count)
                        return None
                    self._db.execute("INSERT INTO queue (kind, leaf, codec, payload) VALUES (?, ?, ?, ?)",
                                     (kind, leaf, CODEC, body))
                    self._set(f"seq.{kind}", seq)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    self._reload()
                    raise
            except sqlite3.Error as e:
                raise OSError(f"telemetry queue {self.path}: {e}") from e
            self._count += 1
            self._bytes += need
            return seq

    def _make_room(self, kind: int, need: int) -> bool:
        """Within the open transaction: drop the oldest telemetry until `need` more bytes and one more row fit.
        False (nothing dropped for it) when it cannot fit: only events would have to go."""
        if need > self.row_budget:
            return False
        if self._count + 1 <= self.max_messages and self._bytes + need <= self.row_budget:
            return True
        rows = self._db.execute("SELECT id, LENGTH(payload) FROM queue WHERE kind = ? ORDER BY id",
                                (TELEMETRY,))
        victims: list[int] = []
        count, size = self._count, self._bytes
        for row_id, length in rows:
            if count + 1 <= self.max_messages and size + need <= self.row_budget:
                break
            victims.append(row_id)
            count -= 1
            size -= length + ROW_OVERHEAD
        rows.close()
        if not (count + 1 <= self.max_messages and size + need <= self.row_budget):
            return False  # not even every telemetry row would do: keep them, refuse this one
        if victims:
            self._db.execute("DELETE FROM queue WHERE kind = ? AND id <= ?", (TELEMETRY, victims[-1]))
            self._bump("telemetry_dropped", len(victims))
            self._count, self._bytes = count, size
        return True

    # --- reading and removing --------------------------------------------------------------------------------

    def peek(self, limit: int) -> list[Queued]:
        """The oldest `limit` messages, in the order they were put."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT id, kind, leaf, codec, payload FROM queue ORDER BY id LIMIT ?",
                                        (limit,)).fetchall()
            except sqlite3.Error as e:
                raise OSError(f"telemetry queue {self.path}: {e}") from e
        return [Queued(int(i), int(k), str(leaf), decode(int(c), bytes(p))) for i, k, leaf, c, p in rows]

    def remove_through(self, last_id: int) -> int:
        """Remove every message up to and including `last_id` (the acknowledged prefix of a peeked batch; rows
        dropped meanwhile are simply gone already). Returns how many were removed."""
        with self._lock:
            try:
                # one statement: the rows go and their sizes come back for the figures
                lengths = self._db.execute("DELETE FROM queue WHERE id <= ? RETURNING LENGTH(payload)",
                                           (last_id,)).fetchall()
                count, size = len(lengths), sum(n for (n,) in lengths)
            except sqlite3.Error as e:
                raise OSError(f"telemetry queue {self.path}: {e}") from e
            self._count -= int(count)
            self._bytes -= int(size) + int(count) * ROW_OVERHEAD
            return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- meta ------------------------------------------------------------------------------------------------

    def _bump(self, key: str, n: int) -> None:
        self._set(key, self._meta.get(key, 0) + n)

    def _set(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                         (key, value, value))
        self._meta[key] = value

    def _reload(self) -> None:
        """After a rolled-back transaction: the in-memory figures from the database again."""
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM queue").fetchone()
        self._count = int(count)
        self._bytes = int(size) + self._count * ROW_OVERHEAD
        self._meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
