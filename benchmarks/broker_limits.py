"""Probe what each broker kind edgeship is tested on does with the MQTT features the project leans on, and write one
JSON file: the table in docs/scaling.md comes from it.

    python benchmarks/broker_limits.py [--out benchmarks/results/broker_limits.json] [--brokers KIND,...]

Each kind of examples/brokers.py is started fresh on free loopback ports (never the machine's own brokers) and
probed through the project's own client (`agent.transport.mqtt.MqttClient`, which negotiates MQTT 5 and falls back
to 3.1.1) or, for the last will, a raw MQTT 3.1.1 CONNECT on a socket that is then dropped without DISCONNECT:

- protocol: the version the client ended up with (MQTT 5 features: request/response properties, Receive Maximum,
  Maximum Packet Size are there only with 5).
- max message: retained QoS 1 payloads of 64 KiB, 128 KiB, ... doubling up to 64 MiB, each published and read back;
  the largest that came back byte-identical, and what happened to the next one.
- a topic holding `.` (`x/timestamp.json`): is it refused, or read back under which name?
- retained through a wildcard subscription (`p/+`), a retained delete (empty payload), QoS 2 (publish and PUBCOMP).
- last will: delivered to a subscriber when the connection drops, and retained if asked.
- retained across a clean restart of the broker (Mosquitto with `persistence true`).

Progress goes to stderr, a table to stdout. Exit status 0 (a measurement), 1 when a broker is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import socket
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.errors import TransportError  # noqa: E402
from agent.transport.mqtt import MqttClient  # noqa: E402
from benchmarks._common import code_state, load_average, machine_info, write_json  # noqa: E402
from examples.brokers import KINDS, BrokerMissing, launch, versions  # noqa: E402

log = logging.getLogger("broker_limits")
PREFIX = "edgeship/limits/"
SIZES = [64 << 10 << i for i in range(11)]  # 64 KiB .. 64 MiB
BIG_PACKET = 128 << 20  # our client's own receive limit for this probe only (MQTT caps it at 256 MiB - 1)


def _client(url: str, name: str) -> MqttClient:
    c = MqttClient(url, f"limits-{name}-{uuid.uuid4().hex[:6]}", prefix=PREFIX, max_packet_size=BIG_PACKET)
    c.connect(timeout=10)
    return c


def max_message(url: str) -> dict[str, Any]:
    ok, failure = 0, None
    for size in SIZES:
        topic = f"{PREFIX}size/{size}"
        payload = os.urandom(size)
        try:
            with _client(url, "pub") as pub:
                pub.publish(topic, payload, retain=True, qos=1, wait=True, timeout=60)
            with _client(url, "sub") as sub:
                got = sub.get_retained([topic], timeout=60).get(topic)
        except TransportError as e:
            failure = f"{size} B: {e}"
            break
        if got != payload:
            failure = f"{size} B: not read back ({'nothing' if got is None else f'{len(got)} B'})"
            break
        ok = size
        with contextlib.suppress(TransportError), _client(url, "del") as c:
            c.delete_retained(topic)
    return {"max_ok_bytes": ok, "next_failure": failure}


def dotted_topic(url: str) -> dict[str, Any]:
    topic = f"{PREFIX}tuf/timestamp.json"
    try:
        with _client(url, "dot") as c:
            c.publish(topic, b"dotted", retain=True, qos=1, wait=True, timeout=10)
            exact = c.get_retained([topic], timeout=5).get(topic)
            seen: list[str] = []
            with c.subscribe_stream([f"{PREFIX}tuf/#"]) as s:
                while (m := s.get(timeout=1.0)) is not None:
                    seen.append(m.topic)
            c.delete_retained(topic)
    except TransportError as e:
        return {"outcome": f"refused: {e}"}
    return {"outcome": "read back" if exact == b"dotted" else "not read back under its own name",
            "names_seen_via_wildcard": seen}


def wildcard_retained(url: str) -> dict[str, Any]:
    with _client(url, "wild") as c:
        c.publish(f"{PREFIX}w/a", b"1", retain=True, qos=1, wait=True)
        c.publish(f"{PREFIX}w/b", b"2", retain=True, qos=1, wait=True)
        time.sleep(0.3)
        got: list[str] = []
        with c.subscribe_stream([f"{PREFIX}w/+"]) as s:
            while (m := s.get(timeout=2.0)) is not None:
                got.append(m.topic)
        exact = c.get_retained([f"{PREFIX}w/a"], timeout=5)
        # a retained delete: an empty retained payload
        c.delete_retained(f"{PREFIX}w/a")
        time.sleep(0.3)
        after_delete = c.get_retained([f"{PREFIX}w/a"], timeout=5)
        c.delete_retained(f"{PREFIX}w/b")
    return {"wildcard_delivers_retained": len(got), "exact_delivers_retained": len(exact),
            "retained_delete_clears": after_delete == {}}


def qos2(url: str) -> dict[str, Any]:
    try:
        with _client(url, "q2") as c:
            c.publish(f"{PREFIX}q2", b"x", retain=False, qos=2, wait=True, timeout=5)
    except TransportError as e:
        return {"publish_qos2": f"failed: {e}"}
    return {"publish_qos2": "PUBCOMP received"}


def _raw_connect_with_will(port: int, will_topic: str, will: bytes) -> socket.socket:
    cid = f"limits-will-{uuid.uuid4().hex[:6]}".encode()
    flags = 0x02 | 0x04 | 0x08 | 0x20  # clean session, will, will QoS 1, will retain
    body = (b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x05" + struct.pack("!H", len(cid)) + cid
            + struct.pack("!H", len(will_topic)) + will_topic.encode() + struct.pack("!H", len(will)) + will)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(bytes([0x10, len(body)]) + body)
    ack = s.recv(4)
    if ack[:1] != b"\x20" or ack[3:4] != b"\x00":
        raise RuntimeError(f"CONNECT with will refused: {ack!r}")
    return s


def last_will(url: str, port: int) -> dict[str, Any]:
    topic = f"{PREFIX}will/{uuid.uuid4().hex[:6]}"
    with _client(url, "willsub") as c, c.subscribe_stream([topic]) as s:
        sock = _raw_connect_with_will(port, topic, b"offline")
        time.sleep(0.3)
        t0 = time.monotonic()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST, no DISCONNECT
        m = s.get(timeout=10)
        delay = time.monotonic() - t0
    with _client(url, "willret") as c:
        retained = c.get_retained([topic], timeout=5).get(topic)
        c.delete_retained(topic)
    return {"delivered": m is not None and m.payload == b"offline",
            "delivered_after_s": round(delay, 3) if m is not None else None, "retained": retained == b"offline"}


def survives_restart(broker: Any, url: str) -> bool:
    topic = f"{PREFIX}restart"
    with _client(url, "r1") as c:
        c.publish(topic, b"kept", retain=True, qos=1, wait=True)
    broker.stop()
    broker.start()
    with _client(broker.url, "r2") as c:
        return c.get_retained([topic], timeout=10).get(topic) == b"kept"


def probe(kind: str, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    if kind.startswith("mosquitto"):
        broker: Any = launch(kind, work, persistent=True)
    else:
        broker = launch(kind, work)
    boot = time.perf_counter() - t0
    try:
        with _client(broker.url, "proto") as c:
            protocol = c.protocol
        out: dict[str, Any] = {"broker": kind, "protocol": protocol, "boot_seconds": round(boot, 2)}
        for name, fn in (("dotted_topic", lambda: dotted_topic(broker.url)),
                         ("wildcard", lambda: wildcard_retained(broker.url)),
                         ("qos2", lambda: qos2(broker.url)),
                         ("will", lambda: last_will(broker.url, broker.port)),
                         ("retained_survives_restart", lambda: survives_restart(broker, broker.url)),
                         ("max_message", lambda: max_message(broker.url))):  # last: a refused size may break things
            log.info("%s: %s", kind, name)
            try:
                out[name] = fn()
            except (TransportError, RuntimeError, OSError) as e:
                out[name] = {"error": str(e)}
        return out
    finally:
        broker.close()


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| broker | MQTT | max retained message read back | `.` in a topic | retained via wildcard | "
             "retained delete | QoS 2 | will (retained) | retained after restart |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mm = r["max_message"]
        size = f"{mm.get('max_ok_bytes', 0) / 2**20:g} MiB" if "max_ok_bytes" in mm else mm.get("error")
        wild, will, q2 = r["wildcard"], r["will"], r["qos2"]
        lines.append(
            f"| {r['broker']} | {r['protocol']} | {size} | {r['dotted_topic'].get('outcome', r['dotted_topic'])} | "
            f"{wild.get('wildcard_delivers_retained', '?')} of 2 | {wild.get('retained_delete_clears', '?')} | "
            f"{q2.get('publish_qos2', q2)} | {will.get('delivered', '?')} ({will.get('retained', '?')}) | "
            f"{r['retained_survives_restart']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "broker_limits.json")
    parser.add_argument("--brokers", default=",".join(KINDS), help=f"comma-separated (default {','.join(KINDS)})")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--brokers: a comma-separated list of {', '.join(KINDS)}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    log.setLevel(logging.INFO)
    started, t0, load_start = dt.datetime.now(dt.UTC), time.perf_counter(), load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeship-limits-") as td:
        for kind in kinds:
            try:
                rows.append(probe(kind, Path(td) / kind))
            except BrokerMissing as e:
                print(f"broker_limits: {e}", file=sys.stderr)
                return 1
    machine = machine_info()
    machine["versions"].update(versions())
    write_json(args.out, {
        "benchmark": "broker_limits", "created": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/broker_limits.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "duration_seconds": round(time.perf_counter() - t0, 1), "code": code_state(), "machine": machine,
        "load_average": {"start": load_start, "end": load_average()}, "sizes_tried": SIZES, "brokers": rows})
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
