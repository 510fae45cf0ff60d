"""Shadow mode: a second bundle runs on a sample of live inputs beside the serving model, and never answers.

A signed deployment may name a shadow bundle (docs/transport.md). The daemon fetches it with
`FetchClient.fetch_shadow`, loads it with `load_shadow` and attaches a `ShadowRunner` as a serve observer:

    runner = ShadowRunner(load_shadow(release), agreement_kind(shadow.manifest.parity, shadow.manifest.task),
                          cfg.telemetry.shadow_cpu_budget, cfg.telemetry.shadow_sample)
    stats.observers.append(runner)     # answered() hands a sample of requests to the runner's one thread
    runner.snapshot()                  # shadow_* figures for the telemetry message
    runner.close()                     # when the deployment names another shadow, or none

The request path only ever calls `offer` (through `answered`), which decides whether to sample the request and
hands it to ONE background thread through a small queue without waiting: when the thread is busy or resting, the
request is skipped and counted. The thread measures the CPU time it spends on each sample (`time.thread_time`: the
shadow session runs with one runtime thread, on the calling thread, so that measures all of it) and rests until
its share of one core is back under `cpu_budget`: after a sample that took `c` CPU seconds starting at `t`, nothing
runs before `t + c / cpu_budget`. Over any run, CPU used <= cpu_budget x elapsed + one sample's CPU.

Agreement follows the shadow manifest's parity kind, as STAGE's `agent.deploy.stage.parity_check` judges it:
`top1` is the fraction of rows whose arg-max of the first output agrees with the served one; `cosine` (and
`tolerance`, whose absolute errors say little across two different models) is the mean row-wise cosine similarity,
the worst output's when there are several. Over all compared samples these equal `parity_check`'s value on the
same inputs and outputs stacked together.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.deploy.probation import read_manifest
from agent.deploy.stage import DeviceProfile, stage_bundle
from agent.serve.holder import LoadedModel, conform_inputs
from agent.telemetry.histogram import LatencyHistogram

log = logging.getLogger(__name__)

AgreementKind = Literal["top1", "cosine"]
MAX_QUEUE = 4
LOAD_RUNS = 5, 20  # warm-up and timing runs when a shadow bundle is loaded (its golden parity is checked too)
REWARN_S = 300.0  # a shadow that keeps failing is logged again at most this often

Outputs = Sequence[np.ndarray] | Mapping[str, np.ndarray]
_Item = tuple[dict[str, np.ndarray], Outputs] | None  # None: stop


def agreement_kind(parity: Mapping[str, Any] | None, task: str | None = None) -> AgreementKind:
    """`top1` for the manifest parity kind `top1`, `cosine` for `cosine` and `tolerance`; without a known kind,
    `top1` for classification and `cosine` for anything else."""
    kind = (parity or {}).get("kind")
    if kind == "top1":
        return "top1"
    if kind in ("cosine", "tolerance"):
        return "cosine"
    return "top1" if task == "classification" else "cosine"


def load_shadow(release: Path, device: DeviceProfile | None = None) -> LoadedModel:
    """Load an extracted, verified shadow release like STAGE loads a candidate (golden parity included), with
    ONE runtime thread: the shadow must not compete with the serving model for cores, and its CPU time must be
    measurable on the runner's thread. BundleRejected as `stage_bundle` raises it. Blocks for the staging time:
    call it where the daemon stages (bounded by [deploy] stage_timeout_s), not on a request thread."""
    manifest = read_manifest(release)
    warm, timing = LOAD_RUNS
    staged = stage_bundle(release, manifest, device or DeviceProfile.detect(), threads=1, warmup=warm,
                          timing_runs=timing)
    return LoadedModel(manifest.name, manifest.version, staged.fmt, staged.session, manifest=manifest)


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(len(a), -1).astype(np.float64) if a.ndim > 0 else a.reshape(1, 1).astype(np.float64)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity; rows that are both all-zero count as identical (as parity_check does)."""
    a2, b2 = _rows(a), _rows(b)
    na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
    dot = np.sum(a2 * b2, axis=1)
    return np.where((na == 0) & (nb == 0), 1.0, dot / np.maximum(na * nb, 1e-12))


def pair_outputs(served: Outputs, shadow_names: Sequence[str],
                 shadow: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(served, shadow) output pairs: by name when the served outputs are named and the shadow has those names,
    else by position. ValueError when they cannot be compared (no pair, or shapes differ)."""
    if isinstance(served, Mapping):
        by_name = dict(zip(shadow_names, shadow, strict=False))
        common = [n for n in served if n in by_name]
        pairs = [(np.asarray(served[n]), np.asarray(by_name[n])) for n in common] if common else \
            [(np.asarray(s), np.asarray(o)) for s, o in zip(served.values(), shadow, strict=False)]
    else:
        pairs = [(np.asarray(s), np.asarray(o)) for s, o in zip(served, shadow, strict=False)]
    if not pairs:
        raise ValueError("no output of the shadow model matches a served one")
    for i, (s, o) in enumerate(pairs):
        if s.shape != o.shape:
            raise ValueError(f"output {i}: the shadow gave shape {o.shape}, the served model {s.shape}")
        if o.dtype.kind in "fc" and not np.all(np.isfinite(o)):
            raise ValueError(f"output {i}: the shadow gave non-finite values")
    return pairs


class Agreement:
    """Running agreement between served and shadow outputs (not thread-safe: the runner's thread owns it)."""

    def __init__(self, kind: AgreementKind) -> None:
        self.kind = kind
        self.rows = 0
        self.agreeing = 0  # top1: rows whose arg-max agrees
        self.cosine_sums: list[float] = []  # cosine: per output, the sum of row cosines

    def add(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        served0 = _rows(pairs[0][0])
        n = len(served0)
        if self.kind == "top1":
            shadow0 = _rows(pairs[0][1])
            self.agreeing += int(np.sum(np.argmax(served0, axis=1) == np.argmax(shadow0, axis=1)))
        else:
            sums = [float(np.sum(_row_cosines(s, o))) for s, o in pairs]
            if self.cosine_sums and len(sums) != len(self.cosine_sums):
                raise ValueError(f"{len(sums)} outputs compared, earlier samples had {len(self.cosine_sums)}")
            self.cosine_sums = [a + b for a, b in zip(self.cosine_sums, sums, strict=True)] if self.cosine_sums \
                else sums
        self.rows += n

    @property
    def value(self) -> float | None:
        if self.rows == 0:
            return None
        if self.kind == "top1":
            return self.agreeing / self.rows
        return min(s / self.rows for s in self.cosine_sums)


class ShadowRunner:
    """Runs a shadow model on a sample of served requests in one background thread, within a CPU budget.

    `cpu_budget`: the share of one core the thread may use (0 < b <= 1); `sample`: the share of answered requests
    offered to it (0..1). `clock` (seconds, monotonic) times latency and rests, `cpu_clock` measures the thread's
    CPU time, `rng` draws the sample: tests pass fakes. A serve observer: `answered` offers the request.
    """

    def __init__(self, model: LoadedModel, parity_kind: AgreementKind | str, cpu_budget: float, sample: float,
                 clock: Callable[[], float] = time.monotonic, *, cpu_clock: Callable[[], float] = time.thread_time,
                 rng: random.Random | None = None, queue_size: int = 2) -> None:
        if not 0.0 < cpu_budget <= 1.0 or math.isnan(cpu_budget):
            raise ValueError(f"shadow cpu_budget must be in (0, 1] (a share of one core), got {cpu_budget!r}")
        if not 0.0 <= sample <= 1.0 or math.isnan(sample):
            raise ValueError(f"shadow sample must be in [0, 1], got {sample!r}")
        if not 1 <= queue_size <= MAX_QUEUE:
            raise ValueError(f"shadow queue_size must be 1..{MAX_QUEUE}, got {queue_size}")
        kind = parity_kind if parity_kind in ("top1", "cosine") else agreement_kind({"kind": parity_kind})
        self.model = model
        self.kind: AgreementKind = "top1" if kind == "top1" else "cosine"
        self.cpu_budget = float(cpu_budget)
        self.sample = float(sample)
        self.clock = clock
        self.cpu_clock = cpu_clock
        self._rng = rng or random.Random()
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # queued or running samples
        self._closed = False
        self._next_allowed = -math.inf  # the clock time before which the thread rests (its CPU budget)
        self._agreement = Agreement(self.kind)
        self._latency = LatencyHistogram()
        self._samples = 0
        self._skipped = 0
        self._errors = 0
        self._cpu_s = 0.0
        self._warned_at: float | None = None
        self._thread = threading.Thread(target=self._loop, name=f"shadow-{model.name}-{model.version}", daemon=True)
        self._thread.start()

    # --- the request path: never blocks, never raises -----------------------------------------------------------

    def offer(self, inputs: Mapping[str, np.ndarray], served_outputs: Outputs) -> bool:
        """Hand one answered request to the shadow thread if it is sampled and the thread can take it now; True
        when queued. Returns at once; never raises."""
        try:
            if self._closed or (self.sample < 1.0 and self._rng.random() >= self.sample):
                return False
            if self.clock() < self._next_allowed:  # resting: the thread would only skip it
                self._count_skip()
                return False
            with self._lock:
                self._pending += 1
            try:
                self._queue.put_nowait((dict(inputs), served_outputs))
            except queue.Full:
                self._done_one()
                self._count_skip()
                return False
            return True
        except Exception as e:
            self._warn("shadow offer failed", e)
            return False

    def answered(self, request_id: str, model: LoadedModel, inputs: dict[str, np.ndarray],
                 outputs: list[np.ndarray] | dict[str, np.ndarray], ms: float) -> None:
        self.offer(inputs, outputs)

    def failed(self, model: LoadedModel | None, kind: Literal["error", "rejected"], ms: float | None) -> None:
        """Nothing to compare: the serving model gave no answer."""

    # --- figures -----------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The shadow's figures since it started, flat for the telemetry message."""
        with self._lock:
            value, rows = self._agreement.value, self._agreement.rows
            p50, p95 = self._latency.quantile(0.5), self._latency.quantile(0.95)
            return {
                "shadow_name": self.model.name, "shadow_version": self.model.version,
                "shadow_agreement": value, "shadow_agreement_kind": self.kind,
                "shadow_samples": self._samples, "shadow_rows": rows,
                "shadow_latency_ms_p50": p50, "shadow_latency_ms_p95": p95,
                "shadow_skipped_total": self._skipped, "shadow_errors_total": self._errors,
                "shadow_cpu_seconds_total": self._cpu_s, "shadow_cpu_budget": self.cpu_budget,
            }

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued sample was run or skipped; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking samples, drop queued ones and end the thread (waiting at most `timeout` for a sample that
        is running)."""
        self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._done_one()
        # Full: an offer raced in after the drain; the thread sees _closed after that sample and ends
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout)

    # --- the thread --------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if not self._closed:
                    self._run(*item)
            except Exception as e:  # the shadow's failures are figures, never the thread's end
                with self._lock:
                    self._errors += 1
                self._warn(f"shadow {self.model.name} v{self.model.version} failed", e)
            finally:
                self._done_one()
            if self._closed:
                return

    def _run(self, inputs: dict[str, np.ndarray], served: Outputs) -> None:
        start = self.clock()
        if start < self._next_allowed:
            self._count_skip()
            return
        cpu0 = self.cpu_clock()
        try:
            feeds = conform_inputs(self.model, inputs)
            t0 = self.clock()
            outputs = self.model.session.run(feeds)
            ms = (self.clock() - t0) * 1000.0
            pairs = pair_outputs(served, [s.name for s in self.model.outputs], outputs)
            with self._lock:
                self._agreement.add(pairs)
                self._latency.observe(max(ms, 0.0))
                self._samples += 1
        finally:
            used = max(self.cpu_clock() - cpu0, 0.0)
            with self._lock:
                self._cpu_s += used
            # rest until this sample's CPU time is within the budget's share of the time since it started
            self._next_allowed = start + used / self.cpu_budget

    def _count_skip(self) -> None:
        with self._lock:
            self._skipped += 1

    def _done_one(self) -> None:
        with self._idle:
            self._pending -= 1
            if self._pending <= 0:
                self._pending = 0
                self._idle.notify_all()

    def _warn(self, what: str, e: Exception) -> None:
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= REWARN_S:
            self._warned_at = now
            log.warning("%s: %s: %s", what, type(e).__name__, e)
        else:
            log.debug("%s: %s: %s", what, type(e).__name__, e)


__all__ = ["Agreement", "AgreementKind", "ShadowRunner", "agreement_kind", "load_shadow", "pair_outputs"]
