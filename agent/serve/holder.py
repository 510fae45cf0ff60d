"""The model being served, swapped atomically, and the request statistics probation and telemetry read.

Transport-free: the HTTP API (`agent.serve.http`) and MQTT inference both call `ModelHolder.infer` with numpy
arrays and map its typed errors onto their own status codes.

Telemetry listens through `ServeObserver`s on `RequestStats.observers`: each is told about every request once it
is decided (answered, refused or failed), before the answer is sent, so labelled feedback sent after an answer always
finds its id. An observer that raises is logged and never fails the request. Labels reach a `FeedbackSink`.

Swapping is one reference assignment. `infer` reads that reference once, at its start, and uses only what it
read, so a request that began before a swap finishes on the old session and none fails; the old session is
freed when its last request lets go of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from agent.bundle import DEFAULT_MAX_BATCH, Manifest, TensorSpec
from agent.errors import BadRequest, BatchTooLarge, InferenceFailed, ModelNotFound, ModelNotReady
from agent.preprocess import prepare
from agent.runtime import ModelSession

log = logging.getLogger(__name__)

DEFAULT_LATENCY_WINDOW = 4096
OBSERVER_REWARN_S = 60.0  # a failing observer's later exceptions are logged at most this often

# Open Inference Protocol (KServe v2 / Triton) tensor datatypes -> numpy dtype names. BYTES has no numeric
# equivalent: the models served here take numbers only.
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
_DATATYPE_OF = {v: k for k, v in DATATYPES.items()}


def datatype_of(dtype: str | np.dtype[Any]) -> str:
    """The protocol datatype name for a numpy dtype (FP32 for float32, ...)."""
    name = np.dtype(dtype).name
    return _DATATYPE_OF.get(name, name.upper())


@dataclass(frozen=True)
class LoadedModel:
    """A warmed, ready session and what it is. `inputs`/`outputs` default to the session's own specs."""

    name: str
    version: int
    fmt: str
    session: ModelSession
    manifest: Manifest | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()

    def __post_init__(self) -> None:
        if not self.inputs:
            object.__setattr__(self, "inputs", tuple(self.session.inputs))
        if not self.outputs:
            object.__setattr__(self, "outputs", tuple(self.session.outputs))

    @property
    def max_batch(self) -> int:
        """The most rows one request may carry, as the bundle's manifest says (64 without a manifest)."""
        return self.manifest.max_batch if self.manifest is not None else DEFAULT_MAX_BATCH


@dataclass(frozen=True)
class InferResult:
    """Outputs of one request, in the model's output order (or the order asked for), and which model made them.

    `all_outputs` holds every output of the model in its own order, whatever the request asked for (observers
    judge accuracy and drift on them); empty means the same as `outputs`."""

    model: LoadedModel
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    run_ms: float = 0.0  # time spent in the session's run()
    all_outputs: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # what the model was fed (after preprocessing)

    def __post_init__(self) -> None:
        if not self.all_outputs:
            object.__setattr__(self, "all_outputs", self.outputs)


class ServeObserver(Protocol):
    """Told about every inference request (telemetry: agent/telemetry/hub.py). Called on the request's thread,
    before its answer is sent: keep it quick. Exceptions are logged, never passed to the request."""

    def answered(self, request_id: str, model: LoadedModel, inputs: dict[str, np.ndarray],
                 outputs: list[np.ndarray] | dict[str, np.ndarray], ms: float) -> None:
        """A request answered by `model`: the id returned to the caller, the decoded inputs, every output of the
        model (a dict in the model's output order) and the latency in ms."""

    def failed(self, model: LoadedModel | None, kind: Literal["error", "rejected"], ms: float | None) -> None:
        """A request refused (`rejected`: the client's fault, 4xx/503) or failed (`error`: the model's, 5xx).
        `model` is the served model the request was for (None: no model, or another name); `ms` None when the
        request never reached the serving layer (body too slow or too large, too many at once)."""


class FeedbackSink(Protocol):
    """Takes labels for earlier answers (POST /v2/models/<name>/feedback, MQTT devices/<id>/feedback)."""

    def feedback(self, model_name: str, request_id: str, label: Any) -> str:
        """"accepted", "unknown", "expired" or "duplicate"; ValueError (a label of the wrong type or shape for
        the prediction) when nothing was changed."""


class RequestStats:
    """Thread-safe request counters and a bounded window of latencies, since the last `reset()`.

    Three outcomes: ok (latency recorded), rejected (the client's fault, 4xx: counted as a request only) and
    error (a server-side failure, 5xx). `error_rate` is errors over the requests the server should have answered
    (ok + errors), so a misbehaving client cannot dilute or inflate the figure probation gates on.

    `reset(tag)` starts a new window, normally at a swap with the new LoadedModel as tag; a sample recorded with
    a different (non-None) tag is one that started on the previous model and is dropped from the new window.
    """

    def __init__(self, window: int = DEFAULT_LATENCY_WINDOW, observers: Sequence[ServeObserver] = ()) -> None:
        if window < 1:
            raise ValueError(f"latency window must be >= 1, got {window}")
        self.observers: list[ServeObserver] = list(observers)  # told about every request (module doc)
        self._observer_warned: dict[int, float] = {}  # id(observer) -> when its last exception was logged
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self._ok = 0
        self._rejected = 0
        self._errors = 0
        self._tag: object | None = None
        self._since = time.monotonic()

    def reset(self, tag: object | None = None) -> None:
        with self._lock:
            self._latencies.clear()
            self._ok = self._rejected = self._errors = 0
            self._tag = tag
            self._since = time.monotonic()

    def _current(self, tag: object | None) -> bool:
        return tag is None or self._tag is None or tag is self._tag

    def record_ok(self, latency_ms: float, tag: object | None = None) -> None:
        with self._lock:
            if self._current(tag):
                self._ok += 1
                self._latencies.append(float(latency_ms))

    def record_answer(self, request_id: str, model: LoadedModel, inputs: dict[str, np.ndarray],
                      outputs: dict[str, np.ndarray], ms: float) -> None:
        """An answered request: counted as ok (on `model`'s window), then the observers are told."""
        self.record_ok(ms, tag=model)
        for observer in list(self.observers):
            try:
                observer.answered(request_id, model, inputs, outputs, ms)
            except Exception:
                self._observer_failed(observer)

    def record_rejected(self, tag: object | None = None, *, model: LoadedModel | None = None,
                        ms: float | None = None) -> None:
        """A request refused as the client's fault; observers are told (`model`: the served model it was for)."""
        with self._lock:
            if self._current(tag):
                self._rejected += 1
        self._failed(model, "rejected", ms)

    def record_error(self, tag: object | None = None, *, model: LoadedModel | None = None,
                     ms: float | None = None) -> None:
        """A request the server failed to answer; observers are told."""
        with self._lock:
            if self._current(tag):
                self._errors += 1
        self._failed(model, "error", ms)

    def _failed(self, model: LoadedModel | None, kind: Literal["error", "rejected"], ms: float | None) -> None:
        for observer in list(self.observers):
            try:
                observer.failed(model, kind, ms)
            except Exception:
                self._observer_failed(observer)

    def _observer_failed(self, observer: ServeObserver) -> None:
        # Called from an except block. With a traceback the first time, then at most every OBSERVER_REWARN_S: an
        # observer broken for good must not flood the journal at the request rate.
        now = time.monotonic()
        with self._lock:
            last = self._observer_warned.get(id(observer))
            loud = last is None or now - last >= OBSERVER_REWARN_S
            if loud:
                self._observer_warned[id(observer)] = now
        if loud:
            log.exception("serving observer %r failed (the request is unaffected)", observer)
        else:
            log.debug("serving observer %r failed again", observer, exc_info=True)

    def snapshot(self) -> dict[str, Any]:
        """count (all requests), ok, rejected, errors, error_rate, latency p50/p95/p99 in ms (None if no samples),
        samples in the window and seconds since the reset."""
        with self._lock:
            lat = np.fromiter(self._latencies, dtype=np.float64, count=len(self._latencies))
            ok, rejected, errors, since = self._ok, self._rejected, self._errors, self._since
        answered = ok + errors
        p50 = p95 = p99 = None
        if lat.size:
            p50, p95, p99 = (float(v) for v in np.percentile(lat, [50, 95, 99]))
        return {
            "count": ok + rejected + errors,
            "ok": ok,
            "rejected": rejected,
            "errors": errors,
            "error_rate": errors / answered if answered else 0.0,
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "samples": int(lat.size),
            "window_s": time.monotonic() - since,
        }


class ModelHolder:
    """Holds the one LoadedModel being served. `swap` replaces it in a single assignment.

    `max_batch` (`[serve] max_batch`) caps every model's own limit: a request may carry at most
    min(manifest's max_batch, max_batch) rows; 0 leaves the manifest's limit as it is.
    """

    def __init__(self, model: LoadedModel | None = None, stats: RequestStats | None = None,
                 max_batch: int = 0) -> None:
        if max_batch < 0:
            raise ValueError(f"max_batch must be >= 0 (0: the manifest's limit), got {max_batch}")
        self._lock = threading.Lock()
        self._model = model
        self._stats = stats
        self.max_batch = max_batch
        if stats is not None and model is not None:
            stats.reset(model)

    def get(self) -> LoadedModel | None:
        return self._model  # one read of one reference: atomic

    def batch_limit(self, model: LoadedModel) -> int:
        """The most rows one request to `model` may carry: its manifest's max_batch, capped by `max_batch`."""
        return min(model.max_batch, self.max_batch) if self.max_batch > 0 else model.max_batch

    def swap(self, new: LoadedModel | None) -> LoadedModel | None:
        """Serve `new` from now on (None: serve nothing) and return what was served before.

        Requests already running keep the model they started with. The stats window restarts for `new`.
        """
        with self._lock:
            old, self._model = self._model, new
            if self._stats is not None:
                self._stats.reset(new)
        log.info("serving %s (was %s)", _describe(new), _describe(old))
        return old

    def infer(
        self,
        name: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        output_names: Sequence[str] | None = None,
        raw: bool = False,
    ) -> InferResult:
        """Run `inputs` on the served model if it is `name` (and `version`); return the outputs asked for (all
        when `output_names` is None or empty). `raw`: the inputs are as a client sends them, and the bundle's
        declared preprocessing (if any) is applied first, with this same model's manifest."""
        model = self._model  # read ONCE: everything below uses this object even if a swap happens meanwhile
        if model is None:
            raise ModelNotReady("no model is loaded yet")
        check_model(model, name, version)
        check_batch({n: np.shape(a) for n, a in inputs.items()}, self.batch_limit(model), model.name)
        if raw:
            inputs = preprocess_inputs(model, inputs)
        feeds = conform_inputs(model, inputs)
        known = [s.name for s in model.outputs]
        wanted = list(output_names) if output_names else known
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise BadRequest(f"unknown output(s) {unknown}; model {model.name!r} has outputs {known}")
        if len(set(wanted)) != len(wanted):
            raise BadRequest(f"output(s) asked for more than once: {wanted}")

        start = time.perf_counter()
        try:
            arrays = model.session.run(feeds)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InferenceFailed(f"model {model.name!r} version {model.version} failed to run: {first}") from e
        run_ms = (time.perf_counter() - start) * 1000.0
        by_name = dict(zip(known, arrays, strict=True))
        return InferResult(model=model, outputs={n: by_name[n] for n in wanted}, run_ms=run_ms, all_outputs=by_name,
                           inputs=feeds)


def preprocess_inputs(model: LoadedModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`inputs` with the manifest's declared preprocessing applied to its input (agent/preprocess.py); as they are
    when the bundle declares none or the input is missing (conform_inputs names it)."""
    spec = model.manifest.preprocess if model.manifest is not None else None
    if spec is None or not isinstance(inputs, dict) or spec.input not in inputs:
        return inputs
    target = next((s for s in model.inputs if s.name == spec.input), None)
    if target is None:
        return inputs
    return {**inputs, spec.input: prepare(spec, np.asarray(inputs[spec.input]), target)}


def check_model(model: LoadedModel | None, name: str, version: str | None) -> LoadedModel:
    """`model` if it serves `name`/`version`; ModelNotReady / ModelNotFound otherwise."""
    if model is None:
        raise ModelNotReady("no model is loaded yet")
    if name != model.name:
        raise ModelNotFound(f"unknown model {name!r}; serving {model.name!r}")
    if version is not None and version != str(model.version):
        raise ModelNotFound(f"model {name!r} has no version {version!r}; serving version {model.version}")
    return model


def check_batch(shapes: Mapping[str, Sequence[int]], limit: int, model_name: str) -> None:
    """BatchTooLarge if any input's leading (batch) dimension is over `limit` rows."""
    for name, shape in shapes.items():
        if len(shape) and shape[0] > limit:
            raise BatchTooLarge(f"input {name!r} has a batch of {shape[0]} rows; model {model_name!r} takes at most "
                                f"{limit} rows per request (max_batch): split the request")


def release_memory() -> None:
    """Hand memory freed by a large request back to the system (glibc `malloc_trim(0)`; a no-op elsewhere).

    glibc keeps freed heap memory for reuse: after one large request (a big JSON body decoded to lists, a large
    batch's tensors) the agent's RSS stays at its peak for good. Trimming takes about 0.1 ms, so callers do it only
    after large requests (see docs/agent.md for the figures)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: list[Any] = []


def _malloc_trim() -> Any:
    if not _TRIM:
        fn = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = getattr(libc, "malloc_trim", None)
        except OSError:
            fn = None
        if fn is not None:
            fn.argtypes = [ctypes.c_size_t]
            fn.restype = ctypes.c_int
        _TRIM.append(fn)
    return _TRIM[0]


def conform_inputs(model: LoadedModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`inputs` checked against the model's input names and cast to the dtypes it wants, the same way for every
    runtime: floats of any width into a float input (refused where the value overflows), integers into a float
    input, integers of any width into an integer input (refused out of range); floats into an integer input and
    anything else are refused. Shapes are left to the session, whose message says what it expected."""
    if not isinstance(inputs, dict):
        raise BadRequest(f"inputs must be a dict of input name -> array, got {type(inputs).__name__}")
    takes = [s.name for s in model.inputs]
    missing = [n for n in takes if n not in inputs]
    unknown = sorted(str(n) for n in inputs if n not in takes)
    if missing or unknown:
        parts = ([f"missing input(s) {missing}"] if missing else []) + (
            [f"unknown input(s) {unknown}"] if unknown else [])
        raise BadRequest(f"{'; '.join(parts)}; model {model.name!r} takes inputs {takes}")
    return {s.name: _conform(s, np.asarray(inputs[s.name])) for s in model.inputs}


def _conform(spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    try:
        want = np.dtype(spec.dtype)
    except TypeError:  # a dtype numpy does not know: let the session judge
        return arr
    got = arr.dtype
    if got == want:
        return arr
    what = f"input {spec.name!r} takes {datatype_of(want)}"
    if want.kind == "f" and got.kind in "fiu":
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.astype(want)
        if got.kind == "f" and got.itemsize > want.itemsize and bool(np.any(np.isinf(out) & np.isfinite(arr))):
            raise BadRequest(f"{what}: values overflow {datatype_of(want)}")
        return out
    if want.kind in "iu" and got.kind in "iu":
        info = np.iinfo(want)
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise BadRequest(f"{what}: values outside its range [{info.min}, {info.max}]")
        return arr.astype(want)
    if want.kind in "iu" and got.kind == "f":
        raise BadRequest(f"{what}; got {datatype_of(got)} data (floats are not converted to integers)")
    raise BadRequest(f"{what}; got {datatype_of(got)} data")


def _describe(model: LoadedModel | None) -> str:
    return "nothing" if model is None else f"{model.name} v{model.version} ({model.fmt})"
