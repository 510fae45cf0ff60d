"""ONNX Runtime adapter: a loaded .onnx model behind the ModelSession interface.

QDQ int8 models keep float inputs and outputs, so nothing is (de)quantized here: onnxruntime fuses the
Q/DQ pairs into integer kernels itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import TensorSpec
from agent.errors import RuntimeUnavailable

log = logging.getLogger(__name__)

# Best first. Only those onnxruntime reports as available are used, and CPU always ends the list so
# operators an accelerator cannot take still run.
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)

# onnxruntime's element type names -> numpy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint64)": "uint64",
    "tensor(uint32)": "uint32",
    "tensor(uint16)": "uint16",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def choose_providers(available: Sequence[str]) -> list[str]:
    """The preferred execution providers that are available, best first, always ending with CPU."""
    chosen = [p for p in PREFERRED_PROVIDERS if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def _spec(name: str, shape: Sequence[Any], ort_type: str) -> TensorSpec:
    # Symbolic ("batch", "s77") and unknown (None) dimensions are both dynamic to the caller.
    dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)
    return TensorSpec(name=name, shape=dims, dtype=_ORT_TYPES.get(ort_type, ort_type))


def _rename(artifact: Sequence[str], wanted: Sequence[str] | None, what: str) -> list[str]:
    if wanted is None:
        return list(artifact)
    if len(wanted) != len(artifact):
        raise ValueError(f"model has {len(artifact)} {what}s {list(artifact)}, got {len(wanted)} names {list(wanted)}")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"{what} names must be unique, got {list(wanted)}")
    return list(wanted)


class OnnxSession:
    """An onnxruntime InferenceSession with validated feeds. Safe to call from several threads at once.

    onnxruntime's `run` is thread-safe and this object is never mutated after `__init__`, so no lock.
    """

    format = "onnx"

    def __init__(
        self,
        path: Path,
        threads: int = 1,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeUnavailable(f"onnxruntime is not installed: {e}") from e
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        self._invalid_argument: type[Exception] = InvalidArgument
        path = Path(path)
        if not path.is_file():
            raise RuntimeUnavailable(f"onnxruntime cannot load {path}: no such file")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0: onnxruntime picks), got {threads}")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT's warnings would flood the agent's log on every load
        # Memory: ORT's CPU arena grows to the largest batch ever run and keeps it (a [131070, 1, 8, 8] batch left
        # the digits model's process 1.4 GiB above idle for good). Shrinking the arena after every run hands it back
        # (+0.5 MiB after that batch, +3.3 MiB after 4096 rows before malloc_trim, +0.6 after) at no measurable
        # latency (batch 1: 0.048 ms either way; batch 64: 1.33 vs 1.36 ms). Turning the arena off instead kept more
        # (+6.2 and +43.5 MiB before malloc_trim); so did turning memory patterns off. docs/agent.md has the table.
        opts.enable_cpu_mem_arena = True
        opts.enable_mem_pattern = True
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        providers = choose_providers(ort.get_available_providers())
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeUnavailable(f"onnxruntime cannot load {path.name}: {first}") from e

        ins = self._sess.get_inputs()
        outs = self._sess.get_outputs()
        self._in_names = [i.name for i in ins]  # artifact names, positionally matching self.inputs
        self._out_names = [o.name for o in outs]
        in_caller = _rename(self._in_names, input_names, "input")
        out_caller = _rename(self._out_names, output_names, "output")
        self.inputs: tuple[TensorSpec, ...] = tuple(
            _spec(n, i.shape, i.type) for n, i in zip(in_caller, ins, strict=True))
        self.outputs: tuple[TensorSpec, ...] = tuple(
            _spec(n, o.shape, o.type) for n, o in zip(out_caller, outs, strict=True))
        # A batch dim fixed to 1 on every input: larger batches are run row by row.
        self._batch_one = bool(self.inputs) and all(s.shape[:1] == (1,) for s in self.inputs)
        self.providers: tuple[str, ...] = tuple(self._sess.get_providers())
        log.debug("loaded %s with %s: inputs %s outputs %s", path.name, self.providers,
                  [s.to_json() for s in self.inputs], [s.to_json() for s in self.outputs])

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch (leading axis = rows); returns one array per output, in `outputs` order."""
        arrays = self._validate(feeds)
        rows = {a.shape[0] for a in arrays.values() if a.ndim > 0}
        if self._batch_one and rows == {0}:
            raise ValueError("empty batch: feeds have 0 rows")
        try:
            if self._batch_one and rows and max(rows) > 1:
                n = rows.pop()
                parts = [self._sess.run(self._out_names, {k: v[i:i + 1] for k, v in arrays.items()},
                                        self._run_options) for i in range(n)]
                return [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(self._out_names))]
            return list(self._sess.run(self._out_names, arrays, self._run_options))
        except self._invalid_argument as e:
            # the values, not the model, are wrong (e.g. a token id past the embedding table): the caller's error
            raise ValueError(f"onnxruntime refused the inputs: {str(e).strip().splitlines()[0]}") from e

    def _validate(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, per-sample shapes and dtype kinds; return feeds keyed by artifact name, cast."""
        if not isinstance(feeds, dict):
            raise ValueError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
        wanted = [s.name for s in self.inputs]
        missing = [n for n in wanted if n not in feeds]
        extra = sorted(set(feeds) - set(wanted))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input(s) {missing}")
            if extra:
                parts.append(f"unknown input(s) {extra}")
            raise ValueError(f"{'; '.join(parts)}; the model takes {wanted}")

        out: dict[str, np.ndarray] = {}
        for spec, art_name in zip(self.inputs, self._in_names, strict=True):
            arr = np.asarray(feeds[spec.name])
            out[art_name] = _fit(spec, arr)

        batches = {a.shape[0] for a in out.values() if a.ndim > 0}
        if len(batches) > 1:
            got = {s.name: out[a].shape[0] for s, a in zip(self.inputs, self._in_names, strict=True)
                   if out[a].ndim > 0}
            raise ValueError(f"inputs disagree on the number of rows: {got}")
        return out


def _fit(spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    """`arr` cast to the dtype `spec` wants, or ValueError if its kind or shape does not fit."""
    want = np.dtype(spec.dtype)
    got = arr.dtype
    if want.kind == "f":
        if got.kind != "f":
            raise ValueError(f"input {spec.name!r}: expected floating point ({spec.dtype}), got {got}")
        arr = arr.astype(want, copy=False)
    elif want.kind in "iu":
        if got.kind not in "iu":
            raise ValueError(f"input {spec.name!r}: expected integer ({spec.dtype}), got {got}")
        if got != want:
            info = np.iinfo(want)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"input {spec.name!r}: values outside the range of {spec.dtype}")
            arr = arr.astype(want)
    elif want.kind == "b":
        if got.kind != "b":
            raise ValueError(f"input {spec.name!r}: expected bool, got {got}")
    elif got != want:
        raise ValueError(f"input {spec.name!r}: expected {spec.dtype}, got {got}")

    if arr.ndim != len(spec.shape):
        raise ValueError(f"input {spec.name!r}: expected {len(spec.shape)} dimensions (shape "
                         f"{_show(spec.shape)}), got shape {arr.shape}")
    # Per-sample dims (after the leading batch axis) must match the model's static ones.
    for axis, (m, a) in enumerate(zip(spec.shape, arr.shape, strict=True)):
        if axis == 0 and m == 1:
            continue  # fixed batch 1: more rows are looped over
        if m != -1 and m != a:
            raise ValueError(f"input {spec.name!r}: expected shape {_show(spec.shape)}, got {arr.shape} "
                             f"(axis {axis} must be {m})")
    return np.ascontiguousarray(arr)


def _show(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("?" if d == -1 else str(d) for d in shape) + ")"
