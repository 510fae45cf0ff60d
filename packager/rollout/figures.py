"""The figures a gate reads, pure: what a set of devices said during a wave's window, folded into one value per
metric (packager/rollout/gates.py METRICS). Unknown is None, never 0.

Counters in telemetry (`requests_total`, `errors_total`, the latency buckets) count since the agent started, per
serving version (docs/telemetry.md). The window's share is the last message's counters minus those of the first
message of the window; a device that started serving the version during the window counts from zero. A counter
that went down (the agent restarted) counts from zero too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


def _number(v: Any) -> float | None:
    """A finite real number, else None (bools are not numbers; NaN and inf are unknown, never 0)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


@dataclass
class DeviceWindow:
    """One device during the window: its telemetry for the version it serves and what its state said."""

    device_id: str
    version_at_start: int | None = None  # what it served when the window opened (None: unknown)
    version: int | None = None  # the version of `first` / `last`
    first: dict[str, Any] | None = None  # None: count from zero (started serving it in the window)
    last: dict[str, Any] | None = None
    messages: int = 0  # telemetry messages of `version` in the window
    extra: dict[str, Any] = field(default_factory=dict)

    def feed(self, doc: Mapping[str, Any]) -> None:
        """A telemetry message of this device (already checked by the fleet view), in arrival order."""
        version = _count(doc.get("version"))
        seq, last_seq = _count(doc.get("seq")), _count((self.last or {}).get("seq"))
        if version == self.version and seq is not None and last_seq is not None and seq <= last_seq:
            return  # a late or repeated message
        if version != self.version:
            self.version, self.messages = version, 0
            # its first message of a version it did not serve when the window opened: it started in the window
            self.first = dict(doc) if version == self.version_at_start and version is not None else None
        self.last = dict(doc)
        self.messages += 1


def _delta(last: Mapping[str, Any], first: Mapping[str, Any] | None, key: str) -> float | None:
    now = _number(last.get(key))
    if now is None:
        return None
    before = _number(first.get(key)) if first is not None else 0.0
    if before is None or before > now:
        before = 0.0
    return now - before


def _buckets(w: DeviceWindow) -> tuple[list[float], list[float]] | None:
    """(upper bounds, counts in the window) of the device's latency histogram, or None."""
    assert w.last is not None
    bounds, counts = w.last.get("latency_ms_bucket_bounds"), w.last.get("latency_ms_buckets")
    if not isinstance(bounds, list) or not isinstance(counts, list) or len(bounds) != len(counts) or not bounds:
        return None
    ub = [math.inf if b is None else _number(b) for b in bounds]
    now = [_number(c) for c in counts]
    if any(b is None for b in ub) or any(c is None or c < 0 for c in now):
        return None
    before: list[float | None] = [0.0] * len(now)
    if w.first is not None:
        fb = w.first.get("latency_ms_buckets")
        if isinstance(fb, list) and len(fb) == len(now) and w.first.get("latency_ms_bucket_bounds") == bounds:
            before = [_number(c) for c in fb]
    if any(b is None for b in before) or any(b > n for b, n in zip(before, now, strict=True)):  # type: ignore
        before = [0.0] * len(now)  # restarted: counts since then
    return [float(b) for b in ub], [float(n) - float(b) for n, b in zip(now, before, strict=True)]  # type: ignore


def quantile(bounds: list[float], counts: list[float], q: float) -> float | None:
    """The q-quantile of a histogram (bucket upper bounds, counts), interpolated linearly inside the bucket;
    None when empty. The open last bucket answers its lower bound (nothing is known above it)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, (ub, c) in enumerate(zip(bounds, counts, strict=True)):
        if c > 0 and seen + c >= rank:
            lb = bounds[i - 1] if i > 0 else 0.0
            if math.isinf(ub):
                return lb
            return lb + (ub - lb) * (rank - seen) / c
        seen += c
    return bounds[-2] if len(bounds) > 1 else None


def merged_histogram(windows: Iterable[DeviceWindow]) -> tuple[list[float], list[float]] | None:
    merged: tuple[list[float], list[float]] | None = None
    for w in windows:
        h = _buckets(w)
        if h is None:
            continue
        if merged is None:
            merged = (h[0], list(h[1]))
        elif merged[0] == h[0]:  # the bounds are fixed on every agent; a device with others is left out
            merged = (merged[0], [a + b for a, b in zip(merged[1], h[1], strict=True)])
    return merged


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def figures(windows: Iterable[DeviceWindow], online: Mapping[str, bool | None], rolled_back: set[str],
            version: int | None) -> dict[str, float | None]:
    """The gate metrics over `windows` (the canary's or the control's devices), counting telemetry only of those
    serving `version`. Also `devices` (of them, with telemetry of `version` in the window), `requests` (requests in
    the window) and `members` (devices in the set)."""
    ws = list(windows)
    serving = [w for w in ws if w.last is not None and w.version == version and version is not None]
    requests = [d for w in serving if (d := _delta(w.last or {}, w.first, "requests_total")) is not None]
    errors = [d for w in serving if (d := _delta(w.last or {}, w.first, "errors_total")) is not None]
    rejected = [d for w in serving if (d := _delta(w.last or {}, w.first, "rejected_total")) is not None]
    answered_or_failed = sum(requests) - sum(rejected)
    hist = merged_histogram(serving)
    parity = [v for w in serving if isinstance(v := (w.last or {}).get("parity_ok"), bool)]

    def each(key: str) -> list[float]:
        return [v for w in serving if (v := _number((w.last or {}).get(key))) is not None]

    states = [online.get(w.device_id) for w in ws]
    known = [s for s in states if s is not None]
    out: dict[str, float | None] = {
        "parity": (sum(parity) / len(parity)) if parity else None,
        "error_rate": (sum(errors) / answered_or_failed) if errors and answered_or_failed > 0 else None,
        "accuracy": _mean(each("accuracy")),
        "drift_psi": max(each("drift_psi"), default=None),
        "cpu_percent": _mean(each("cpu_percent")),
        "rss_bytes": max(each("rss_bytes"), default=None),
        "temp_celsius": max(each("temp_celsius"), default=None),
        "rollbacks": float(len([w for w in ws if w.device_id in rolled_back])),
        "offline": (sum(1 for s in known if not s) / len(known)) if known else None,
        "devices": float(len(serving)),
        "requests": float(sum(requests)),
        "members": float(len(ws)),
    }
    for name, q in (("latency_ms_p50", 0.5), ("latency_ms_p95", 0.95), ("latency_ms_p99", 0.99)):
        out[name] = quantile(*hist, q) if hist is not None else None
    return out
