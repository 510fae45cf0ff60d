"""Inference runtime adapters. Each outside runtime lives in its own module and is imported only when needed.

Every adapter takes and returns float (or integer id) numpy arrays keyed by input name: int8 quantization of
inputs and dequantization of outputs happens inside the adapter, so callers never see the artifact's dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the caller sees it, plus the artifact's own int8 quantization if any.

    `shape` uses -1 for a dynamic dimension. `dtype` is the numpy dtype name the caller sends or receives
    (float32 for quantized tensors). `scale`/`zero_point` are set when the artifact's tensor is int8/uint8
    and the adapter converts (the TFLite full-int8 case).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None
    quantized_dtype: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.scale is not None:
            out.update(scale=self.scale, zero_point=self.zero_point, quantized_dtype=self.quantized_dtype)
        return out

    @classmethod
    def from_json(cls, d: dict[str, object]) -> TensorSpec:
        shape = d["shape"]
        if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
            raise ValueError(f"tensor {d.get('name')!r}: shape must be a list of integers")
        scale = d.get("scale")
        zp = d.get("zero_point")
        qd = d.get("quantized_dtype")
        return cls(
            name=str(d["name"]),
            shape=tuple(shape),
            dtype=str(d["dtype"]),
            scale=float(scale) if isinstance(scale, (int, float)) else None,
            zero_point=int(zp) if isinstance(zp, int) else None,
            quantized_dtype=str(qd) if qd is not None else None,
        )


class ModelSession(Protocol):
    """A loaded model ready to run. Implementations must be safe to call from several threads."""

    format: str  # "onnx" or "tflite"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; returns one float array per output, in `outputs` order."""
        ...


def open_session(
    path: Path,
    fmt: str,
    threads: int = 1,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ModelSession:
    """Open `path` with the runtime for `fmt`, importing that runtime only now.

    `input_names`/`output_names` rename the artifact's tensors positionally to the model's own names (TFLite
    signatures call them args_0, output_0, ...); None keeps the artifact's names.
    """
    if fmt == "onnx":
        from agent.runtime.onnx_session import OnnxSession

        return OnnxSession(path, threads=threads, input_names=input_names, output_names=output_names)
    if fmt == "tflite":
        from agent.runtime.litert_session import LiteRTSession

        return LiteRTSession(path, threads=threads, input_names=input_names, output_names=output_names)
    raise ValueError(f"unknown model format {fmt!r}")
