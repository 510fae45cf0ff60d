"""PROBATION: watch the candidate serve, and say whether it may be committed.

`judge_probation` is the pure verdict on live request figures (error rate, p95 latency against the manifest's
budget). `watch_probation` is the loop around it: it polls the figures and sends the model its golden inputs now and
then (a parity probe that also catches a model that hangs), until the window ends by time or by request count.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import MANIFEST, Manifest, read_golden_rows
from agent.config import DeploySection
from agent.deploy.stage import parity_check
from agent.errors import BundleRejected, ProbationFailed, ProbationReason, StopRequested
from agent.serve.holder import LoadedModel, RequestStats

log = logging.getLogger(__name__)

GOLDEN_PROBE_ROWS = 8  # rows of the golden set each probe runs
PROBE_INTERVAL_S = 2.0  # between golden probes during the window (one more at its end)
POLL_S = 0.2  # how often the request figures are judged
MIN_PROBE_WAIT_S = 5.0  # a probe that takes longer than this (or 50 latency budgets, if longer) counts as a hang

Golden = tuple[dict[str, np.ndarray], list[np.ndarray]]


def judge_probation(snapshot: dict[str, Any], budget_ms: float, max_error_rate: float, min_requests: int
                    ) -> tuple[ProbationReason, str] | None:
    """(reason, message) when live figures (`RequestStats.snapshot()`) fail probation; None while they pass.
    Below `min_requests` answered requests (or latency samples) a figure is not judged. Pure."""
    answered = int(snapshot["ok"]) + int(snapshot["errors"])
    if answered >= min_requests and snapshot["error_rate"] > max_error_rate:
        return "error_rate", (f"error rate {snapshot['error_rate']:.3f} over {answered} requests exceeds "
                              f"{max_error_rate:g}")
    p95 = snapshot.get("p95_ms")
    if snapshot["samples"] >= min_requests and p95 is not None and p95 > budget_ms:
        return "latency", f"p95 latency {p95:.2f} ms exceeds the budget of {budget_ms:g} ms"
    return None


def watch_probation(model: LoadedModel | None, stats: RequestStats, release: Path, fmt: str, deploy: DeploySection,
                    stopping: threading.Event) -> None:
    """Watch `model` (the candidate, extracted in `release`, serving its `fmt` artifact) serve for the probation
    window: error rate and p95 from `stats`, a golden parity probe every PROBE_INTERVAL_S and once at the end.
    Returns when it passed; raises ProbationFailed (reason "error_rate", "latency", "hang", "error", "parity"), or
    StopRequested when `stopping` is set first (the persisted PROBATION starts over after the restart).
    Without a model or golden rows only the request figures are judged."""
    manifest = read_manifest(release)
    budget = manifest.latency_budget_ms
    golden = _golden_rows(release, manifest, fmt)
    start = time.monotonic()
    next_probe = start
    while not stopping.is_set():
        snap = stats.snapshot()
        verdict = judge_probation(snap, budget, deploy.max_error_rate, deploy.min_requests_for_rate)
        if verdict is not None:
            raise ProbationFailed(verdict[1], verdict[0])
        if time.monotonic() >= next_probe and model is not None and golden is not None:
            probe(model, golden, manifest, budget)
            next_probe = time.monotonic() + PROBE_INTERVAL_S
        if time.monotonic() - start >= deploy.probation_s or snap["count"] >= deploy.probation_requests > 0:
            break
        stopping.wait(POLL_S)
    if stopping.is_set():
        raise StopRequested("stopped during probation")
    if model is not None and golden is not None:
        probe(model, golden, manifest, budget)


def probe(model: LoadedModel, golden: Golden, manifest: Manifest, budget_ms: float) -> None:
    """Run the golden inputs on `model` in a thread of their own and check parity; ProbationFailed when it fails,
    raises, or does not answer in time (a hung native call cannot be interrupted: its thread is left behind)."""
    inputs, expected = golden
    box: list[Any] = []
    worker = threading.Thread(target=lambda: box.append(_run_safely(model, inputs)), name="golden-probe",
                              daemon=True)
    worker.start()
    worker.join(max(MIN_PROBE_WAIT_S, 50 * budget_ms / 1000.0))
    if worker.is_alive():
        raise ProbationFailed("the model did not answer a golden probe: hung", "hang")
    out = box[0]
    if isinstance(out, BaseException):
        raise ProbationFailed(f"golden probe failed: {out}", "error")
    result = parity_check(manifest.parity, expected, out)
    if not result.passed:
        raise ProbationFailed(f"golden parity failed while serving: {result.detail}", "parity")


def read_manifest(release: Path) -> Manifest:
    """The manifest of an extracted release; BundleRejected("unreadable") when it cannot be read."""
    try:
        return Manifest.from_json(json.loads((release / MANIFEST).read_text()))
    except (OSError, ValueError) as e:
        raise BundleRejected(f"release {release.name} is unreadable: {e}", reason="unreadable") from e


def _golden_rows(release: Path, manifest: Manifest, fmt: str) -> Golden | None:
    try:
        inputs, outputs = read_golden_rows(release, manifest, fmt, GOLDEN_PROBE_ROWS)
    except BundleRejected as e:
        log.warning("no golden rows for probation probes: %s", e)
        return None
    return (inputs, outputs) if outputs else None


def _run_safely(model: LoadedModel, inputs: dict[str, np.ndarray]) -> Any:
    try:
        return model.session.run(inputs)
    except Exception as e:
        return e
