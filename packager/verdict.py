"""Does an int8 artifact pay? Pure: accuracy, size and host latency against fp32 give one verdict with a reason.

An int8 artifact that is larger than the fp32 model, or slower than it at batch 1 on the build host, is a failed
recipe even when its accuracy is within the gate: shipping it would cost the device more than fp32 (issue 15).
Checks run in that order: the recipe produced an artifact, accuracy, size, latency. Latency is judged only when
both figures are given (the build measures it for ONNX only: TFLite has no fp32 model on the same runtime).

Timing is noisy, so "slower" means slower than fp32 by more than LATENCY_TOLERANCE and by more than
LATENCY_FLOOR_MS, and the build confirms a slower verdict with interleaved rounds (`paired_ratio`) before it
rejects a recipe for it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

LATENCY_TOLERANCE = 0.10  # int8 p50 up to 1.10x the fp32 p50 is "not slower" (timing noise on a shared host)
# ... nor is a difference below 5 µs: at that scale batch-1 time is the runtime's call overhead, not the model
# (a 16 KiB model ran in 0.007 ms fp32, 0.008 ms int8).
LATENCY_FLOOR_MS = 0.005
SIZE_LIMIT = 1.0  # an int8 artifact must be smaller than the fp32 model (bytes < SIZE_LIMIT x fp32 bytes)

Failure = Literal["error", "accuracy", "size", "latency"]


@dataclass(frozen=True)
class Fp32:
    """The fp32 model an int8 artifact must beat: its bytes and host p50 at batch 1 (None: latency not judged)."""

    bytes: int
    p50_ms: float | None = None


@dataclass(frozen=True)
class Verdict:
    passed: bool
    failed: Failure | None
    reason: str  # one line: why it failed, or what it gains

    def to_json(self) -> dict[str, object]:
        return {"passed": self.passed, "failed": self.failed, "reason": self.reason}


def judge(fp32: Fp32, *, max_drop: float, drop: float, nbytes: int, p50_ms: float | None = None,
          error: str | None = None, latency_tolerance: float | None = None) -> Verdict:
    """The verdict on one int8 artifact (drop in the task's units; NaN fails). `latency_tolerance` None: the
    module's LATENCY_TOLERANCE, read at call time (tests set it to decide latency without a clock)."""
    if latency_tolerance is None:
        latency_tolerance = LATENCY_TOLERANCE
    floor = LATENCY_FLOOR_MS
    if error is not None:
        return Verdict(False, "error", error)
    if not drop <= max_drop:
        return Verdict(False, "accuracy", f"drop {drop:.4g} > {max_drop:g}")
    size = nbytes / fp32.bytes if fp32.bytes > 0 else math.inf
    if not size < SIZE_LIMIT:
        return Verdict(False, "size", f"larger than fp32: {size:.3f}x its bytes ({nbytes} vs {fp32.bytes})")
    gains = f"{size:.3f}x fp32 bytes"
    if p50_ms is not None and fp32.p50_ms is not None and fp32.p50_ms > 0:
        speed = p50_ms / fp32.p50_ms
        if not (speed <= 1.0 + latency_tolerance or p50_ms - fp32.p50_ms <= floor):
            return Verdict(False, "latency", f"slower than fp32: {speed:.2f}x its p50 at batch 1 "
                                             f"({p50_ms:.3f} vs {fp32.p50_ms:.3f} ms)")
        gains += f", {speed:.2f}x fp32 p50"
    return Verdict(True, None, gains)


def paired_ratio(rounds: Sequence[tuple[float, float]]) -> float:
    """Median over interleaved rounds of (int8 time / fp32 time); each round times both back to back, so a
    load spike that hits one round hits both models."""
    ratios = [a / b for a, b in rounds if b > 0 and math.isfinite(a) and math.isfinite(b)]
    return statistics.median(ratios) if ratios else math.nan


_WORDS = {"error": "failed to run", "accuracy": "missed the accuracy gate", "size": "larger than fp32",
          "latency": "slower than fp32"}


def no_recipe_pays(fmt: str, verdicts: Sequence[tuple[str, Verdict]]) -> str:
    """One plain line for a format where no int8 recipe passed: how many failed how, and the closest one."""
    counts: dict[str, int] = {}
    for _, v in verdicts:
        if v.failed is not None:
            counts[v.failed] = counts.get(v.failed, 0) + 1
    how = ", ".join(f"{n} {_WORDS[k]}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    # The closest: one that kept accuracy but did not pay, else the first that produced an artifact.
    closest = next(((n, v) for n, v in verdicts if v.failed in ("latency", "size")),
                   next(((n, v) for n, v in verdicts if v.failed != "error"), verdicts[0] if verdicts else None))
    line = f"{fmt}: no int8 recipe pays ({len(verdicts)} tried: {how or 'none ran'})"
    if closest is not None:
        line += f"; {closest[0]}: {closest[1].reason}"
    return line
