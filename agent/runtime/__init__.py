"""Inference runtime adapters. Each outside runtime lives in its own module and is imported only when needed.

The daemon imports a runtime only after the runtime probe (agent/runtime/probe.py) imported it and ran a model
with it in a child process: a runtime that crashes there costs one format, not the device.

Every adapter takes and returns float (or integer id) numpy arrays keyed by input name: int8 quantization of
inputs and dequantization of outputs happens inside the adapter, so callers never see the artifact's dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.bundle import TensorSpec


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
