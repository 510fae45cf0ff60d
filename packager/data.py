"""Calibration and evaluation data: `.npz` files, checked against the model's inputs before any work starts."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import TensorSpec, sha256_file
from packager.errors import InputError


@dataclass(frozen=True)
class Dataset:
    """Input arrays keyed by model input name (leading axis = samples), optional labels `y`."""

    path: Path
    sha256: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def n(self) -> int:
        return len(next(iter(self.inputs.values())))

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop] for k, v in self.inputs.items()}

    def head(self, n: int) -> Dataset:
        labels = None if self.labels is None else self.labels[:n]
        return Dataset(self.path, self.sha256, self.rows(0, n), labels)


def load_npz(path: Path, input_names: Sequence[str], role: str, need_labels: bool) -> Dataset:
    """Read `path`; with one model input the array may be called `x`, with several each takes its input's name."""
    if not path.is_file():
        raise InputError(f"{role} data {path}: no such file")
    if not zipfile.is_zipfile(path):
        # np.load would otherwise guess "pickle" for any unknown file
        raise InputError(f"{role} data {path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InputError(f"{role} data {path}: not a readable .npz file ({e})") from e
    except ValueError as e:
        # allow_pickle=False refuses object arrays: we never unpickle data files
        raise InputError(f"{role} data {path}: {e}") from e
    inputs: dict[str, np.ndarray] = {}
    used: list[str] = []
    for name in input_names:
        key = name if name in arrays else ("x" if len(input_names) == 1 and "x" in arrays else None)
        if key is None:
            wanted = f"'{name}'" + (" (or 'x')" if len(input_names) == 1 else "")
            raise InputError(f"{role} data {path}: no array {wanted}; it has {sorted(arrays) or 'no arrays'}")
        inputs[name] = arrays[key]
        used.append(key)
    labels = arrays.get("y")
    if need_labels and labels is None:
        raise InputError(f"{role} data {path}: labels 'y' are required for this task")
    for key in sorted({*used, *(["y"] if labels is not None else [])}):
        _require_finite(arrays[key], f"{role} data {path}: array '{key}'")
    counts = {len(a) if a.ndim else 0 for a in inputs.values()}
    if labels is not None:
        counts.add(len(labels) if labels.ndim else 0)
    if len(counts) != 1 or 0 in counts:
        raise InputError(f"{role} data {path}: arrays are empty or disagree on the number of samples")
    return Dataset(path, sha256_file(path), inputs, labels)


def _require_finite(arr: np.ndarray, what: str) -> None:
    # NaN or inf would pass through every model and only blow up far later (histograms, metrics, calibration
    # ranges), or silently calibrate int8 ranges to nonsense.
    if arr.dtype.kind not in "fc":
        return
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise InputError(f"{what} has {bad} NaN or infinite value(s) of {arr.size}: every value must be finite")


def fit_to_specs(ds: Dataset, specs: Sequence[TensorSpec], role: str) -> Dataset:
    """Cast each input to the dtype the model wants, refusing data whose kind or per-sample shape does not fit."""
    fitted: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = ds.inputs[spec.name]
        want = np.dtype(spec.dtype)
        if want.kind == "f" and arr.dtype.kind != "f":
            raise InputError(f"{role} data {ds.path}: input '{spec.name}' must be floating point "
                             f"({spec.dtype}), got {arr.dtype}")
        if want.kind in "iu" and arr.dtype.kind not in "iu":
            raise InputError(f"{role} data {ds.path}: input '{spec.name}' must be integer ({spec.dtype}), "
                             f"got {arr.dtype}")
        sample_shape = arr.shape[1:]
        model_shape = spec.shape[1:]
        fits = len(sample_shape) == len(model_shape) and all(
            m in (-1, s) for m, s in zip(model_shape, sample_shape, strict=True))
        if not fits:
            shown = tuple("?" if m == -1 else m for m in model_shape)
            raise InputError(f"{role} data {ds.path}: input '{spec.name}' has per-sample shape "
                             f"{tuple(sample_shape)}, the model expects {shown}")
        fitted[spec.name] = np.ascontiguousarray(arr.astype(want, copy=False))
    return Dataset(ds.path, ds.sha256, fitted, ds.labels)
