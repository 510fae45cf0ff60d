"""Device-side preprocessing and class names, as a bundle's manifest declares them (agent.bundle.Preprocessing,
agent.bundle.Labels). Pure: numpy only, no runtime, no transport, no clock.

- `prepare(spec, arr, model_input)`: a raw client input (any numeric dtype, in the client's layout, any height and
  width when the manifest resizes) to the float array the model takes. BadRequest (400) names what does not fit;
  InputTooLarge (413) refuses, from the shape alone, an input over MAX_PREPROCESS_ELEMENTS. Memory: the output plus
  tiles of CHUNK_ELEMENTS.
- `resize(images, height, width, method)`: channel-last images to a new height and width, `nearest` (source pixel
  floor(i * in / out), as torch's and OpenCV's `nearest`) or `bilinear` (half-pixel centres, no antialiasing, as
  torch's `interpolate(..., align_corners=False)` and OpenCV's INTER_LINEAR).
- `top_k(output, k, labels)`: the k best classes of each row, with scores (softmax of the row, or the values as
  they are) and names; ties go to the lower class index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.bundle import MAX_CHANNELS, MAX_RAW_SIDE, Labels, Preprocessing, TensorSpec
from agent.errors import BadRequest, InputTooLarge
from agent.limits import MAX_MESSAGE_BYTES

# The most elements one input's preprocessing may work on: N x max(H_in, h) x max(W_in, w) x C for an image (input,
# output and the resize intermediate each fit in it), the element count otherwise. Twice MAX_MESSAGE_BYTES: 32 Mi
# elements, 128 MiB as float32, four times the numbers a 16 MiB JSON body can carry (2 bytes each at the least) and
# room for 64 224x224 RGB images (9.6 M). A larger request is refused (InputTooLarge, 413) before any conversion.
MAX_PREPROCESS_ELEMENTS = 2 * MAX_MESSAGE_BYTES
# Images are preprocessed in tiles of about this many elements (several whole images, or bands of rows of a large
# one), so temporaries (float copies, bilinear's two gathers) stay a few MiB next to the output.
CHUNK_ELEMENTS = 1 << 20


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


def work_elements(n: int, in_hw: tuple[int, int], out_hw: tuple[int, int], channels: int) -> int:
    """The elements a request's image preprocessing is charged: N x max(H_in, h) x max(W_in, w) x C, a bound on
    its input, its output and the intermediate between resize passes (each of them fits in it)."""
    return n * max(in_hw[0], out_hw[0]) * max(in_hw[1], out_hw[1]) * channels


def prepare(spec: Preprocessing, arr: np.ndarray, model_input: TensorSpec) -> np.ndarray:
    """`arr` as sent by a client, preprocessed into what `model_input` takes (float32 unless the model's input is
    another float type). BadRequest when it cannot be (rank, channels, size, datatype); InputTooLarge (413) when
    it would need more than MAX_PREPROCESS_ELEMENTS, refused before anything is converted or allocated."""
    where = f"input {spec.input!r}"
    if arr.dtype.kind not in "fiu":
        raise BadRequest(f"{where}: preprocessing takes numbers, got {arr.dtype.name} data")
    if not spec.image:
        _check_budget(where, arr.size, f"shape {list(arr.shape)}")
        x = arr.astype(np.float32)  # a copy: normalized in place below
        _normalize(x, spec)
        return _cast(where, x, model_input.dtype)
    if arr.ndim != 4:
        raise BadRequest(f"{where}: send a 4-D image batch in {spec.layout} layout (the bundle preprocesses it); "
                         f"got shape {list(arr.shape)}")
    x = np.transpose(arr, (0, 2, 3, 1)) if spec.layout == "NCHW" else arr  # a view: work channel-last
    n, in_h, in_w, c = x.shape
    stats = max(len(spec.mean), len(spec.std))
    want_c = _channels(model_input.shape, spec.model_layout)
    if (want_c > 0 and c != want_c) or (stats > 1 and c != stats):
        raise BadRequest(f"{where}: {c} channels in {spec.layout} layout, the model takes "
                         f"{want_c if want_c > 0 else stats}")
    if not 1 <= c <= MAX_CHANNELS:  # the model's channel count is -1 and one mean/std: any count, within bounds
        raise BadRequest(f"{where}: {c} channels in {spec.layout} layout, the model takes 1..{MAX_CHANNELS}")
    h, w = _hw(model_input.shape, spec.model_layout)
    if spec.resize is not None:
        if in_h < 1 or in_w < 1 or in_h > MAX_RAW_SIDE or in_w > MAX_RAW_SIDE:
            raise BadRequest(f"{where}: height and width must be 1..{MAX_RAW_SIDE}, got {in_h}x{in_w}")
    elif (h > 0 and in_h != h) or (w > 0 and in_w != w):
        raise BadRequest(f"{where}: {in_h}x{in_w} pixels, the model takes {h}x{w} (this bundle does not resize)")
    else:
        h, w = in_h, in_w
    _check_budget(where, work_elements(n, (in_h, in_w), (h, w), c),
                  f"{n} images of {in_h}x{in_w}x{c} to {h}x{w} (N x max(height) x max(width) x channels)")
    dtype = np.dtype(model_input.dtype)
    out = np.empty((n, c, h, w) if spec.model_layout == "NCHW" else (n, h, w, c), dtype)
    view = np.transpose(out, (0, 2, 3, 1)) if spec.model_layout == "NCHW" else out  # channel-last, writes to out
    resizing = (in_h, in_w) != (h, w)
    rows = _table(in_h, h, spec.resize or "nearest") if resizing else None
    cols = _table(in_w, w, spec.resize or "nearest") if resizing else None
    # Tiles of about CHUNK_ELEMENTS: several whole images, or bands of rows of one large image, so the float copies
    # and bilinear's two gathers stay that small whatever the shapes; the output is the one full-size array.
    per_row = max(in_w, w) * c  # the most one output row costs in a tile's float arrays (see _resize_tile)
    step = max(1, CHUNK_ELEMENTS // max(1, work_elements(1, (in_h, in_w), (h, w), c)))
    band = h if step > 1 else max(1, CHUNK_ELEMENTS // max(1, per_row))
    for i in range(0, n, step):
        for r in range(0, h, band):
            if rows is not None and cols is not None:
                part = _resize_tile(x[i:i + step], _rows(rows, r, r + band), cols, (in_h, in_w), (h, w))
            else:
                part = x[i:i + step, r:r + band].astype(np.float32)
            _normalize(part, spec)
            with np.errstate(over="ignore", invalid="ignore"):
                view[i:i + step, r:r + band] = part
            del part
            if not bool(np.isfinite(view[i:i + step, r:r + band]).all()):
                raise BadRequest(f"{where}: values overflow {dtype} after preprocessing")
    return out


def _check_budget(where: str, elements: int, what: str) -> None:
    if elements > MAX_PREPROCESS_ELEMENTS:
        raise InputTooLarge(f"{where}: {what} is {elements} elements to preprocess, more than the limit of "
                            f"{MAX_PREPROCESS_ELEMENTS}: send fewer or smaller images")


def _cast(where: str, x: np.ndarray, dtype: np.dtype[Any] | str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        out = x.astype(dtype, copy=False)
    if not bool(np.isfinite(out).all()):
        raise BadRequest(f"{where}: values overflow {out.dtype} after preprocessing")
    return out


def _normalize(x: np.ndarray, spec: Preprocessing) -> None:
    """(x * scale - mean) / std in place on float32 `x`; per-channel statistics go along the last axis."""
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        x *= np.float32(spec.scale)
        x -= mean
        x /= std


def resize(images: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Channel-last images [N, H, W, C] (any numeric dtype) resized to [N, height, width, C] float32."""
    if method not in ("nearest", "bilinear"):
        raise ValueError(f"unknown resize method {method!r}")
    in_hw = (images.shape[1], images.shape[2])
    if in_hw == (height, width):
        return images.astype(np.float32)
    return _resize_tile(images, _table(in_hw[0], height, method), _table(in_hw[1], width, method), in_hw,
                        (height, width))


# How one axis resizes: for each output index, the source indices below and above and the weight of the one above
# (nearest: the same index twice, no weight).
_Table = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _table(n_in: int, n_out: int, method: str) -> _Table:
    if method == "nearest":
        idx = _nearest(n_in, n_out)
        return idx, idx, None
    return _linear(n_in, n_out)


def _rows(table: _Table, start: int, stop: int) -> _Table:
    lo, hi, frac = table
    return lo[start:stop], hi[start:stop], None if frac is None else frac[start:stop]


def _resize_tile(x: np.ndarray, rows: _Table, cols: _Table, in_hw: tuple[int, int],
                 out_hw: tuple[int, int]) -> np.ndarray:
    """The output rows `rows` describes, of channel-last `x` resized from `in_hw` to `out_hw`, as float32.

    One axis at a time, the one that shrinks most (or grows least) first, so the intermediate is never larger than
    the input or the output; only the source rows those output rows need are read, and the input is converted to
    float32 as each pass gathers from it. So a band of b output rows makes float arrays of at most
    b x max(in_width, out_width) x C elements: when the width goes first it shrinks more than the height, and the
    b x in_height / out_height source rows times out_width are at most b x in_width."""
    lo, hi, frac = rows
    first, last = int(lo.min()), int(hi.max()) + 1
    x = x[:, first:last]
    rows = (lo - first, hi - first, frac)
    steps = [(1, rows, in_hw[0] != out_hw[0]), (2, cols, in_hw[1] != out_hw[1])]
    if out_hw[1] * in_hw[0] < out_hw[0] * in_hw[1]:  # width / in_width < height / in_height: width shrinks more
        steps.reverse()
    for axis, table, changes in steps:
        if changes or (axis == 1 and x.shape[1] != len(table[0])):  # a band of rows is a selection even at scale 1
            x = _gather(x, axis, table)
    return x.astype(np.float32, copy=False)


def _gather(x: np.ndarray, axis: int, table: _Table) -> np.ndarray:
    lo, hi, frac = table
    if frac is None:
        return np.take(x, lo, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = len(lo)
    frac = frac.reshape(shape)
    y = np.take(x, lo, axis=axis).astype(np.float32, copy=False)
    y *= 1 - frac
    z = np.take(x, hi, axis=axis).astype(np.float32, copy=False)
    z *= frac
    y += z
    return y


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
