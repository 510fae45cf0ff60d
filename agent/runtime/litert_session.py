"""LiteRT (TFLite) adapter: float in, float out, int8 inside.

Uses `ai_edge_litert` (falling back to `tflite_runtime` only when it is missing). The XNNPACK delegate is
applied by the interpreter's default op resolver. Models converted with a fixed batch of 1 (litert-torch's
usual output) still take any number of rows: `run` feeds them in chunks of the model's batch.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import TensorSpec
from agent.errors import RuntimeUnavailable

logger = logging.getLogger(__name__)

_RUNTIME_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")
_DEFAULT_SIGNATURE = "serving_default"
# litert-torch names signature tensors after the forward's positions; the signature list sorts them as
# strings (args_10 before args_2), so order by the number instead.
_POSITIONAL_NAME = re.compile(r"^(?:args|output)_(\d+)$")


def _interpreter_class() -> Any:
    for module_name in _RUNTIME_MODULES:
        try:
            return importlib.import_module(module_name).Interpreter
        except ImportError as e:
            logger.debug("TFLite runtime %s unavailable: %s", module_name, e)
    raise RuntimeUnavailable("no TFLite runtime installed: install ai-edge-litert (or tflite-runtime)")


@dataclass(frozen=True)
class _Tensor:
    """One artifact tensor: how to reach it and how to convert to/from what the caller uses."""

    key: str  # signature name, or tensor index (as text) for models without a signature
    index: int
    shape: tuple[int, ...]  # artifact shape, -1 where dynamic
    dtype: np.dtype[Any]  # artifact dtype
    scale: float | None
    zero_point: int | None

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def caller_dtype(self) -> np.dtype[Any]:
        if self.quantized or self.dtype.kind == "f":
            return np.dtype(np.float32)
        return self.dtype


def _shape_text(shape: Sequence[int]) -> str:
    """(N, 1, 8, 8): N for the batch dimension, ? for any other dynamic one."""
    dims = ["N" if i == 0 and d == -1 else "?" if d == -1 else str(d) for i, d in enumerate(shape)]
    return "(" + ", ".join(dims) + ")"


def _tensor_from_detail(key: str, detail: dict[str, Any], path: Path) -> _Tensor:
    shape_sig = detail.get("shape_signature")
    if shape_sig is None or len(shape_sig) != len(detail["shape"]):
        shape_sig = detail["shape"]
    dtype = np.dtype(detail["dtype"])
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), dtype=np.float64).ravel()
    zero_points = np.asarray(params.get("zero_points", []), dtype=np.int64).ravel()
    if scales.size == 0:  # older runtimes only fill the legacy (scale, zero_point) pair
        legacy_scale, legacy_zp = detail.get("quantization", (0.0, 0))
        scales = np.array([legacy_scale], dtype=np.float64)
        zero_points = np.array([legacy_zp], dtype=np.int64)
    scale: float | None = None
    zero_point: int | None = None
    if dtype.kind in "iu" and scales.size and float(scales[0]) != 0.0:
        if scales.size > 1:
            raise RuntimeUnavailable(
                f"{path}: tensor {key!r} is quantized per channel; model inputs/outputs must be per tensor"
            )
        scale = float(scales[0])
        zero_point = int(zero_points[0]) if zero_points.size else 0
    return _Tensor(
        key=key,
        index=int(detail["index"]),
        shape=tuple(int(d) for d in shape_sig),
        dtype=dtype,
        scale=scale,
        zero_point=zero_point,
    )


def _order_key(name: str, position: int) -> tuple[int, int]:
    m = _POSITIONAL_NAME.match(name)
    return (0, int(m.group(1))) if m else (1, position)


def _rename(tensors: Sequence[_Tensor], names: Sequence[str] | None, kind: str, path: Path) -> list[str]:
    if names is None:
        return [t.key for t in tensors]
    names = list(names)
    if len(names) != len(tensors):
        raise ValueError(
            f"{path}: {len(names)} {kind} names given ({', '.join(names)}) but the model has {len(tensors)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate {kind} names: {', '.join(names)}")
    return names


class LiteRTSession:
    """A TFLite model ready to run; `run` is safe to call from several threads (one lock per session)."""

    format = "tflite"

    def __init__(
        self,
        path: Path,
        threads: int = 1,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.path = Path(path)
        interpreter_cls = _interpreter_class()
        if not self.path.is_file():
            raise RuntimeUnavailable(f"TFLite model {self.path} does not exist or is not a file")
        try:
            self._interpreter = interpreter_cls(model_path=str(self.path), num_threads=threads)
            signatures: dict[str, Any] = self._interpreter.get_signature_list() or {}
        except (ValueError, RuntimeError) as e:
            raise RuntimeUnavailable(f"cannot load TFLite model {self.path}: {e}") from e

        self._runner: Any = None
        self._allocated: dict[int, tuple[int, ...]] = {}  # input shapes allocated (no-signature models only)
        try:
            if signatures:
                key = _DEFAULT_SIGNATURE if _DEFAULT_SIGNATURE in signatures else sorted(signatures)[0]
                if len(signatures) > 1:
                    logger.info("%s has signatures %s; using %r", self.path, sorted(signatures), key)
                # Once a runner exists the interpreter's own invoke() refuses to run, so use only the runner.
                self._runner = self._interpreter.get_signature_runner(key)
                in_details = self._runner.get_input_details()
                out_details = self._runner.get_output_details()
                ins = [_tensor_from_detail(k, d, self.path) for k, d in in_details.items()]
                outs = [_tensor_from_detail(k, d, self.path) for k, d in out_details.items()]
                ins = [t for _, t in sorted(enumerate(ins), key=lambda p: _order_key(p[1].key, p[0]))]
                outs = [t for _, t in sorted(enumerate(outs), key=lambda p: _order_key(p[1].key, p[0]))]
            else:
                ins = [_tensor_from_detail(d["name"], d, self.path) for d in self._interpreter.get_input_details()]
                outs = [_tensor_from_detail(d["name"], d, self.path) for d in self._interpreter.get_output_details()]
                self._interpreter.allocate_tensors()
                self._allocated = {int(d["index"]): tuple(d["shape"]) for d in self._interpreter.get_input_details()}
        except (ValueError, RuntimeError) as e:
            raise RuntimeUnavailable(f"cannot prepare TFLite model {self.path}: {e}") from e
        if not ins or not outs:
            raise RuntimeUnavailable(f"TFLite model {self.path} has no inputs or no outputs")

        self._ins = ins
        self._outs = outs
        # Every input must carry a leading batch dimension for `run` to split/join rows.
        self._batched = all(len(t.shape) >= 1 for t in ins)
        fixed = {t.shape[0] for t in ins if self._batched and t.shape[0] != -1}
        if len(fixed) > 1:
            self._batched = False  # inputs disagree on the batch size: run exactly as given
        self._model_batch = fixed.pop() if self._batched and fixed else None  # None: dynamic batch
        self._outs_batched = self._batched and all(
            len(t.shape) >= 1 and t.shape[0] in (-1, self._model_batch) for t in outs
        )

        in_names = _rename(ins, input_names, "input", self.path)
        out_names = _rename(outs, output_names, "output", self.path)
        self.inputs: tuple[TensorSpec, ...] = tuple(
            self._spec(name, t, self._batched) for name, t in zip(in_names, ins, strict=True)
        )
        self.outputs: tuple[TensorSpec, ...] = tuple(
            self._spec(name, t, self._outs_batched) for name, t in zip(out_names, outs, strict=True)
        )
        self._lock = threading.Lock()
        logger.debug(
            "opened %s: inputs %s, outputs %s, model batch %s",
            self.path,
            [s.to_json() for s in self.inputs],
            [s.to_json() for s in self.outputs],
            self._model_batch if self._batched else "n/a",
        )

    @staticmethod
    def _spec(name: str, t: _Tensor, batched: bool) -> TensorSpec:
        shape = (-1, *t.shape[1:]) if batched else t.shape
        return TensorSpec(
            name=name,
            shape=shape,
            dtype=t.caller_dtype.name,
            scale=t.scale,
            zero_point=t.zero_point,
            quantized_dtype=t.dtype.name if t.quantized else None,
        )

    # ---- feeding -----------------------------------------------------------------------------------------

    def _check_feeds(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        expected = [s.name for s in self.inputs]
        missing = [n for n in expected if n not in feeds]
        extra = sorted(str(n) for n in feeds if n not in expected)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
            if extra:
                parts.append(f"unexpected input(s) {', '.join(map(repr, extra))}")
            raise ValueError(f"{'; '.join(parts)}; the model takes {', '.join(map(repr, expected))}")

        arrays = []
        for spec, t in zip(self.inputs, self._ins, strict=True):
            try:
                arr = np.asarray(feeds[spec.name])
            except (ValueError, TypeError) as e:
                raise ValueError(f"input {spec.name!r}: cannot be read as an array: {e}") from e
            if arr.dtype.kind not in "biuf":
                raise ValueError(f"input {spec.name!r}: expected numeric ({spec.dtype}) data, got dtype {arr.dtype}")
            want = spec.shape
            if arr.ndim != len(want) or any(w != -1 and w != g for w, g in zip(want, arr.shape, strict=True)):
                raise ValueError(f"input {spec.name!r}: expected shape {_shape_text(want)}, got {tuple(arr.shape)}")
            arrays.append(self._to_artifact(spec.name, t, arr))

        if self._batched:
            rows = {a.shape[0] for a in arrays}
            if len(rows) > 1:
                got = ", ".join(f"{s.name}={a.shape[0]}" for s, a in zip(self.inputs, arrays, strict=True))
                raise ValueError(f"inputs have different batch sizes ({got})")
        return arrays

    @staticmethod
    def _to_artifact(name: str, t: _Tensor, arr: np.ndarray) -> np.ndarray:
        if t.quantized:
            assert t.scale is not None and t.zero_point is not None
            if arr.dtype.kind == "f" and np.isnan(arr).any():
                raise ValueError(f"input {name!r}: contains NaN")
            info = np.iinfo(t.dtype)
            q = np.round(arr.astype(np.float64) / t.scale) + t.zero_point
            return np.clip(q, info.min, info.max).astype(t.dtype)
        if t.dtype.kind in "iu":
            # Token ids may arrive as floats (JSON); accept them only if they are whole numbers.
            if arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
                raise ValueError(f"input {name!r}: expected integer values ({t.dtype}), got fractional floats")
            info = np.iinfo(t.dtype)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"input {name!r}: values outside the {t.dtype} range [{info.min}, {info.max}]")
            return arr.astype(t.dtype)
        return arr.astype(t.dtype, copy=False)

    @staticmethod
    def _from_artifact(t: _Tensor, arr: np.ndarray) -> np.ndarray:
        if t.quantized:
            assert t.scale is not None and t.zero_point is not None
            return ((arr.astype(np.float32) - np.float32(t.zero_point)) * np.float32(t.scale)).astype(np.float32)
        if t.dtype.kind == "f":
            return arr.astype(np.float32, copy=False)
        return arr

    # ---- running -----------------------------------------------------------------------------------------

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One interpreter call on artifact-typed arrays whose batch the model accepts. Caller holds the lock."""
        if self._runner is not None:
            result = self._runner(**{t.key: a for t, a in zip(self._ins, arrays, strict=True)})
            return [result[t.key] for t in self._outs]
        interp = self._interpreter
        resized = False
        for t, a in zip(self._ins, arrays, strict=True):
            if self._allocated.get(t.index) != a.shape:
                interp.resize_tensor_input(t.index, list(a.shape))
                self._allocated[t.index] = a.shape
                resized = True
        if resized:
            interp.allocate_tensors()
        for t, a in zip(self._ins, arrays, strict=True):
            interp.set_tensor(t.index, a)
        interp.invoke()
        return [interp.get_tensor(t.index) for t in self._outs]

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        if self._model_batch is None:
            return [(0, n)]
        b = self._model_batch
        return [(s, min(s + b, n)) for s in range(0, n, b)]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run N rows (any N >= 0 when the model has a batch dimension); one float array per output."""
        arrays = self._check_feeds(feeds)
        if not self._batched:
            with self._lock:
                outs = self._invoke_checked(arrays)
            return [self._from_artifact(t, o) for t, o in zip(self._outs, outs, strict=True)]

        n = arrays[0].shape[0]
        if n != self._model_batch and not self._outs_batched:
            raise ValueError(
                f"this model's outputs have no batch dimension, so it runs exactly {self._model_batch} row(s); got {n}"
            )
        if n == 0:
            return [np.zeros((0, *(max(d, 0) for d in s.shape[1:])), dtype=s.dtype) for s in self.outputs]

        pieces: list[list[np.ndarray]] = [[] for _ in self._outs]
        with self._lock:
            for start, stop in self._chunks(n):
                chunk = [a[start:stop] for a in arrays]
                short = 0
                if self._model_batch is not None and stop - start < self._model_batch:
                    # Fixed batch > 1 and a partial last chunk: pad by repeating the last row, drop it after.
                    short = self._model_batch - (stop - start)
                    chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
                for i, out in enumerate(self._invoke_checked(chunk)):
                    pieces[i].append(out[: out.shape[0] - short] if short else out)
        return [
            self._from_artifact(t, np.concatenate(p) if len(p) > 1 else p[0])
            for t, p in zip(self._outs, pieces, strict=True)
        ]

    def _invoke_checked(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        try:
            return self._invoke(arrays)
        except (ValueError, RuntimeError) as e:
            # Shapes and dtypes were checked already, so this is the model/runtime failing, not the caller.
            raise RuntimeUnavailable(f"TFLite model {self.path} failed to run: {e}") from e
