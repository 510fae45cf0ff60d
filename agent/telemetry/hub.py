"""The one telemetry object the daemon builds: every figure lives here, serving reports into it, the publisher and
`/metrics` read it.

    hub = Telemetry(cfg.telemetry, state_dir, serving=holder.get, release_of=...)
    stats.observers.append(hub)          # ServeObserver: every answered / failed request
    InferenceServer(..., feedback=hub, metrics=hub.metrics_text)   # FeedbackSink and the /metrics body
    Publisher(queue, device_id, build=hub.message_body, ...)
    hub.shadow = shadows.snapshot        # the shadow_* figures (agent/telemetry/shadow_manager.py)

It owns InferenceFigures (counters, latency histogram), FeedbackBook (labelled accuracy), the DriftMonitor of the
serving bundle (rebuilt from its release's reference.json when the serving bundle changes) and the ParitySchedule
(golden rows through the serving model every parity_interval_s, run from the publisher's thread). Resources are
sampled once per telemetry message; /metrics reports the latest sample, so a scrape never moves the
"since the previous sample" CPU window nor the throughput mark.

prometheus_client is imported only when /metrics is first read (docs/telemetry.md gives the idle RSS it costs).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.config import TelemetrySection
from agent.serve.holder import LoadedModel
from agent.telemetry.accuracy import FeedbackBook
from agent.telemetry.drift import DriftMonitor
from agent.telemetry.inference import InferenceFigures
from agent.telemetry.parity import ParitySchedule
from agent.telemetry.resources import Resources

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.json"
NO_DRIFT: dict[str, Any] = {"drift_psi": None, "drift_status": "unknown", "drift_samples": 0,
                            "drift_bin_counts": None, "drift_reference_counts": None,
                            "drift_input_psi": None, "drift_input_status": "unknown", "drift_input_samples": 0}
NO_PARITY: dict[str, Any] = {"parity_ok": None, "parity_score": None, "parity_checked_at": None}
Key = tuple[str, int]


def _as_list(outputs: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return list(outputs.values()) if isinstance(outputs, Mapping) else list(outputs)


class Telemetry:
    """ServeObserver and FeedbackSink over the figures; builds the telemetry message's body and /metrics."""

    def __init__(self, cfg: TelemetrySection, state_dir: Path, *, serving: Callable[[], LoadedModel | None],
                 release_of: Callable[[LoadedModel], Path | None], clock: Callable[[], float] = time.time,
                 resources: Resources | None = None) -> None:
        self.cfg = cfg
        self.serving = serving
        self.release_of = release_of
        self.clock = clock
        self.resources = resources if resources is not None else Resources(state_dir)
        self.inference = InferenceFigures()
        self.book = FeedbackBook(cfg.feedback_max_entries, cfg.feedback_ttl_s, clock)
        self.parity = ParitySchedule(cfg.parity_interval_s, clock)
        self._lock = threading.Lock()
        self._drift_key: Key | None = None
        self._drift: DriftMonitor | None = None
        self._drift_input: DriftMonitor | None = None  # of the first input's row means (reference "drift_input")
        self._parity: dict[Key, dict[str, Any]] = {}
        self._parity_key: Key | None = None
        self.last_resources: dict[str, Any] = {}  # the latest sample, for /metrics
        self._registry: CollectorRegistry | None = None
        # the shadow bundle's figures (ShadowManager.snapshot: null fields while none runs); None: not wired
        self.shadow: Callable[[], dict[str, Any]] | None = None

    # --- ServeObserver -------------------------------------------------------------------------------------

    def answered(self, request_id: str, model: LoadedModel, inputs: dict[str, np.ndarray],
                 outputs: Sequence[np.ndarray] | Mapping[str, np.ndarray], ms: float) -> None:
        self.inference.record("ok", ms, model.name, model.version)
        arrays = _as_list(outputs)
        task = model.manifest.task if model.manifest is not None else "classification"
        self.book.remember(request_id, model.name, model.version, task, arrays)
        drift, drift_input = self._drift_for(model)
        if drift is not None:
            drift.observe(arrays)
        if drift_input is not None and inputs:
            first = model.inputs[0].name if model.inputs else None
            drift_input.observe([inputs[first] if first in inputs else next(iter(inputs.values()))])

    def failed(self, model: LoadedModel | None, kind: Literal["error", "rejected"], ms: float | None) -> None:
        self.inference.record(kind, ms, None if model is None else model.name,
                              None if model is None else model.version)

    # --- FeedbackSink --------------------------------------------------------------------------------------

    def feedback(self, model_name: str, request_id: str, label: Any) -> str:
        """The book's answer ("accepted", "unknown", "expired", "duplicate"); ValueError for a bad label."""
        return self.book.feedback(request_id, label)

    # --- drift and parity of the serving bundle ------------------------------------------------------------

    def _drift_for(self, model: LoadedModel) -> tuple[DriftMonitor | None, DriftMonitor | None]:
        key = (model.name, model.version)
        with self._lock:
            if key != self._drift_key:  # a new serving bundle: new monitors from its own reference
                self._drift_key = key
                self._drift, self._drift_input = self._load_drift(model)
            return self._drift, self._drift_input

    def _load_drift(self, model: LoadedModel) -> tuple[DriftMonitor | None, DriftMonitor | None]:
        """The output and input monitors of `model`'s reference.json (None each where there is no section)."""
        release = self.release_of(model)
        if release is None or not (release / REFERENCE_FILE).is_file():
            log.info("%s v%s has no %s: drift is unknown", model.name, model.version, REFERENCE_FILE)
            return None, None
        try:
            reference = json.loads((release / REFERENCE_FILE).read_text())
        except (OSError, ValueError) as e:
            log.warning("%s v%s: unusable %s (%s): drift is unknown", model.name, model.version, REFERENCE_FILE, e)
            return None, None
        n, window = self.cfg.drift_min_samples, self.cfg.drift_window
        return (DriftMonitor.from_reference(reference, min_samples=n, window=window),
                DriftMonitor.from_reference(reference, min_samples=n, window=window, key="drift_input"))

    def _drift_figures(self, model: LoadedModel | None) -> dict[str, Any]:
        with self._lock:
            ours = model is not None and self._drift_key == (model.name, model.version)
            drift, drift_input = (self._drift, self._drift_input) if ours else (None, None)
        figures = dict(NO_DRIFT)
        if drift is not None:
            figures.update(drift.snapshot())
        if drift_input is not None:
            snap = drift_input.snapshot()
            figures.update({"drift_input_psi": snap["drift_psi"], "drift_input_status": snap["drift_status"],
                            "drift_input_samples": snap["drift_samples"]})
        return figures

    def _parity_figures(self, model: LoadedModel | None, run: bool) -> dict[str, Any]:
        if model is None:
            return dict(NO_PARITY)
        key = (model.name, model.version)
        if run and key != self._parity_key:  # a new serving bundle is checked at the next message, not in an hour
            self._parity_key = key
            self.parity.reset()
        if run and self.parity.due():
            release = self.release_of(model)
            if release is not None:
                try:
                    self._parity[key] = {**NO_PARITY, **self.parity.check(model, release, model.fmt)}
                except Exception as e:  # a check that cannot run is reported as unknown, not as a failure
                    log.warning("golden parity of %s v%s could not run: %s", model.name, model.version, e)
        return dict(self._parity.get(key, NO_PARITY))

    # --- the message and /metrics --------------------------------------------------------------------------

    def figures(self, now: float, *, advance: bool = True) -> dict[str, Any]:
        """name, version (the serving bundle, None when nothing serves), then the inference, feedback, drift and
        parity figures of that version. `advance`: the publisher's read (moves the throughput mark, runs a due
        parity check); /metrics reads with advance=False."""
        model = self.serving()
        name = None if model is None else model.name
        version = None if model is None else model.version
        return {"name": name, "version": version,
                **self.inference.snapshot(name, version, now, advance=advance),
                **self.book.snapshot(name, version),
                **self._drift_figures(model),
                **self._parity_figures(model, run=advance),
                **(self.shadow() if self.shadow is not None else {})}

    def message_body(self, now: float) -> dict[str, Any]:
        """The telemetry message without its envelope (agent/telemetry/publisher.py adds schema, device, ts,
        seq and the queue's counters)."""
        body = self.figures(now)
        resources = self.resources.sample()
        self.last_resources = resources
        return {**body, **resources}

    def metrics_text(self) -> bytes:
        """/metrics: the Prometheus text exposition of the same figures."""
        from prometheus_client import generate_latest

        with self._lock:
            if self._registry is None:
                from prometheus_client.registry import CollectorRegistry

                registry = CollectorRegistry(auto_describe=False)
                registry.register(_Collector(self))
                self._registry = registry
            registry = self._registry
        return generate_latest(registry)


class _Collector:
    """Reads the hub at every scrape (prometheus_client's custom collector protocol: `collect()`)."""

    def __init__(self, hub: Telemetry) -> None:
        self.hub = hub

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        hub = self.hub
        labels = ["name", "version"]
        latency = HistogramMetricFamily("edgeship_inference_latency_seconds",
                                        "Inference latency of answered requests per bundle version",
                                        labels=labels)
        counters = {k: CounterMetricFamily(f"edgeship_inference_{k}", f"Inference requests ({k}) per bundle version",
                                           labels=labels) for k in ("requests", "errors", "rejected")}
        now = hub.clock()
        for name, version in hub.inference.keys():  # noqa: SIM118 (a method, not a dict)
            values = [name or "", "" if version is None else str(version)]
            h = hub.inference.histogram(name, version)
            cumulative, buckets = 0, []
            for bound, count in zip(h.bounds, h.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if math.isinf(bound) else repr(bound / 1000.0), cumulative))
            latency.add_metric(values, buckets, h.sum_ms / 1000.0)
            snap = hub.inference.snapshot(name, version, now, advance=False)
            for k, family in counters.items():
                family.add_metric(values, snap[f"{k}_total"])
        yield latency
        yield from counters.values()

        figures = {**hub.figures(now, advance=False), **hub.last_resources}
        serving = [str(figures.get("name") or ""), "" if figures.get("version") is None else str(figures["version"])]
        skip = {"name", "version", "requests_total", "errors_total", "rejected_total", "latency_ms_count",
                "latency_ms_sum"}
        for key, value in figures.items():
            if key in skip or isinstance(value, (list, dict, str)) or value is None:
                continue
            number = float(value)  # bools become 0/1
            if key.endswith("_total"):
                counter = CounterMetricFamily(f"edgeship_{key[:-6]}", key.replace("_", " "), labels=labels)
                counter.add_metric(serving, number)
                yield counter
            else:
                gauge = GaugeMetricFamily(f"edgeship_{key}", key.replace("_", " "), labels=labels)
                gauge.add_metric(serving, number)
                yield gauge
        status = GaugeMetricFamily("edgeship_drift_status", "1 for the serving bundle's drift status",
                                   labels=[*labels, "status"])
        status.add_metric([*serving, str(figures.get("drift_status", "unknown"))], 1.0)
        yield status
