"""A fixed-bucket latency histogram: the same buckets on every device, so fleets merge by adding counts.

Bucket `i` counts observations `ms <= BUCKETS_MS[i]` that did not fit bucket `i - 1` (Prometheus `le` semantics);
the last bound is +inf. Quantiles are derived from the counts alone, by linear interpolation inside the bucket that
holds the wanted rank, with the bucket's ends narrowed to the smallest and largest value observed.

Error bound: the estimate lies in the same bucket as the true sample quantile (the order statistic of rank
ceil(q * count)), so it is off by at most that bucket's width: at most 0.5 ms below 1 ms, and at most
(upper - lower) <= 60% of the upper bound above it (the 2-2.5-2 ratios of the 1-2-5 series). In the last bucket
(> 5000 ms) the estimate lies between 5000 ms and the largest value observed. Between two order statistics that
straddle a bucket bound (numpy's "linear" percentile interpolates there) the error is bounded by the two buckets'
widths together.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

BUCKETS_MS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
                                 math.inf)
JSON_SCHEMA = 1


class LatencyHistogram:
    """Counts of latencies (ms) per fixed bucket, their sum, and the extremes (for tighter quantiles).

    Not thread-safe on its own: InferenceFigures holds the lock around it.
    """

    __slots__ = ("bounds", "count", "counts", "max_ms", "min_ms", "sum_ms")

    def __init__(self, bounds: Sequence[float] = BUCKETS_MS) -> None:
        b = tuple(float(x) for x in bounds)
        if not b or b[-1] != math.inf or any(not x > 0 for x in b) or any(x >= y for x, y in itertools.pairwise(b)):
            raise ValueError("bucket bounds must be positive, strictly increasing and end with inf")
        self.bounds: tuple[float, ...] = b
        self.counts: list[int] = [0] * len(b)
        self.count = 0
        self.sum_ms = 0.0
        self.min_ms: float | None = None
        self.max_ms: float | None = None

    def observe(self, ms: float) -> None:
        """Count one latency. ValueError for NaN or a negative value (nothing is counted)."""
        ms = float(ms)
        if math.isnan(ms) or ms < 0:
            raise ValueError(f"latency must be a non-negative number of ms, got {ms!r}")
        self.counts[bisect.bisect_left(self.bounds, ms)] += 1
        self.count += 1
        self.sum_ms += ms
        self.min_ms = ms if self.min_ms is None else min(self.min_ms, ms)
        self.max_ms = ms if self.max_ms is None else max(self.max_ms, ms)

    def merge(self, other: LatencyHistogram) -> None:
        """Add `other`'s counts into this one (exact: the result is what one histogram of both would hold)."""
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different bucket bounds")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.sum_ms += other.sum_ms
        if other.min_ms is not None:
            self.min_ms = other.min_ms if self.min_ms is None else min(self.min_ms, other.min_ms)
        if other.max_ms is not None:
            self.max_ms = other.max_ms if self.max_ms is None else max(self.max_ms, other.max_ms)

    def copy(self) -> LatencyHistogram:
        h = LatencyHistogram(self.bounds)
        h.merge(self)
        return h

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 <= q <= 1) estimated from the buckets (see the module's error bound); None if empty."""
        if not 0.0 <= q <= 1.0 or math.isnan(q):
            raise ValueError(f"quantile must be within [0, 1], got {q!r}")
        if self.count == 0 or self.min_ms is None or self.max_ms is None:
            return None
        rank = max(q * self.count, 1e-12)  # q = 0 -> the smallest value's bucket
        below = 0
        for i, c in enumerate(self.counts):
            if c and below + c >= rank:
                lower = self.bounds[i - 1] if i else 0.0
                lo = max(lower, self.min_ms)
                hi = min(self.bounds[i], self.max_ms)
                return lo + (hi - lo) * (rank - below) / c
            below += c
        return self.max_ms  # not reached: the counts add up to count

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: bounds with +inf as null (JSON has no inf), counts, count, sum and extremes."""
        return {"schema": JSON_SCHEMA, "bounds": [None if math.isinf(b) else b for b in self.bounds],
                "counts": list(self.counts), "count": self.count, "sum_ms": self.sum_ms,
                "min_ms": self.min_ms, "max_ms": self.max_ms}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LatencyHistogram:
        """The inverse of to_json. ValueError for anything malformed (counts that do not add up, bad bounds)."""
        if not isinstance(d, Mapping):
            raise ValueError("a histogram must be a JSON object")
        raw_bounds, counts = d.get("bounds"), d.get("counts")
        if not isinstance(raw_bounds, list) or not isinstance(counts, list) or len(raw_bounds) != len(counts):
            raise ValueError("histogram bounds and counts must be lists of the same length")
        bounds = [math.inf if b is None else b for b in raw_bounds]
        if any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in bounds):
            raise ValueError("histogram bounds must be numbers (null for +inf)")
        h = cls(bounds)
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError("histogram counts must be non-negative integers")
        count, sum_ms = d.get("count", sum(counts)), d.get("sum_ms", 0.0)
        if count != sum(counts):
            raise ValueError(f"histogram count {count!r} is not the sum of its counts ({sum(counts)})")
        if isinstance(sum_ms, bool) or not isinstance(sum_ms, (int, float)) or not math.isfinite(sum_ms):
            raise ValueError("histogram sum_ms must be a finite number")
        extremes = [d.get("min_ms"), d.get("max_ms")]
        for x in extremes:
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0):
                raise ValueError("histogram min_ms/max_ms must be null or non-negative numbers")
        h.counts, h.count, h.sum_ms = list(counts), count, float(sum_ms)
        if count:
            # Older senders without extremes: the edges of the outermost non-empty buckets.
            first = next(i for i, c in enumerate(counts) if c)
            last = max(i for i, c in enumerate(counts) if c)
            h.min_ms = float(extremes[0]) if extremes[0] is not None else (bounds[first - 1] if first else 0.0)
            h.max_ms = float(extremes[1]) if extremes[1] is not None else (
                bounds[last] if math.isfinite(bounds[last]) else bounds[last - 1])
        return h

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        return (self.bounds, self.counts, self.count, self.sum_ms, self.min_ms, self.max_ms) == (
            other.bounds, other.counts, other.count, other.sum_ms, other.min_ms, other.max_ms)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"LatencyHistogram(count={self.count}, counts={self.counts})"
