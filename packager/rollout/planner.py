"""Waves and the decision for a wave, pure: which devices a wave holds (their bucket, agent/deploy/rollout.py, one
definition on both sides), and whether the wave advances, waits, pauses or aborts given the gates' verdicts, the
soak time and the minimum devices and requests (docs/rollouts.md).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from agent.deploy.rollout import in_wave
from packager.errors import InputError
from packager.rollout.gates import Verdict

Action = Literal["wait", "advance", "done", "pause", "abort"]
MAX_WAVES = 20
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_waves(text: str) -> tuple[float, ...]:
    """`1,10,50,100`: increasing percentages in (0, 100], ending at 100 (a rollout that never reaches the whole
    group would never be done)."""
    try:
        waves = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise InputError(f"--waves {text!r}: comma-separated percentages, e.g. 1,10,50,100") from None
    if not waves or len(waves) > MAX_WAVES:
        raise InputError(f"--waves {text!r}: give 1 to {MAX_WAVES} percentages")
    if not all(math.isfinite(p) and 0 < p <= 100 for p in waves):
        raise InputError(f"--waves {text!r}: each percentage must be in (0, 100]")
    if any(a >= b for a, b in itertools.pairwise(waves)):
        raise InputError(f"--waves {text!r}: percentages must increase")
    if waves[-1] != 100:
        raise InputError(f"--waves {text!r}: the last wave must be 100 (the whole group)")
    return waves


def parse_duration(text: str, label: str = "--soak") -> float:
    """`5m`, `30s`, `1.5h`, `500ms` or plain seconds; positive and finite."""
    m = _DURATION.match(text)
    if m is None:
        raise InputError(f"{label} {text!r}: a duration like 30s, 5m or 1h")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"{label} {text!r}: must be more than zero")
    return seconds


def members(device_ids: Iterable[str], group: str, percent: float) -> list[str]:
    """The devices of `device_ids` a wave covering `percent` of `group` holds, sorted."""
    return sorted(d for d in device_ids if in_wave(d, group, percent))


def split(device_ids: Iterable[str], group: str, percent: float) -> tuple[list[str], list[str]]:
    """(canary, control): the reached waves' devices and the others."""
    ids = sorted(set(device_ids))
    canary = members(ids, group, percent)
    chosen = set(canary)
    return canary, [d for d in ids if d not in chosen]


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide(verdicts: list[Verdict], *, soak_elapsed_s: float | None, soak_s: float, deploying_s: float,
           deploy_timeout_s: float, devices: int, min_devices: int, requests: float, min_requests: int,
           last_wave: bool) -> Decision:
    """What the controller does now for the current wave.

    - `rollbacks` failing aborts at once: a device rejected the new version on its own.
    - Any other failing gate aborts once the canary has enough data (min devices and requests); before that a
      failing figure from one device's first seconds is not yet a verdict.
    - `soak_elapsed_s` is None while the wave deploys (some online canary device does not serve the new version
      yet): wait, and pause once that took `deploy_timeout_s`.
    - Until the soak time has passed: wait.
    - Then too few devices or requests, or a gate without data: pause, saying why (never promote without data).
    - Every gate passed for the whole soak: advance (done after the last wave).
    """
    enough = devices >= min_devices and requests >= min_requests
    for v in verdicts:
        if v.outcome == "fail" and (v.gate.metric == "rollbacks" or enough):
            return Decision("abort", f"gate {v.gate} failed: {v.reason}")
    if soak_elapsed_s is None:
        if deploying_s >= deploy_timeout_s:
            return Decision("pause", f"after {deploying_s:.0f} s not every online canary device serves the new "
                                     "version")
        return Decision("wait", "deploying: not every online canary device serves the new version yet")
    if soak_elapsed_s < soak_s:
        return Decision("wait", f"soaking: {soak_elapsed_s:.0f} s of {soak_s:g} s")
    if devices < min_devices:
        return Decision("pause", f"only {devices} canary device(s) reported the new version, "
                                 f"--min-devices is {min_devices}")
    if requests < min_requests:
        return Decision("pause", f"the canary answered {requests:.0f} request(s) in the window, "
                                 f"--min-requests is {min_requests}")
    missing = [v.reason for v in verdicts if v.outcome == "no_data"]
    if missing:
        return Decision("pause", "no data: " + "; ".join(missing))
    failing = [v for v in verdicts if v.outcome == "fail"]
    if failing:  # only reachable when the data is not enough, which paused above
        return Decision("abort", f"gate {failing[0].gate} failed: {failing[0].reason}")
    return Decision("done" if last_wave else "advance", "every gate held for the soak time")
