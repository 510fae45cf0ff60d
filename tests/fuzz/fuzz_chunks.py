"""Fuzz the signed chunk plan and chunk handling (agent.trust.chunks, the MQTT fetcher's partial file).

Input: `>IIB` length, chunk_size, flags; then the target's bytes (the first `length` of the body, or all of it if
shorter), then chunk arrivals, each `>HH` index, size and that many payload bytes. Flag bit 2: the plan instead
comes from the body as JSON `{"sha256", "length", "chunk_size", "chunks"}` (values of any JSON type, as signed
custom metadata could hold them), and every arrival follows it. Flag bit 0: a partial file left from an earlier run
(the bytes after the arrivals) is resumed; bit 1: the last chunk hash of the plan is stale (another chunk's).

Invariants: an accepted plan is consistent (chunk size within its bound, as many lowercase sha256 hashes as
ceil(length / chunk_size)); an accepted chunk (`check_chunk`, the fetcher's `_check_and_store`) has an index in the
plan and exactly its signed length and hash; every slot the partial file is trusted to hold (`stored_slots` on
resume, the stored set after arrivals) reads back as its signed bytes; a file whose every slot is stored is the
target (its sha256 is the plan's).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from dataclasses import dataclass

from agent.errors import BundleRejected
from agent.trust.chunks import MAX_CHUNK_SIZE, ChunkPlan, chunk_hashes, is_sha256
from agent.trust.fetcher import FetchError
from agent.trust.mqtt_fetcher import MqttFetcher, _PartialFile, stored_slots
from tests.fuzz.common import check, scratch

_DIR = scratch("chunks")
_HEADER = struct.Struct(">IIB")
_ARRIVAL = struct.Struct(">HH")
MAX_ARRIVALS = 64


@dataclass
class Message:
    topic: str
    payload: bytes
    acked: bool = False

    def ack(self) -> None:
        self.acked = True


def _fetcher() -> MqttFetcher:
    """The MQTT fetcher's chunk side alone: no client (only the partial-file and chunk-checking methods run)."""
    f = MqttFetcher.__new__(MqttFetcher)
    f._plans = {}
    f.partial_dir = _DIR
    f.max_chunk_size = MAX_CHUNK_SIZE
    f.chunks_stored = 0
    return f


def _plan(flags: int, length: int, chunk_size: int, body: bytes) -> tuple[ChunkPlan, bytes, int]:
    """The plan, the target it signs (b"" when the plan came from JSON) and how many body bytes were used."""
    if flags & 4:
        end = body.find(b"\n")
        end = len(body) if end < 0 else end
        try:
            doc = json.loads(body[:end])
        except (ValueError, RecursionError):
            raise BundleRejected("not JSON", reason="bad_chunk_plan") from None
        if not isinstance(doc, dict):
            raise BundleRejected("not an object", reason="bad_chunk_plan")
        plan = ChunkPlan.create(doc.get("sha256"), doc.get("length"), doc.get("chunk_size"), doc.get("chunks"))
        return plan, b"", end + 1
    target = body[:length]
    hashes = chunk_hashes(target, chunk_size) if chunk_size >= 1 else []
    if flags & 2 and len(hashes) > 1:
        hashes[-1] = hashes[0]
    plan = ChunkPlan.create(hashlib.sha256(target).hexdigest(), length, chunk_size, hashes)
    return plan, target, len(target)


def check_plan(plan: ChunkPlan) -> None:
    check(type(plan.length) is int and plan.length >= 0, f"length {plan.length!r}")
    check(type(plan.chunk_size) is int and 0 < plan.chunk_size <= MAX_CHUNK_SIZE, f"chunk_size {plan.chunk_size!r}")
    check(plan.count == math.ceil(plan.length / plan.chunk_size), f"{plan.count} chunks for {plan.length} bytes")
    check(plan.count * plan.chunk_size >= plan.length, "the chunks do not cover the target")
    check(plan.count == 0 or (plan.count - 1) * plan.chunk_size < plan.length, "a chunk lies past the end")
    check(is_sha256(plan.sha256) and all(is_sha256(h) for h in plan.chunk_hashes), "hashes")
    check(sum(plan.chunk_length(i) for i in range(plan.count)) == plan.length, "chunk lengths do not add up")


def test_one_input(data: bytes) -> None:
    if len(data) < _HEADER.size:
        return
    length, chunk_size, flags = _HEADER.unpack_from(data)
    body = data[_HEADER.size:]
    try:
        plan, target, used = _plan(flags, length, chunk_size, body)
    except BundleRejected as e:
        check(e.reason == "bad_chunk_plan", f"plan refused as {e.reason}")
        return
    check_plan(plan)
    if plan.length > 1 << 20:  # a JSON plan may sign a huge target: its partial file is not worth creating here
        return
    rest = body[used:]
    arrivals: list[tuple[int, bytes]] = []
    while len(rest) >= _ARRIVAL.size and len(arrivals) < MAX_ARRIVALS:
        index, size = _ARRIVAL.unpack_from(rest)
        arrivals.append((index, rest[_ARRIVAL.size:_ARRIVAL.size + size]))
        rest = rest[_ARRIVAL.size + size:]

    fetcher = _fetcher()
    path = fetcher.partial_path(plan.sha256)
    if flags & 1:
        path.write_bytes(rest)  # what an earlier run (or a torn write, or anyone with the disk) left there
    else:
        path.unlink(missing_ok=True)
    try:
        part, stored = fetcher._open_partial(plan)
        try:
            handle(fetcher, plan, part, stored, arrivals)
            if not flags & 6 and plan.count and len(stored) == plan.count:  # a plan made from `target`, as signed
                check(path.read_bytes() == target, "every chunk stored, but the file is not the signed target")
        finally:
            part.close()
    finally:
        path.unlink(missing_ok=True)


def handle(fetcher: MqttFetcher, plan: ChunkPlan, part: _PartialFile, stored: set[int],
           arrivals: list[tuple[int, bytes]]) -> None:
    check(os.fstat(part._fd).st_size == plan.length, "the partial file is not the target's length")
    _check_stored(plan, part, stored, "resumed")
    names = {f"chunks/{i}": i for i in range(min(plan.count, 1 << 16))}
    for index, payload in arrivals:
        try:
            plan.check_chunk(index, payload)
            good = True
        except BundleRejected as e:
            check(e.reason in ("chunk_mismatch", "too_large", "hash_mismatch"), f"chunk refused as {e.reason}")
            good = False
        if good:
            check(0 <= index < plan.count and len(payload) == plan.chunk_length(index)
                  and hashlib.sha256(payload).hexdigest() == plan.chunk_hashes[index], f"chunk {index} accepted")
        msg = Message(f"chunks/{index}", payload)
        before = set(stored)
        took = fetcher._check_and_store(plan, names, msg, part, stored, {}, {})
        check(took == (good and bool(payload) and index not in before), f"chunk {index}: stored {took}, valid {good}")
    _check_stored(plan, part, stored, "stored")
    check(stored_slots(part._fd, plan) >= stored, "a stored chunk is not found again on resume")
    for index in stored:
        try:
            fetcher._read_stored(part, plan, index, set(stored))
        except FetchError as e:
            raise AssertionError(f"stored chunk {index} reads back wrong: {e}") from e


def _check_stored(plan: ChunkPlan, part: _PartialFile, stored: set[int], what: str) -> None:
    for index in stored:
        check(0 <= index < plan.count, f"{what} slot {index} is not in the plan")
        data = part.read(index)
        check(hashlib.sha256(data).hexdigest() == plan.chunk_hashes[index], f"{what} slot {index} is not as signed")


def main() -> None:
    from tests.fuzz.runner import fuzz

    fuzz("chunks", sys.argv)


if __name__ == "__main__":
    main()
