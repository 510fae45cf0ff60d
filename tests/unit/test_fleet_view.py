"""The fleet view's pure core: messages folded into rows, sequence gaps, event de-duplication, alarms, and
malformed or hostile messages skipped and counted (never a crash, never a made-up 0)."""

from __future__ import annotations

import io
import json
import random
from typing import Any

from rich.console import Console

from packager.fleet.table import render
from packager.fleet.view import MAX_PAYLOAD_BYTES, FleetView, alarms, event_key, seq_gaps

P = "edgeship/f1/"
FIXED = ("device_id", "online", "group", "name", "version", "state", "last_seen", "latency_ms_p95", "error_rate",
         "parity", "accuracy", "drift_psi", "cpu_percent", "rss_bytes", "temp_celsius", "seq_gaps")


def state(dev: str, **over: Any) -> bytes:
    doc = {"status": "online", "device": dev, "group": "lab", "agent_version": "0.1", "state": "IDLE",
           "bundle": {"name": "digits", "version": 3, "format": "onnx"}, "candidate": None,
           "serving": {"name": "digits", "version": 3, "format": "onnx"}, "no_deployment": False,
           "since": 1000.0, "at": 1001.0}
    doc.update(over)
    return json.dumps(doc).encode()


def telemetry(dev: str, seq: int, **over: Any) -> bytes:
    doc = {"schema": 1, "device": dev, "name": "digits", "version": 3, "ts": 1100.0 + seq, "seq": seq,
           "latency_ms_p95": 4.5, "error_rate": 0.01, "parity_ok": True, "accuracy": 0.93, "drift_psi": 0.02,
           "drift_status": "ok", "cpu_percent": 12.0, "rss_bytes": 60_000_000, "temp_celsius": 51.5}
    doc.update(over)
    return json.dumps(doc).encode()


def topic(dev: str, leaf: str) -> str:
    return f"{P}devices/{dev}/{leaf}"


def test_state_and_telemetry_fold_into_one_row_with_the_fixed_names() -> None:
    v = FleetView(P)
    v.feed(topic("a", "state"), state("a"))
    v.feed(topic("a", "telemetry"), telemetry("a", 7))
    v.feed(topic("a", "telemetry"), telemetry("a", 8, latency_ms_p95=6.0))
    (row,) = v.to_json()["devices"]
    assert set(FIXED) <= set(row)
    assert row | {"alarms": []} == row
    assert (row["device_id"], row["online"], row["group"], row["name"], row["version"], row["state"]) == \
        ("a", True, "lab", "digits", 3, "IDLE")
    assert row["latency_ms_p95"] == 6.0 and row["error_rate"] == 0.01 and row["parity"] is True
    assert (row["accuracy"], row["drift_psi"], row["cpu_percent"], row["rss_bytes"], row["temp_celsius"]) == \
        (0.93, 0.02, 12.0, 60_000_000, 51.5)
    assert row["seq_gaps"] == 0 and row["last_seen"] == 1108.0
    assert row["telemetry_dropped_total"] is None  # this agent did not say
    v.feed(topic("a", "telemetry"), telemetry("a", 10, telemetry_dropped_total=4, events_dropped_total=0))
    (row,) = v.to_json()["devices"]
    assert (row["seq_gaps"], row["telemetry_dropped_total"], row["events_dropped_total"]) == (1, 4, 0)
    assert v.skipped == {}


def test_the_last_will_marks_a_device_offline_and_vouches_for_nothing_else() -> None:
    v = FleetView(P)
    v.feed(topic("a", "state"), state("a"))
    v.feed(topic("a", "state"), json.dumps({"status": "offline", "device": "a"}).encode())
    (row,) = v.devices()
    assert row.online is False and row.group is None and row.state is None
    assert alarms(row) == ["offline"]


def test_unknown_figures_are_none_never_zero() -> None:
    v = FleetView(P)
    v.feed(topic("a", "state"), state("a", bundle=None, serving=None))
    (row,) = v.to_json()["devices"]
    assert all(row[k] is None for k in FIXED if k not in ("device_id", "online", "group", "state", "last_seen"))
    # figures of the wrong type (or missing) are unknown; a real 0 stays 0
    v.feed(topic("a", "telemetry"), telemetry("a", 1, temp_celsius=None, cpu_percent="12", rss_bytes=1.5,
                                              error_rate=True, parity_ok="yes", accuracy=0, drift_psi=[1]))
    (row,) = v.to_json()["devices"]
    assert row["temp_celsius"] is None and row["cpu_percent"] is None and row["rss_bytes"] is None
    assert row["error_rate"] is None and row["parity"] is None and row["drift_psi"] is None
    assert row["accuracy"] == 0.0
    assert row["seq_gaps"] is None  # one sequence number tells nothing about gaps


def test_missing_sequence_numbers_are_counted_duplicates_and_late_arrivals_are_not() -> None:
    assert seq_gaps(set()) is None and seq_gaps({5}) is None
    assert seq_gaps({1, 2, 4, 7}) == 3
    v = FleetView(P)
    for seq in (10, 11, 13, 13, 16):
        v.feed(topic("a", "telemetry"), telemetry("a", seq, cpu_percent=float(seq)))
    assert v.rows["a"].seq_gaps == 3  # 12, 14, 15
    v.feed(topic("a", "telemetry"), telemetry("a", 12, cpu_percent=99.0))  # flushed late from the agent's queue
    row = v.rows["a"]
    assert row.seq_gaps == 2
    assert row.cpu_percent == 16.0 and row.telemetry_seq == 16  # the figures stay the newest


def test_an_older_state_does_not_replace_a_newer_one() -> None:
    v = FleetView(P)
    v.feed(topic("a", "state"), state("a", state="PROBATION", at=2000.0))
    v.feed(topic("a", "state"), state("a", state="DOWNLOAD", at=1500.0))
    assert v.rows["a"].state == "PROBATION"


def test_state_shows_what_serves_and_the_candidate() -> None:
    v = FleetView(P)
    v.feed(topic("a", "state"), state("a", state="PROBATION", candidate={"name": "digits", "version": 4,
                                                                          "format": "onnx"},
                                      serving={"name": "digits", "version": 4, "format": "onnx"}))
    row = v.rows["a"]
    assert (row.version, row.candidate_version, row.state) == (4, 4, "PROBATION")


def test_alarm_rules() -> None:
    v = FleetView(P)
    v.feed(topic("a", "telemetry"), telemetry("a", 1, drift_status="alarm", drift_psi=0.4, parity_ok=False,
                                              error_rate=0.2))
    assert alarms(v.rows["a"]) == ["drift", "parity", "errors"]
    assert alarms(v.rows["a"], error_rate_alarm=0.5) == ["drift", "parity"]
    v.feed(topic("b", "telemetry"), telemetry("b", 1, drift_status="warn", parity_ok=None, error_rate=None))
    assert alarms(v.rows["b"]) == []  # unknown raises nothing; warn is not an alarm


def test_group_filter() -> None:
    v = FleetView(P)
    v.feed(topic("a", "state"), state("a", group="lab"))
    v.feed(topic("b", "state"), state("b", group="field"))
    v.feed(topic("c", "state"), json.dumps({"status": "offline", "device": "c"}).encode())
    assert [r.device_id for r in v.devices("lab")] == ["a"]
    assert [r.device_id for r in v.devices()] == ["a", "b", "c"]


def test_malformed_and_hostile_messages_are_skipped_and_counted() -> None:
    v = FleetView(P)
    v.feed(topic("a", "state"), state("a"))
    v.feed(topic("a", "telemetry"), telemetry("a", 1))
    before = json.dumps(v.to_json()["devices"])
    bad: list[tuple[str, bytes, str]] = [
        (topic("a", "telemetry"), b"not json", "not_json"),
        (topic("a", "telemetry"), b"\xff\xfe", "not_json"),
        (topic("a", "telemetry"), b"[1, 2]", "not_an_object"),
        (topic("a", "telemetry"), b'{"schema": 1, "device": "a", "cpu_percent": NaN}', "not_json"),
        (topic("a", "telemetry"), b" " * MAX_PAYLOAD_BYTES + b"{}", "too_large"),
        (topic("a", "telemetry"), b"[" * 50_000 + b"]" * 50_000, "not_json"),  # deeper than Python recurses
        (topic("a", "telemetry"), telemetry("a", 2, schema=2), "unknown_schema"),
        (topic("a", "telemetry"), telemetry("a", 2, schema=True), "unknown_schema"),
        (topic("a", "telemetry"), telemetry("b", 2), "device_mismatch"),
        (topic("a", "state"), state("a", status="maybe"), "bad_status"),
        (topic("a", "state"), state("b", state="ROLLBACK"), "device_mismatch"),
        (topic("a", "events"), b'{"device": "a"}', "not_an_event"),
        (f"{P}devices/a b/state", state("a b"), "bad_device_id"),
        (f"{P}devices/a/x/state", state("a"), "unexpected_topic"),
        ("elsewhere/devices/a/state", state("a"), "unexpected_topic"),
    ]
    for t, payload, _ in bad:
        assert v.feed(t, payload) is None
    expected: dict[str, int] = {}
    for _, _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(v.skipped) == expected
    assert json.dumps(v.to_json()["devices"]) == before


def test_random_garbage_never_raises() -> None:
    rng = random.Random(9)
    values: list[Any] = [None, True, 0, -1, 2**70, 1e308, "x", "\x1b[31m", [], {}, {"name": 1}, "a" * 500]
    keys = ["schema", "device", "seq", "ts", "at", "status", "group", "state", "bundle", "serving", "candidate",
            "latency_ms_p95", "error_rate", "parity_ok", "accuracy", "drift_psi", "cpu_percent", "rss_bytes",
            "temp_celsius", "event", "from", "to", "name", "version"]
    v = FleetView(P)
    for _ in range(3000):
        doc = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, len(keys)))}
        if rng.random() < 0.5:
            doc["schema"], doc["device"] = 1, "a"
        v.feed(topic("a", rng.choice(["state", "telemetry", "events"])), json.dumps(doc).encode())
        v.feed(topic("a", "telemetry"), bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))))
    for row in v.devices():
        assert row.name is None or row.name.isprintable()
        Console(file=io.StringIO(), width=200).print(render([row]))
    json.dumps(v.to_json())


def test_event_dedup_keys_on_seq_else_on_the_transition() -> None:
    v = FleetView(P)
    ev = {"device": "a", "from": "IDLE", "to": "CHECK", "event": "poll", "reason": None, "at": 5.0}
    first = v.feed(topic("a", "events"), json.dumps(ev).encode())
    assert first is not None and first.device_id == "a" and first.body == ev
    assert v.feed(topic("a", "events"), json.dumps(ev).encode()) is None  # QoS 1 redelivery
    assert v.feed(topic("b", "events"), json.dumps(ev | {"device": "b"}).encode()) is not None  # other device
    assert v.feed(topic("a", "events"), json.dumps(ev | {"at": 6.0}).encode()) is not None  # a later one
    numbered = ev | {"seq": 41}
    assert v.feed(topic("a", "events"), json.dumps(numbered).encode()) is not None
    # a re-send with the same seq is the same event even if a field was rebuilt (e.g. the reason text)
    assert v.feed(topic("a", "events"), json.dumps(numbered | {"reason": "x"}).encode()) is None
    assert v.events.duplicates == 2
    assert event_key("a", numbered) != event_key("a", numbered | {"seq": 42})


def test_table_shows_hostile_text_literally_and_marks_alarms() -> None:
    v = FleetView(P)
    v.feed(topic("a", "state"), state("a", state="[bold red]PWNED[/]"))
    v.feed(topic("b", "state"), state("b"))
    v.feed(topic("b", "telemetry"), telemetry("b", 1, drift_status="alarm", parity_ok=False))
    v.feed(topic("c", "state"), json.dumps({"status": "offline", "device": "c"}).encode())
    out = io.StringIO()
    Console(file=out, width=250).print(render(v.devices(), now=1200.0))
    text = out.getvalue()
    assert "[bold red]PWNED[/]" in text
    assert "OFFLINE" in text and "drift parity" in text and "FAIL" in text


def test_with_a_registry_the_group_is_the_registrys_and_unregistered_ids_are_ignored() -> None:
    """Device a (registered in g1) says it is in g2: with the repository's registry it stays in g1; x (not
    registered, or revoked: group_registry leaves revoked devices out) counts for nothing and is reported."""
    v = FleetView(P, registry={"a": "g1", "b": "g2"})
    v.feed(topic("a", "state"), state("a", group="g2"))
    v.feed(topic("b", "state"), state("b", group="g2"))
    v.feed(topic("x", "state"), state("x", group="g2"))
    v.feed(topic("x", "telemetry"), telemetry("x", 1))
    assert [r.device_id for r in v.devices("g2")] == ["b"]
    assert [r.device_id for r in v.devices("g1")] == ["a"]
    doc = v.to_json()
    assert [d["device_id"] for d in doc["devices"]] == ["a", "b"] and doc["ignored_devices"] == 1
    assert v.ignored == {"x"} and v.skipped == {}


def test_without_a_registry_the_state_names_the_group() -> None:
    v = FleetView(P)
    v.feed(topic("a", "state"), state("a", group="g2"))
    v.feed(topic("x", "state"), state("x", group="g2"))
    assert [r.device_id for r in v.devices("g2")] == ["a", "x"]
    assert "ignored_devices" not in v.to_json()
