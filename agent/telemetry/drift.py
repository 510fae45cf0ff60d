"""Output drift: live outputs counted into the bins the packager signed into the bundle, and PSI against them.

The packager (packager/metrics.py, via `reference_drift`) reduces each fp32 output row on the evaluation set to one
number, the *statistic*:
- classification: the top-1 confidence (the largest softmax probability of the first output's row);
- regression: the mean of the first output's row (its value, for one output; signed, so a shift either way shows);
- embedding: the L2 norm of the first output's row (an embedding's mean says little).
It puts `DRIFT_BINS - 1` interior bin edges at the deciles of those numbers into reference.json (section "drift"),
so each reference bin holds about 10% of the rows, together with the reference counts. Tied deciles (saturated
confidences, say) are merged, so there may be fewer bins. Bin 0 is (-inf, edges[0]), bin i is
[edges[i-1], edges[i]), the last bin [edges[-1], +inf): a value outside the reference range lands in an end bin.

The same is done for the inputs (section "drift_input"): the statistic `input_mean` is the mean of each row of the
model's first input on the evaluation set (for an image, its brightness), so a shift of the inputs shows even
while the outputs still look confident. The hub reports it as `drift_input_*` beside the output's `drift_*`.

The device counts the same statistic of its live outputs into those bins over a sliding window of the last
`window` rows and reports the counts and the population stability index

    PSI = sum_i (live_i - ref_i) * ln(live_i / ref_i)      (live_i, ref_i: fractions of their totals)

with each fraction floored at PSI_EPSILON (1e-4), so an empty bin adds a large but finite term: a reference bin of
10% that is empty live adds (0.1 - 1e-4) * ln(0.1 / 1e-4) = 0.69, an alarm on its own. PSI >= 0.1 warns and
>= 0.25 alarms; below `min_samples` rows there is no verdict ("unknown", never "ok"). Counts are plain integers per
fixed bin, so a fleet's counts add exactly (`merge_counts`) and `psi()` of the sums is the fleet's PSI.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

DRIFT_SCHEMA = 1
DRIFT_BINS = 10
PSI_EPSILON = 1e-4
PSI_WARN = 0.1
PSI_ALARM = 0.25
STATISTIC_BY_TASK = {"classification": "top1_confidence", "regression": "output_mean",
                     "embedding": "output_l2_norm"}
INPUT_STATISTIC = "input_mean"  # the per-input summary: the mean of each row of the first input
DriftStatus = Literal["unknown", "ok", "warn", "alarm"]


def drift_values(statistic: str, output: np.ndarray) -> np.ndarray:
    """One float64 per row of `output` (rows along the first axis; a 1-d output is one row)."""
    a = np.asarray(output)
    rows = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(1, -1)
    rows = rows.astype(np.float64)
    if rows.shape[1] == 0:
        return np.empty(0, dtype=np.float64)
    if statistic == "top1_confidence":
        z = rows - rows.max(axis=1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e.max(axis=1) / e.sum(axis=1))
    if statistic in ("output_mean", INPUT_STATISTIC):
        return np.asarray(rows.mean(axis=1))
    if statistic == "output_l2_norm":
        return np.asarray(np.linalg.norm(rows, axis=1))
    raise ValueError(f"unknown drift statistic {statistic!r}")


def bin_counts(edges: Sequence[float], values: np.ndarray) -> list[int]:
    """How many `values` fall in each of the len(edges) + 1 bins (ends open)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)]


def reference_drift(task: str, output: np.ndarray, bins: int = DRIFT_BINS, *,
                    statistic: str | None = None) -> dict[str, Any] | None:
    """The "drift" section of reference.json for the fp32 `output` (first output) on the evaluation set; None
    when there are no finite rows to take deciles of. `statistic=INPUT_STATISTIC` with the first input instead of
    the output: the "drift_input" section."""
    statistic = statistic or STATISTIC_BY_TASK[task]
    values = drift_values(statistic, output)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    cuts = np.quantile(values, np.arange(1, bins) / bins)
    edges = [float(x) for x in np.unique(cuts)]
    return {"schema": DRIFT_SCHEMA, "statistic": statistic, "edges": edges, "counts": bin_counts(edges, values),
            "samples": len(values)}


def merge_counts(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """Bin counts of two devices (or windows) on the same reference bins, added."""
    if len(a) != len(b):
        raise ValueError(f"cannot merge {len(a)} bin counts with {len(b)}: not the same reference bins")
    return [int(x) + int(y) for x, y in zip(a, b, strict=True)]


def psi(reference_counts: Sequence[int], live_counts: Sequence[int], epsilon: float = PSI_EPSILON) -> float:
    """The population stability index of `live_counts` against `reference_counts` (see the module docstring)."""
    if len(reference_counts) != len(live_counts):
        raise ValueError(f"{len(live_counts)} live bins against {len(reference_counts)} reference bins")
    ref = np.asarray(reference_counts, dtype=np.float64)
    live = np.asarray(live_counts, dtype=np.float64)
    if ref.sum() <= 0 or live.sum() <= 0 or (ref < 0).any() or (live < 0).any():
        raise ValueError("PSI needs non-negative counts with a positive total on both sides")
    r = np.maximum(ref / ref.sum(), epsilon)
    v = np.maximum(live / live.sum(), epsilon)
    return float(np.sum((v - r) * np.log(v / r)))


def drift_status(value: float | None) -> DriftStatus:
    if value is None or math.isnan(value):
        return "unknown"
    return "alarm" if value >= PSI_ALARM else "warn" if value >= PSI_WARN else "ok"


def unknown_snapshot() -> dict[str, Any]:
    """What a device reports for a bundle without a drift reference (built before the section existed)."""
    return {"drift_psi": None, "drift_status": "unknown", "drift_samples": 0, "drift_bin_counts": None,
            "drift_reference_counts": None}


class DriftMonitor:
    """Live bin counts over a sliding window of the last `window` output rows. Thread-safe (one lock)."""

    def __init__(self, statistic: str, edges: Sequence[float], reference_counts: Sequence[int], *,
                 min_samples: int, window: int) -> None:
        if window < 1 or min_samples < 1:
            raise ValueError("window and min_samples must be >= 1")
        if len(reference_counts) != len(edges) + 1:
            raise ValueError("reference counts must have one more entry than the edges")
        drift_values(statistic, np.zeros((1, 1)))  # ValueError for an unknown statistic
        self.statistic = statistic
        self.edges = np.asarray(edges, dtype=np.float64)
        self.reference_counts = [int(c) for c in reference_counts]
        self.min_samples, self.window = min_samples, window
        self._lock = threading.Lock()
        self._ring = np.zeros(window, dtype=np.int32)  # bin index of each of the last `window` rows
        self._filled = 0
        self._next = 0
        self._counts = np.zeros(len(edges) + 1, dtype=np.int64)

    @classmethod
    def from_reference(cls, reference_json: Mapping[str, Any], *, min_samples: int, window: int,
                       key: str = "drift") -> DriftMonitor | None:
        """A monitor for the bundle's reference.json, or None (logged) when it has no usable `key` section
        ("drift": the outputs, "drift_input": the inputs)."""
        section = reference_json.get(key) if isinstance(reference_json, Mapping) else None
        if section is None:
            log.info("reference.json has no %s section (a bundle built before it existed): unknown", key)
            return None
        try:
            return cls._parse(section, min_samples=min_samples, window=window)
        except (ValueError, TypeError, KeyError) as e:
            log.warning("reference.json %s section unusable, drift is unknown: %s", key, e)
            return None

    @classmethod
    def _parse(cls, section: Any, *, min_samples: int, window: int) -> DriftMonitor:
        if not isinstance(section, Mapping) or section.get("schema") != DRIFT_SCHEMA:
            raise ValueError(f"drift schema must be {DRIFT_SCHEMA}")
        edges, counts, statistic = section["edges"], section["counts"], section["statistic"]
        if not isinstance(edges, list) or any(isinstance(e, bool) or not isinstance(e, (int, float))
                                              or not math.isfinite(e) for e in edges):
            raise ValueError("drift edges must be a list of finite numbers")
        if any(a >= b for a, b in itertools.pairwise(edges)):
            raise ValueError("drift edges must be strictly increasing")
        if not isinstance(counts, list) or any(isinstance(c, bool) or not isinstance(c, int) or c < 0
                                               for c in counts) or sum(counts) <= 0:
            raise ValueError("drift counts must be non-negative integers with a positive total")
        if not isinstance(statistic, str):
            raise ValueError("drift statistic must be a string")
        return cls(statistic, edges, counts, min_samples=min_samples, window=window)

    def observe(self, outputs: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> None:
        """Count the statistic of each row of the first array (the first output, or the first input for
        `input_mean`); non-finite rows are skipped."""
        values = list(outputs.values()) if isinstance(outputs, Mapping) else list(outputs)
        if not values or not np.asarray(values[0]).size:
            return
        v = drift_values(self.statistic, values[0])
        idx = np.searchsorted(self.edges, v[np.isfinite(v)], side="right")
        with self._lock:
            for i in idx.tolist():
                if self._filled == self.window:
                    self._counts[self._ring[self._next]] -= 1
                else:
                    self._filled += 1
                self._ring[self._next] = i
                self._counts[i] += 1
                self._next = (self._next + 1) % self.window

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = [int(c) for c in self._counts]
            samples = self._filled
        value = psi(self.reference_counts, counts) if samples >= self.min_samples else None
        return {"drift_psi": value, "drift_status": drift_status(value), "drift_samples": samples,
                "drift_bin_counts": counts, "drift_reference_counts": list(self.reference_counts)}
