"""The gate grammar and its evaluation (packager/rollout/gates.py), and the figures a gate reads (figures.py)."""

from __future__ import annotations

import math

import pytest

from packager.errors import InputError
from packager.rollout.figures import DeviceWindow, figures, quantile
from packager.rollout.gates import Gate, evaluate, parse_gates

EXAMPLE = "parity>=0.99,latency_ms_p95<=1.2*baseline,error_rate<=0.01,drift_psi<0.25,rollbacks==0,offline<=0.05"


def test_the_issue_example_parses() -> None:
    gates = parse_gates(EXAMPLE)
    assert gates == (Gate("parity", ">=", 0.99), Gate("latency_ms_p95", "<=", 1.2, baseline=True),
                     Gate("error_rate", "<=", 0.01), Gate("drift_psi", "<", 0.25), Gate("rollbacks", "==", 0.0),
                     Gate("offline", "<=", 0.05))
    assert ",".join(str(g) for g in gates) == EXAMPLE


@pytest.mark.parametrize("text, gate", [
    (" error_rate <= 1e-2 ", Gate("error_rate", "<=", 0.01)),
    ("latency_ms_p99<baseline", Gate("latency_ms_p99", "<", 1.0, baseline=True)),
    ("latency_ms_p50 <= baseline * 1.5", Gate("latency_ms_p50", "<=", 1.5, baseline=True)),
    ("accuracy>.9", Gate("accuracy", ">", 0.9)),
    ("cpu_percent>=0.95*baseline", Gate("cpu_percent", ">=", 0.95, baseline=True)),
])
def test_accepted_forms(text: str, gate: Gate) -> None:
    assert parse_gates(text) == (gate,)


@pytest.mark.parametrize("text, needle", [
    ("latency<=5", "unknown metric 'latency'"),
    ("parity>=0.99,,error_rate<=0.01", "empty gate"),
    ("", "empty"),
    ("error_rate=<0.01", "unexpected character '='"),
    ("error_rate<=", "expected METRIC OP VALUE"),
    ("error_rate<=0.01 0.02", "right side"),
    ("error_rate<=2*control", "right side"),
    ("error_rate<=baseline*baseline", "right side"),
    ("error_rate<=0.01;rm", "unexpected character ';'"),
    ("error_rate!=0", "unexpected character '!'"),
    ("0.5<=error_rate", "metric name first"),
    ("rollbacks<=baseline", "rollbacks has no baseline"),
    ("error_rate<=1e999", "not finite"),
    ("error_rate<=nan", "right side"),
])
def test_refused_with_one_line(text: str, needle: str) -> None:
    with pytest.raises(InputError) as e:
        parse_gates(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_pass_fail_and_baseline() -> None:
    g = parse_gates("latency_ms_p95<=1.2*baseline")[0]
    assert evaluate(g, {"latency_ms_p95": 11.0}, {"latency_ms_p95": 10.0}).outcome == "pass"
    v = evaluate(g, {"latency_ms_p95": 13.0}, {"latency_ms_p95": 10.0})
    assert (v.outcome, v.observed, v.threshold) == ("fail", 13.0, pytest.approx(12.0))
    assert evaluate(parse_gates("rollbacks==0")[0], {"rollbacks": 1.0}, {}).outcome == "fail"
    assert evaluate(parse_gates("rollbacks==0")[0], {"rollbacks": 0.0}, {}).outcome == "pass"


@pytest.mark.parametrize("canary, control, needle", [
    ({}, {"error_rate": 0.0}, "no canary device"),
    ({"error_rate": None}, {}, "no canary device"),
    ({"error_rate": math.nan}, {}, "not a number"),
    ({"error_rate": math.inf}, {}, "not a number"),
])
def test_no_data_is_never_zero(canary: dict[str, float | None], control: dict[str, float | None],
                               needle: str) -> None:
    for text in ("error_rate<=0.01", "error_rate>=0"):  # NaN read as 0 would pass both
        v = evaluate(parse_gates(text)[0], canary, control)
        assert v.outcome == "no_data" and needle in v.reason


@pytest.mark.parametrize("control", [{}, {"latency_ms_p95": None}, {"latency_ms_p95": math.nan}])
def test_missing_baseline_is_no_data(control: dict[str, float | None]) -> None:
    v = evaluate(parse_gates("latency_ms_p95<=1.2*baseline")[0], {"latency_ms_p95": 5.0}, control)
    assert v.outcome == "no_data" and ("baseline" in v.reason or "control device" in v.reason)


# --- figures ---------------------------------------------------------------------------------------------------

BOUNDS = [1.0, 2.0, 5.0, None]


def telemetry(version: int, seq: int, requests: int, errors: int, buckets: list[int], **extra: object) -> dict:
    return {"version": version, "seq": seq, "requests_total": requests, "errors_total": errors,
            "rejected_total": 0, "latency_ms_bucket_bounds": BOUNDS, "latency_ms_buckets": buckets, **extra}


def test_quantile_interpolates_inside_a_bucket() -> None:
    assert quantile([1.0, 2.0, math.inf], [0, 10, 0], 0.5) == pytest.approx(1.5)
    assert quantile([1.0, 2.0, math.inf], [0, 0, 4], 0.95) == 2.0  # the open bucket: its lower bound
    assert quantile([1.0, 2.0], [0, 0], 0.5) is None


def test_window_counts_only_what_happened_in_it() -> None:
    # control: served v1 before the window; its counters since start are subtracted
    ctl = DeviceWindow("c", version_at_start=1)
    ctl.feed(telemetry(1, 10, 1000, 100, [0, 1000, 0, 0]))
    ctl.feed(telemetry(1, 11, 1100, 100, [0, 1000, 100, 0], parity_ok=True))
    # canary: switched to v2 in the window, counts from zero
    can = DeviceWindow("k", version_at_start=1)
    can.feed(telemetry(1, 5, 50, 0, [50, 0, 0, 0]))
    can.feed(telemetry(2, 6, 10, 1, [10, 0, 0, 0], parity_ok=False))
    c = figures([can], {"k": True}, set(), 2)
    b = figures([ctl], {"c": True}, set(), 1)
    assert (c["requests"], c["error_rate"], c["parity"], c["devices"]) == (10.0, pytest.approx(0.1), 0.0, 1.0)
    assert c["latency_ms_p95"] is not None and c["latency_ms_p95"] <= 1.0
    assert (b["requests"], b["error_rate"], b["parity"]) == (100.0, 0.0, 1.0)
    assert 2.0 <= b["latency_ms_p95"] <= 5.0  # type: ignore[operator]


def test_unknown_figures_stay_none_and_sets_count_members() -> None:
    w = DeviceWindow("a", version_at_start=1)
    w.feed({"version": 1, "seq": 1, "error_rate": math.nan, "drift_psi": None})
    f = figures([w, DeviceWindow("b")], {"a": True, "b": False}, {"b"}, 1)
    assert f["error_rate"] is None and f["drift_psi"] is None and f["latency_ms_p95"] is None
    assert f["parity"] is None
    assert f["offline"] == 0.5 and f["rollbacks"] == 1.0 and f["members"] == 2.0
    assert figures([], {}, set(), 1)["offline"] is None


def test_a_restarted_agent_counts_from_zero_and_late_messages_are_ignored() -> None:
    w = DeviceWindow("a", version_at_start=1)
    w.feed(telemetry(1, 1, 100, 0, [100, 0, 0, 0]))
    w.feed(telemetry(1, 2, 5, 1, [5, 0, 0, 0]))  # counters went down: the agent restarted
    w.feed(telemetry(1, 1, 100, 0, [100, 0, 0, 0]))  # a late redelivery
    f = figures([w], {}, set(), 1)
    assert f["requests"] == 5.0 and f["error_rate"] == pytest.approx(0.2)
