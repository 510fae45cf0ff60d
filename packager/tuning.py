"""Accuracy-aware recipe tuning (after Intel Neural Compressor): pure selection logic, no quantizer inside.

Try the first recipe; if it misses the gate, try every alternative and keep the smallest artifact that passes.
Passing means within the accuracy gate and not `rejected` (an int8 artifact larger or slower than fp32 does not
pay: packager/verdict.py).
Every attempt is recorded, including the ones that crashed, so the report can show what was tried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Trial:
    recipe: dict[str, Any]
    path: Path | None  # the candidate artifact; None when the recipe failed to produce one
    bytes: int
    value: float  # the task metric
    drop: float
    error: str | None = None
    # Why an artifact within the accuracy gate still does not pay (larger or slower than fp32: packager/verdict.py)
    rejected: str | None = None
    p50_ms: float | None = None  # host latency at batch 1, when it was measured for the verdict

    def passed(self, max_drop: float) -> bool:
        return self.error is None and self.rejected is None and self.drop <= max_drop

    def to_json(self, max_drop: float) -> dict[str, Any]:
        out: dict[str, Any] = {"recipe": self.recipe, "bytes": self.bytes, "value": self.value, "drop": self.drop,
                               "passed": self.passed(max_drop)}
        if self.error is not None:
            out["error"] = self.error
        if self.rejected is not None:
            out["why"] = self.rejected  # packager/report.py shows it beside the recipe
        if self.p50_ms is not None:
            out["p50_ms"] = self.p50_ms
        return out


@dataclass(frozen=True)
class TuningResult:
    chosen: Trial | None  # None when no recipe passed
    best_failing: Trial | None  # the least-bad attempt, to explain a failure
    trials: tuple[Trial, ...]


def choose(trials: Iterable[Trial], max_drop: float) -> TuningResult:
    """The smallest passing trial (ties: least drop); else report the least-bad one."""
    trials = tuple(trials)
    passing = [t for t in trials if t.passed(max_drop)]
    if passing:
        return TuningResult(min(passing, key=lambda t: (t.bytes, t.drop)), None, trials)
    produced = [t for t in trials if t.error is None]
    worst = min(produced, key=lambda t: t.drop) if produced else (trials[0] if trials else None)
    return TuningResult(None, worst, trials)


def tune(first: Any, alternatives: Callable[[], list[Any]], attempt: Callable[[Any], Trial],
         max_drop: float) -> TuningResult:
    """Run `attempt` on the first recipe and, only if it misses the gate, on each alternative."""
    first_trial = attempt(first)
    if first_trial.passed(max_drop):
        return TuningResult(first_trial, None, (first_trial,))
    trials = [first_trial, *(attempt(r) for r in alternatives())]
    return choose(trials, max_drop)
