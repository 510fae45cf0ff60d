"""The gate grammar of `packager rollout start --gate` and the evaluation of a gate, pure.

    gates   := gate ("," gate)*
    gate    := METRIC OP rhs
    OP      := "<" | "<=" | ">" | ">=" | "=="
    rhs     := NUMBER | "baseline" | NUMBER "*" "baseline" | "baseline" "*" NUMBER

`baseline` is the same figure over the control devices (those of the group still on the previous version) in the
same window: `latency_ms_p95<=1.2*baseline` compares canary with control. A gate is judged `pass`, `fail` or
`no_data` (with the reason): a figure nobody reported, or that is not a finite number (NaN, inf), is never read as 0
and never passes; the controller pauses on it (docs/rollouts.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from packager.errors import InputError

# What each metric means over a set of devices is decided by packager/rollout/figures.py; here, only the names.
METRICS: tuple[str, ...] = (
    "parity",  # fraction of the devices (serving the version) whose last golden parity check passed
    "latency_ms_p50", "latency_ms_p95", "latency_ms_p99",  # of the merged latency histograms over the window, ms
    "error_rate",  # errors / (answered + errors) over the window, summed over the devices
    "accuracy",  # mean labelled-feedback accuracy of the devices that have some
    "drift_psi",  # the largest PSI any device reports
    "cpu_percent",  # mean CPU use
    "rss_bytes",  # the largest agent RSS
    "temp_celsius",  # the hottest device
    "rollbacks",  # devices that rolled the new version back on their own (parity, probation, crash loop)
    "offline",  # fraction of the devices whose retained state says offline
)
Op = Literal["<", "<=", ">", ">=", "=="]
Outcome = Literal["pass", "fail", "no_data"]

_TOKEN = re.compile(r"\s*(?:(?P<num>[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op><=|>=|==|<|>)|(?P<star>\*)|(?P<other>\S))")
MAX_GATES = 32
MAX_TEXT = 1000


@dataclass(frozen=True)
class Gate:
    metric: str
    op: Op
    value: float  # the threshold, or the factor applied to the baseline
    baseline: bool = False

    def __str__(self) -> str:
        if not self.baseline:
            rhs = f"{self.value:g}"
        else:
            rhs = "baseline" if self.value == 1.0 else f"{self.value:g}*baseline"
        return f"{self.metric}{self.op}{rhs}"


@dataclass(frozen=True)
class Verdict:
    gate: Gate
    outcome: Outcome
    observed: float | None = None  # the canary's figure
    threshold: float | None = None  # what it was compared with (the baseline times its factor, or the number)
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {"gate": str(self.gate), "outcome": self.outcome, "observed": self.observed,
                "threshold": self.threshold, "reason": self.reason}


def _error(text: str, why: str) -> InputError:
    return InputError(f"--gate {text!r}: {why}")


def _tokens(part: str) -> list[tuple[str, str]]:
    out = []
    for m in _TOKEN.finditer(part):
        kind = m.lastgroup
        if kind is None:  # only trailing blanks
            continue
        if kind == "other":
            raise _error(part, f"unexpected character {m.group(kind)!r}")
        out.append((kind, m.group(kind)))
    return out


def _number(text: str, part: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _error(part, f"number {text} is not finite")
    return value


def parse_gate(part: str) -> Gate:
    """One `METRIC OP rhs` expression; InputError (one line) otherwise."""
    toks = _tokens(part)
    if not toks:
        raise _error(part, "empty gate (two commas in a row?)")
    kind, metric = toks[0]
    if kind != "name":
        raise _error(part, "expected a metric name first")
    if metric not in METRICS:
        raise _error(part, f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    if len(toks) < 3 or toks[1][0] != "op":
        raise _error(part, "expected METRIC OP VALUE, e.g. error_rate<=0.01 or latency_ms_p95<=1.2*baseline")
    op: Op = toks[1][1]  # type: ignore[assignment]  # the regex admits only the five operators
    rhs = [(k, v) for k, v in toks[2:]]
    shape = [k for k, _ in rhs]
    if shape == ["num"]:
        return Gate(metric, op, _number(rhs[0][1], part))
    if shape == ["name"] and rhs[0][1] == "baseline":
        return _baseline_gate(metric, op, 1.0, part)
    if shape == ["num", "star", "name"] and rhs[2][1] == "baseline":
        return _baseline_gate(metric, op, _number(rhs[0][1], part), part)
    if shape == ["name", "star", "num"] and rhs[0][1] == "baseline":
        return _baseline_gate(metric, op, _number(rhs[2][1], part), part)
    raise _error(part, "the right side must be a number, baseline, or NUMBER*baseline")


def _baseline_gate(metric: str, op: Op, factor: float, part: str) -> Gate:
    if metric == "rollbacks":  # control devices never ran the new version: they have nothing to roll back
        raise _error(part, "rollbacks has no baseline (control devices do not run the new version)")
    return Gate(metric, op, factor, baseline=True)


def parse_gates(text: str) -> tuple[Gate, ...]:
    """Every gate of a `--gate` value; InputError naming the first bad one."""
    if len(text) > MAX_TEXT:
        raise InputError(f"--gate: longer than {MAX_TEXT} characters")
    parts = text.split(",")
    if not text.strip():
        raise InputError("--gate: empty: give at least one gate, e.g. error_rate<=0.01")
    if len(parts) > MAX_GATES:
        raise InputError(f"--gate: more than {MAX_GATES} gates")
    gates = tuple(parse_gate(p.strip()) for p in parts)
    return gates


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _holds(observed: float, op: Op, threshold: float) -> bool:
    if op == "<":
        return observed < threshold
    if op == "<=":
        return observed <= threshold
    if op == ">":
        return observed > threshold
    if op == ">=":
        return observed >= threshold
    return observed == threshold


def evaluate(gate: Gate, canary: Mapping[str, float | None], control: Mapping[str, float | None]) -> Verdict:
    """Judge `gate` on the canary's figures (metric -> value, None when unknown) against the control's."""
    raw = canary.get(gate.metric)
    observed = _finite(raw)
    if observed is None:
        why = "no canary device reported it" if raw is None else f"the canary figure is {raw!r}, not a number"
        return Verdict(gate, "no_data", reason=f"{gate.metric}: {why}")
    if gate.baseline:
        raw_base = control.get(gate.metric)
        base = _finite(raw_base)
        if base is None:
            why = "no control device (previous version) reported it" if raw_base is None \
                else f"the baseline is {raw_base!r}, not a number"
            return Verdict(gate, "no_data", observed, reason=f"{gate.metric}: {why}")
        threshold = gate.value * base
    else:
        threshold = gate.value
    ok = _holds(observed, gate.op, threshold)
    return Verdict(gate, "pass" if ok else "fail", observed, threshold,
                   reason=f"{gate.metric} {observed:.6g} {'' if ok else 'not '}{gate.op} {threshold:.6g}")


def evaluate_all(gates: tuple[Gate, ...], canary: Mapping[str, float | None],
                 control: Mapping[str, float | None]) -> list[Verdict]:
    return [evaluate(g, canary, control) for g in gates]
