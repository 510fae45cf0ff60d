"""Deterministic, disjoint, stratified splits of sklearn's digits (offline, no download)."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_NAMES: tuple[str, str, str] = ("train", "calib", "eval")
CALIB_SIZE = 360
EVAL_SIZE = 360

Split = tuple[np.ndarray, np.ndarray]


def load_splits(seed: int = 0) -> dict[str, Split]:
    """Return ``{"train", "calib", "eval"}`` -> ``(x, y)`` with 1077/360/360 rows.

    ``x`` is float32 ``(N, 1, 8, 8)`` scaled to [0, 1] (pixel / 16), ``y`` int64 class labels. The splits are
    disjoint, stratified by label and identical for the same ``seed``.
    """
    digits = load_digits()
    x = (np.asarray(digits.images, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(digits.target, dtype=np.int64)
    idx = np.arange(len(y))
    rest_idx, eval_idx = train_test_split(idx, test_size=EVAL_SIZE, stratify=y, random_state=seed)
    train_idx, calib_idx = train_test_split(rest_idx, test_size=CALIB_SIZE, stratify=y[rest_idx], random_state=seed + 1)
    out: dict[str, Split] = {}
    for name, part in zip(SPLIT_NAMES, (train_idx, calib_idx, eval_idx), strict=True):
        part = np.sort(part)
        out[name] = (np.ascontiguousarray(x[part]), np.ascontiguousarray(y[part]))
    return out
