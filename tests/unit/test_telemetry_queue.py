"""The store-and-forward queue (agent/telemetry/queue.py) on real SQLite files: order, sequence numbers, the drop
policy (oldest telemetry first, never events), surviving a reopen, and the bounds on disk."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.telemetry.queue import EVENT, ROW_OVERHEAD, TELEMETRY, DiskQueue


def _open(tmp_path: Path, max_messages: int = 1000, max_bytes: int = 10_000_000) -> DiskQueue:
    return DiskQueue(tmp_path / "telemetry.db", max_messages=max_messages, max_bytes=max_bytes)


def _docs(q: DiskQueue, n: int = 10**6) -> list[dict[str, Any]]:
    return [json.loads(item.payload) for item in q.peek(n)]


def _telemetry(i: int) -> dict[str, Any]:
    """About the size and shape of a real message: the same keys every time, changing values."""
    return {"schema": 1, "device": "dev-1", "name": "digits", "version": 3, "ts": 1.7e9 + i, "requests_total": i,
            "latency_ms_buckets": [i % 7, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "cpu_percent": (i * 37 % 1000) / 10,
            "rss_bytes": 78_000_000 + i * 4096, "net_rx_bytes": 10**8 + i * 1234, "drift_status": "ok"}


def test_fifo_across_kinds_with_a_sequence_per_kind(tmp_path: Path) -> None:
    q = _open(tmp_path)
    puts = [(TELEMETRY, "telemetry"), (EVENT, "events"), (TELEMETRY, "telemetry"), (EVENT, "events"),
            (TELEMETRY, "telemetry")]
    seqs = [q.put(kind, leaf, {"n": i}) for i, (kind, leaf) in enumerate(puts)]
    assert seqs == [1, 1, 2, 2, 3]
    items = q.peek(10)
    assert [json.loads(it.payload)["n"] for it in items] == [0, 1, 2, 3, 4]
    assert [it.leaf for it in items] == [leaf for _, leaf in puts]
    assert [json.loads(it.payload)["seq"] for it in items] == seqs
    # removal only of the acknowledged prefix
    assert q.remove_through(items[1].id) == 2
    assert [d["n"] for d in _docs(q)] == [2, 3, 4]
    assert len(q) == 3


def test_survives_reopen_with_messages_sequences_and_counters(tmp_path: Path) -> None:
    q = _open(tmp_path, max_messages=3)
    for i in range(5):  # two oldest telemetry dropped
        q.put(TELEMETRY, "telemetry", {"n": i})
    q.put(EVENT, "events", {"e": 0})  # drops one more telemetry
    before = _docs(q)
    q.close()
    q = _open(tmp_path, max_messages=3)  # a restart
    assert _docs(q) == before
    assert q.telemetry_dropped_total == 3
    assert len(q) == 3 and q.bytes > 0
    assert q.put(TELEMETRY, "telemetry", {"n": 5}) == 6  # numbering goes on, it does not restart at 1
    assert q.put(EVENT, "events", {"e": 1}) == 2


def test_sequence_survives_the_queue_being_emptied(tmp_path: Path) -> None:
    q = _open(tmp_path)
    q.put(TELEMETRY, "telemetry", {})
    q.remove_through(q.peek(1)[0].id)
    q.close()
    assert _open(tmp_path).put(TELEMETRY, "telemetry", {}) == 2


def test_full_drops_the_oldest_telemetry_never_events(tmp_path: Path) -> None:
    q = _open(tmp_path, max_messages=4)
    q.put(EVENT, "events", {"e": 0})
    for i in range(3):
        q.put(TELEMETRY, "telemetry", {"t": i})
    q.put(EVENT, "events", {"e": 1})  # full: t0 goes
    q.put(TELEMETRY, "telemetry", {"t": 3})  # t1 goes
    assert [(d.get("e"), d.get("t")) for d in _docs(q)] == [(0, None), (None, 2), (1, None), (None, 3)]
    assert q.telemetry_dropped_total == 2 and q.events_dropped_total == 0
    q.put(EVENT, "events", {"e": 2})
    q.put(EVENT, "events", {"e": 3})  # every telemetry gone now
    assert [d["e"] for d in _docs(q)] == [0, 1, 2, 3]
    assert q.telemetry_dropped_total == 4


def test_full_of_events_refuses_new_messages_and_keeps_every_stored_event(tmp_path: Path) -> None:
    q = _open(tmp_path, max_messages=3)
    for i in range(3):
        q.put(EVENT, "events", {"e": i})
    assert q.put(TELEMETRY, "telemetry", {"t": 0}) is None
    assert q.put(EVENT, "events", {"e": 3}) is None
    assert [d["e"] for d in _docs(q)] == [0, 1, 2]
    assert (q.telemetry_dropped_total, q.events_dropped_total) == (1, 1)
    assert q.put(EVENT, "events", {"e": 4}) is None
    q.remove_through(q.peek(1)[0].id)  # one sent: room again, and the refused ones used no seq
    assert q.put(EVENT, "events", {"e": 5}) == 4


def test_byte_bound_drops_oldest_telemetry_and_holds_on_disk(tmp_path: Path) -> None:
    max_bytes = 1 << 20
    q = _open(tmp_path, max_messages=10**6, max_bytes=max_bytes)
    q.put(EVENT, "events", {"e": 0, "reason": "x" * 200})
    n = 30_000
    for i in range(n):
        q.put(TELEMETRY, "telemetry", _telemetry(i))
    assert q.bytes <= max_bytes
    docs = _docs(q)
    assert docs[0]["e"] == 0  # the event stayed
    kept = [d["requests_total"] for d in docs[1:]]
    assert kept == list(range(n - len(kept), n))  # the newest, in order
    assert q.telemetry_dropped_total == n - len(kept) > 0
    q.close()
    with sqlite3.connect(tmp_path / "telemetry.db") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = sum(p.stat().st_size for p in tmp_path.glob("telemetry.db*"))
    assert size <= max_bytes * 1.1, f"{size} bytes on disk for a bound of {max_bytes}"


def test_target_100k_realistic_messages_fit_50_mb(tmp_path: Path) -> None:
    """The issue's target: 100,000 messages in at most 50 MB (the default bounds). Measured on the encoded size
    the bound counts, with a realistic message; that the file follows that figure is the test above."""
    q = _open(tmp_path, max_messages=100_000, max_bytes=50_000_000)
    for i in range(2000):
        q.put(TELEMETRY, "telemetry", _telemetry(i))
    per_message = q.bytes / len(q)
    assert per_message * 100_000 <= 50_000_000, per_message
    assert per_message > ROW_OVERHEAD


def test_a_file_that_is_no_database_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "telemetry.db").write_bytes(b"this is not sqlite" * 100)
    q = _open(tmp_path)
    assert len(q) == 0 and q.put(EVENT, "events", {}) == 1
    assert (tmp_path / "telemetry.db.corrupt").exists()


def test_bounds_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _open(tmp_path, max_messages=0)
    with pytest.raises(ValueError):
        _open(tmp_path).put(7, "x", {})
