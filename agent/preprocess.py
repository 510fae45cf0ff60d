"""Device-side preprocessing and class names, as a bundle's manifest declares them (agent.bundle.Preprocessing,
agent.bundle.Labels). Pure: numpy only, no runtime, no transport, no clock.

- `prepare(spec, arr, model_input)`: a raw client input (any numeric dtype, in the client's layout, any height and
  width when the manifest resizes) to the float array the model takes. BadRequest (400) names what does not fit.
- `resize(images, height, width, method)`: channel-last images to a new height and width, `nearest` (source pixel
  floor(i * in / out), as torch's and OpenCV's `nearest`) or `bilinear` (half-pixel centres, no antialiasing, as
  torch's `interpolate(..., align_corners=False)` and OpenCV's INTER_LINEAR).
- `top_k(output, k, labels)`: the k best classes of each row, with scores (softmax of the row, or the values as
  they are) and names; ties go to the lower class index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.bundle import MAX_RAW_SIDE, Labels, Preprocessing, TensorSpec
from agent.errors import BadRequest


def _hw(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    return (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])


def _channels(shape: tuple[int, ...], layout: str) -> int:
    return shape[1] if layout == "NCHW" else shape[3]


def raw_shape(spec: Preprocessing, model_input: TensorSpec) -> list[int]:
    """The shape a client sends the raw input in (-1: any size), for model metadata."""
    shape = list(model_input.shape)
    if not spec.image:
        return shape
    n, c = shape[0], _channels(model_input.shape, spec.model_layout)
    h, w = _hw(model_input.shape, spec.model_layout)
    if spec.resize is not None:
        h = w = -1
    return [n, c, h, w] if spec.layout == "NCHW" else [n, h, w, c]


def prepare(spec: Preprocessing, arr: np.ndarray, model_input: TensorSpec) -> np.ndarray:
    """`arr` as sent by a client, preprocessed into what `model_input` takes (float32 unless the model's input is
    another float type). BadRequest when it cannot be (rank, channels, size, datatype)."""
    where = f"input {spec.input!r}"
    if arr.dtype.kind not in "fiu":
        raise BadRequest(f"{where}: preprocessing takes numbers, got {arr.dtype.name} data")
    x = arr.astype(np.float32)
    if spec.image:
        if x.ndim != 4:
            raise BadRequest(f"{where}: send a 4-D image batch in {spec.layout} layout (the bundle preprocesses it); "
                             f"got shape {list(arr.shape)}")
        if spec.layout == "NCHW":
            x = np.transpose(x, (0, 2, 3, 1))  # work channel-last
        channels = max(len(spec.mean), len(spec.std))
        want_c = _channels(model_input.shape, spec.model_layout)
        if (want_c > 0 and x.shape[3] != want_c) or (channels > 1 and x.shape[3] != channels):
            raise BadRequest(f"{where}: {x.shape[3]} channels in {spec.layout} layout, the model takes "
                             f"{want_c if want_c > 0 else channels}")
        h, w = _hw(model_input.shape, spec.model_layout)
        if spec.resize is not None:
            if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[1] > MAX_RAW_SIDE or x.shape[2] > MAX_RAW_SIDE:
                raise BadRequest(f"{where}: height and width must be 1..{MAX_RAW_SIDE}, got {x.shape[1]}x{x.shape[2]}")
            if (x.shape[1], x.shape[2]) != (h, w):
                x = resize(x, h, w, spec.resize)
        elif (h > 0 and x.shape[1] != h) or (w > 0 and x.shape[2] != w):
            raise BadRequest(f"{where}: {x.shape[1]}x{x.shape[2]} pixels, the model takes {h}x{w} (this bundle "
                             "does not resize)")
        x = _normalize(x, spec, axis=3)
        if spec.model_layout == "NCHW":
            x = np.transpose(x, (0, 3, 1, 2))
        x = np.ascontiguousarray(x)
    else:
        x = _normalize(x, spec, axis=None)
    with np.errstate(over="ignore", invalid="ignore"):
        out = x.astype(model_input.dtype, copy=False)
    if not bool(np.isfinite(out).all()):
        raise BadRequest(f"{where}: values overflow {model_input.dtype} after preprocessing")
    return out


def _normalize(x: np.ndarray, spec: Preprocessing, axis: int | None) -> np.ndarray:
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    if axis is not None:  # channel-last: per-channel statistics broadcast over the last axis
        mean, std = mean.reshape(1, 1, 1, -1), std.reshape(1, 1, 1, -1)
    with np.errstate(over="ignore", invalid="ignore"):
        return (x * np.float32(spec.scale) - mean) / std


def resize(images: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Channel-last images [N, H, W, C] resized to [N, height, width, C] (float32)."""
    if method == "nearest":
        rows = _nearest(images.shape[1], height)
        cols = _nearest(images.shape[2], width)
        return images[:, rows][:, :, cols].astype(np.float32, copy=False)
    if method == "bilinear":
        r0, r1, rw = _linear(images.shape[1], height)
        c0, c1, cw = _linear(images.shape[2], width)
        x = images.astype(np.float32, copy=False)
        x = x[:, r0] * (1 - rw)[None, :, None, None] + x[:, r1] * rw[None, :, None, None]
        return x[:, :, c0] * (1 - cw)[None, None, :, None] + x[:, :, c1] * cw[None, None, :, None]
    raise ValueError(f"unknown resize method {method!r}")


def _nearest(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum((np.arange(n_out) * n_in) // n_out, n_in - 1)


def _linear(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


@dataclass(frozen=True)
class ClassScore:
    index: int
    score: float
    name: str | None

    def triton(self) -> str:
        """Triton's classification string `<score>:<index>[:<name>]`."""
        head = f"{self.score:.6g}:{self.index}"
        return head if self.name is None else f"{head}:{self.name}"


def top_k(output: np.ndarray, k: int, labels: Labels | None) -> list[list[ClassScore]]:
    """The `k` (at most the number of classes) best classes of each row of `output` ([batch, ...], classes are
    the flattened rest), best first. Scores are softmax probabilities when `labels.scores` is `softmax` and the
    output's own values otherwise (no labels: the values as they are, as Triton does)."""
    flat = np.asarray(output).reshape(len(output), -1).astype(np.float64)
    if labels is not None and labels.scores == "softmax" and flat.size:
        z = flat - flat.max(axis=1, keepdims=True)
        e = np.exp(z)
        flat = e / e.sum(axis=1, keepdims=True)
    k = min(k, flat.shape[1])
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    names = labels.names if labels is not None else None
    return [[ClassScore(int(i), float(row[i]), names[i] if names is not None and i < len(names) else None)
             for i in idx] for row, idx in zip(flat, order, strict=True)]
