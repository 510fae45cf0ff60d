"""Inference statistics per bundle version: request counters, a latency histogram and throughput.

Fed from the HTTP server's threads and paho's network thread at once, so every access holds one lock. Pure: no
clock of its own (the caller passes `now` to snapshot), no I/O.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.telemetry.histogram import LatencyHistogram

log = logging.getLogger(__name__)

Outcome = Literal["ok", "error", "rejected"]
Key = tuple[str | None, int | None]  # (bundle name, version); (None, None) for failures with no model loaded


@dataclass
class _Figures:
    ok: int = 0
    errors: int = 0
    rejected: int = 0
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    mark: tuple[float, int] | None = None  # (now, requests_total) at the previous snapshot

    @property
    def requests(self) -> int:
        return self.ok + self.errors + self.rejected


class InferenceFigures:
    """Counters and latency per (bundle name, version).

    Outcomes are those of agent.serve's RequestStats: "ok" (answered; its latency goes into the histogram),
    "rejected" (the client's fault, 4xx) and "error" (a server-side failure, 5xx). error_rate is errors over the
    requests the server should have answered (ok + errors), so a misbehaving client cannot move it. The latency of
    failures is not put in the histogram (a fast 400 would make the model look faster).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._figures: dict[Key, _Figures] = {}

    def record(self, outcome: Outcome, ms: float | None, name: str | None, version: int | None) -> None:
        """Count one request. Never raises on a bad latency (logged, the request still counts)."""
        if outcome not in ("ok", "error", "rejected"):
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._lock:
            f = self._figures.setdefault((name, version), _Figures())
            if outcome == "ok":
                f.ok += 1
                if ms is not None:
                    try:
                        f.histogram.observe(ms)
                    except (ValueError, TypeError):
                        log.warning("latency %r ms of a %s request to %s v%s not recorded", ms, outcome, name,
                                    version)
            elif outcome == "error":
                f.errors += 1
            else:
                f.rejected += 1

    def keys(self) -> list[Key]:
        """Every (name, version) that has recorded something, in first-seen order."""
        with self._lock:
            return list(self._figures)

    def histogram(self, name: str | None, version: int | None) -> LatencyHistogram:
        """A copy of the version's latency histogram (empty when unknown)."""
        with self._lock:
            f = self._figures.get((name, version))
            return f.histogram.copy() if f is not None else LatencyHistogram()

    def snapshot(self, name: str | None, version: int | None, now: float, *, advance: bool = True) -> dict[str, Any]:
        """Flat, JSON-ready figures of one version (zeros when it has recorded nothing).

        throughput_rps is requests_total (every outcome) per second since the previous snapshot of this version
        that advanced the mark (None at the first one, or when `now` did not move forward). A reader that must
        not disturb the publisher's interval (/metrics, say) passes advance=False.
        """
        with self._lock:
            f = self._figures.get((name, version))
            if f is None:
                f = _Figures()
                if advance:
                    self._figures[(name, version)] = f
            h = f.histogram.copy()
            ok, errors, rejected, requests = f.ok, f.errors, f.rejected, f.requests
            throughput: float | None = None
            if f.mark is not None and now > f.mark[0]:
                throughput = (requests - f.mark[1]) / (now - f.mark[0])
            if advance:
                f.mark = (now, requests)
        answered = ok + errors
        return {
            "requests_total": requests,
            "errors_total": errors,
            "rejected_total": rejected,
            "error_rate": errors / answered if answered else None,
            "latency_ms_p50": h.quantile(0.50),
            "latency_ms_p95": h.quantile(0.95),
            "latency_ms_p99": h.quantile(0.99),
            "latency_ms_buckets": list(h.counts),
            "latency_ms_bucket_bounds": [None if math.isinf(b) else b for b in h.bounds],
            "latency_ms_count": h.count,
            "latency_ms_sum": h.sum_ms,
            "throughput_rps": throughput,
        }
