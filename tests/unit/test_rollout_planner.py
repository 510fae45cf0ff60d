"""Waves, membership and the decision for a wave (packager/rollout/planner.py)."""

from __future__ import annotations

import pytest

from agent.deploy.rollout import bucket
from packager.errors import InputError
from packager.rollout.gates import Verdict, evaluate_all, parse_gates
from packager.rollout.planner import decide, members, parse_duration, parse_waves, split


def test_waves() -> None:
    assert parse_waves("1,10,50,100") == (1.0, 10.0, 50.0, 100.0)
    assert parse_waves("100") == (100.0,)
    for bad, needle in (("1,10,10,100", "increase"), ("0,100", "(0, 100]"), ("1,10,50", "must be 100"),
                        ("1,x,100", "comma-separated"), ("1,nan,100", "(0, 100]"), ("50,10,100", "increase")):
        with pytest.raises(InputError, match=needle.replace("(", r"\(").replace("]", r"\]")):
            parse_waves(bad)


def test_durations() -> None:
    assert parse_duration("5m") == 300.0 and parse_duration("3s") == 3.0 and parse_duration("2") == 2.0
    assert parse_duration("1.5h") == 5400.0 and parse_duration("500ms") == 0.5
    for bad in ("", "0s", "5 minutes", "-1s", "1e9999"):
        with pytest.raises(InputError):
            parse_duration(bad)


def test_membership_is_the_devices_own_bucket_and_grows_with_the_waves() -> None:
    ids = [f"dev-{i}" for i in range(400)]
    previous: set[str] = set()
    for percent in (1, 10, 50, 100):
        wave = set(members(ids, "lab", percent))
        assert previous <= wave  # a device in an early wave stays in every later one
        assert wave == {d for d in ids if bucket(d, "lab") < percent}
        previous = wave
    assert previous == set(ids)
    assert 100 < len(members(ids, "lab", 50)) < 300  # a hash, roughly uniform
    canary, control = split(ids + ids[:3], "lab", 10)
    assert sorted(canary + control) == sorted(ids) and not set(canary) & set(control)
    assert members(ids, "lab", 50) != members(ids, "other", 50)  # the group is part of the hash


def verdicts(text: str, canary: dict[str, float | None], control: dict[str, float | None] | None = None
             ) -> list[Verdict]:
    return evaluate_all(parse_gates(text), canary, control or {})


GOOD = {"error_rate": 0.0, "rollbacks": 0.0, "latency_ms_p95": 3.0}
GATES = "error_rate<=0.01,rollbacks==0,latency_ms_p95<=1.2*baseline"


def run(canary: dict[str, float | None], control: dict[str, float | None] | None = None, *,
        elapsed: float | None = 10, deploying: float = 0, devices: int = 3, requests: float = 100,
        min_requests: int = 10, last: bool = False) -> tuple[str, str]:
    d = decide(verdicts(GATES, canary, control if control is not None else {"latency_ms_p95": 3.0}),
               soak_elapsed_s=elapsed, soak_s=5, deploying_s=deploying, deploy_timeout_s=60, devices=devices,
               min_devices=2, requests=requests, min_requests=min_requests, last_wave=last)
    return d.action, d.reason


def test_every_gate_held_for_the_soak_advances() -> None:
    assert run(GOOD)[0] == "advance"
    assert run(GOOD, last=True)[0] == "done"
    assert run(GOOD, elapsed=4)[0] == "wait"


def test_the_soak_starts_once_the_wave_is_deployed() -> None:
    # figures may already pass, but until every online canary device serves the new version the wave waits ...
    assert run(GOOD, elapsed=None, deploying=59) == ("wait", "deploying: not every online canary device serves "
                                                              "the new version yet")
    # ... and pauses if that never happens, never promotes
    action, reason = run(GOOD, elapsed=None, deploying=60)
    assert action == "pause" and "not every online canary device" in reason
    assert run(GOOD | {"rollbacks": 2.0}, elapsed=None)[0] == "abort"


def test_a_failing_gate_aborts_even_while_soaking() -> None:
    action, reason = run(GOOD | {"error_rate": 0.2}, elapsed=1)
    assert action == "abort" and "error_rate<=0.01" in reason
    assert run(GOOD | {"latency_ms_p95": 4.0})[0] == "abort"  # 4 > 1.2 * 3


def test_rollbacks_abort_at_once_other_gates_only_with_enough_data() -> None:
    assert run(GOOD | {"rollbacks": 1.0}, devices=0, requests=0, elapsed=0)[0] == "abort"
    assert run(GOOD | {"error_rate": 0.5}, devices=1, elapsed=0)[0] == "wait"
    assert run(GOOD | {"error_rate": 0.5}, devices=1, elapsed=10)[0] == "pause"


@pytest.mark.parametrize("canary, control, kwargs, needle", [
    (GOOD | {"error_rate": None}, None, {}, "no data: error_rate"),
    (GOOD, {}, {}, "no control device"),  # no baseline: never promotes
    (GOOD, None, {"devices": 1}, "--min-devices is 2"),
    (GOOD, None, {"requests": 3}, "--min-requests is 10"),
])
def test_without_enough_data_the_wave_pauses(canary: dict[str, float | None], control: dict[str, float | None] | None,
                                             kwargs: dict[str, float], needle: str) -> None:
    action, reason = run(canary, control, **kwargs)  # type: ignore[arg-type]
    assert action == "pause" and needle in reason
