"""The served model the OIP harnesses answer with: a ModelHolder holding a stand-in session under a real manifest
(tests/fuzz/make_corpus.py's: an NHWC uint8 image resized, normalised and transposed to the model's NCHW float32
input, an int64 side input, and a labelled 4-class output), so requests go through the bundle's preprocessing,
the input checks and top-k classification as on a device. The session checks what it is fed, as a runtime would,
and records that every tensor it was given fits the model and the input budget."""

from __future__ import annotations

import numpy as np

from agent.bundle import TensorSpec
from agent.preprocess import MAX_PREPROCESS_ELEMENTS
from agent.serve.holder import LoadedModel, ModelHolder, RequestStats
from tests.fuzz.common import check
from tests.fuzz.make_corpus import manifest

MANIFEST = manifest()
ARTIFACT = MANIFEST.artifact("onnx")


class Session:
    """Checks its feeds like a runtime (ValueError for a wrong shape: the holder answers 400) and answers cheaply."""

    format = "onnx"
    inputs: tuple[TensorSpec, ...] = ARTIFACT.inputs
    outputs: tuple[TensorSpec, ...] = ARTIFACT.outputs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        check(sorted(feeds) == sorted(s.name for s in self.inputs), f"fed {sorted(feeds)}")
        for spec in self.inputs:
            arr = feeds[spec.name]
            check(arr.dtype == np.dtype(spec.dtype), f"{spec.name} fed as {arr.dtype}, the model takes {spec.dtype}")
            check(arr.size <= MAX_PREPROCESS_ELEMENTS, f"{spec.name} fed {arr.size} elements, over the budget")
            check(arr.ndim == 0 or arr.shape[0] <= MANIFEST.max_batch, f"{spec.name} fed a batch of {arr.shape}")
            if arr.ndim != len(spec.shape) or any(d not in (-1, g) for d, g in zip(spec.shape, arr.shape,
                                                                                     strict=True)):
                raise ValueError(f"input {spec.name!r} has shape {list(arr.shape)}, the model takes {spec.shape}")
        image, meta = feeds["image"], feeds["meta"]
        if image.shape[0] != meta.shape[0]:
            raise ValueError("batch sizes differ")
        check(bool(np.isfinite(image).all()), "non-finite values reached the model")
        n = image.shape[0]
        logits = image.reshape(n, -1)[:, :4] + meta[:, :1].astype(np.float32)
        return [logits.astype(np.float32)]


def holder() -> tuple[ModelHolder, RequestStats]:
    stats = RequestStats()
    model = LoadedModel(MANIFEST.name, MANIFEST.version, "onnx", Session(), manifest=MANIFEST)
    return ModelHolder(model, stats), stats
