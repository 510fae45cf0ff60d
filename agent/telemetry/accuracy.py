"""Accuracy from labelled feedback: a bounded book of recent predictions, running figures per version, and the
Wilson score interval for a proportion.

An application that learns the true value of an earlier prediction reports it by the answer's request id. The book
keeps only what scoring needs, per prediction:
- classification: the arg-max class of each row of the first output (a tuple of ints) and the class count;
- regression: the first output's values as float32 bytes (outputs with more than MAX_REGRESSION_VALUES values are
  not remembered: their feedback is "unknown");
- embedding: nothing (an embedding has no label; feedback for one raises ValueError).
Bytes per entry (CPython 3.11, 64-bit, a 36-character uuid request id included, measured with tracemalloc by
tests/unit/test_telemetry_figures.py): about 310 for a batch-1 classification, about 300 + 4 per value for
regression. So the default 10,000 entries take about 3 MiB for classification; the worst case for regression is
max_entries * (300 + 4 * MAX_REGRESSION_VALUES) bytes (about 13 MiB at the defaults).

Eviction is by insertion order once max_entries is reached; an evicted id is "unknown". An id remembered longer ago
than ttl_s and not yet evicted is "expired". An id labelled once is "duplicate" after (its prediction is freed).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

FeedbackResult = Literal["accepted", "unknown", "expired", "duplicate"]
MAX_REGRESSION_VALUES = 256
_MAX_LABEL_DEPTH = 4


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval for `successes` out of `n` (z = 1.96: 95%); None when n == 0.

    Unlike the normal approximation it stays within [0, 1] and is sensible at 0 or n successes and small n.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class _Prediction:
    __slots__ = ("classes", "expires", "labelled", "name", "payload", "task", "version")

    def __init__(self, name: str, version: int, task: str, expires: float, classes: int,
                 payload: tuple[int, ...] | bytes | None) -> None:
        self.name, self.version, self.task, self.expires = name, version, task, expires
        self.classes, self.payload, self.labelled = classes, payload, False


class _Running:
    __slots__ = ("abs_error", "correct", "task", "total", "values")

    def __init__(self, task: str) -> None:
        self.task = task
        self.total = 0  # predictions (rows) labelled
        self.correct = 0  # classification: rows whose arg-max equals the label
        self.abs_error = 0.0  # regression: sum of |output - label| over every value
        self.values = 0  # regression: how many values abs_error sums over


class FeedbackBook:
    """Recent predictions by request id and the running accuracy per (name, version). Thread-safe (one lock)."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float]) -> None:
        if max_entries < 1 or not ttl_s > 0:
            raise ValueError("max_entries must be >= 1 and ttl_s > 0")
        self.max_entries, self.ttl_s, self._clock = max_entries, ttl_s, clock
        self._lock = threading.Lock()
        self._book: OrderedDict[str, _Prediction] = OrderedDict()
        self._running: dict[tuple[str, int], _Running] = {}
        self.unknown_total = 0
        self.expired_total = 0
        self.duplicate_total = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._book)

    def remember(self, request_id: str, name: str, version: int, task: str,
                 outputs: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> None:
        """Keep what scoring `request_id` later needs (its first output). A repeated id replaces the older one."""
        first = _first_output(outputs)
        classes = 0
        payload: tuple[int, ...] | bytes | None = None
        if first is not None and first.size:
            rows = first.reshape(len(first), -1) if first.ndim > 1 else first.reshape(1, -1)
            if task == "classification":
                classes = rows.shape[1]
                payload = tuple(int(i) for i in np.argmax(rows, axis=1))
            elif task == "regression":
                if first.size > MAX_REGRESSION_VALUES:
                    return
                payload = np.ascontiguousarray(first, dtype=np.float32).reshape(-1).tobytes()
        entry = _Prediction(name, version, task, self._clock() + self.ttl_s, classes, payload)
        with self._lock:
            self._book.pop(request_id, None)
            self._book[request_id] = entry
            while len(self._book) > self.max_entries:
                self._book.popitem(last=False)

    def feedback(self, request_id: str, label: Any) -> FeedbackResult:
        """Score the prediction `request_id` against `label`.

        classification: an int class index (a list of one per row for a batch); regression: a number, or a
        (nested) list of numbers with as many values as the output. ValueError for a label of the wrong type or
        shape, or an embedding's id: nothing changes then (no figure, and the id can still be labelled).
        """
        with self._lock:
            entry = self._book.get(request_id)
            if entry is None:
                self.unknown_total += 1
                return "unknown"
            if entry.labelled:
                self.duplicate_total += 1
                return "duplicate"
            if self._clock() > entry.expires:
                self.expired_total += 1
                return "expired"
            if entry.payload is None:
                raise ValueError(f"a {entry.task} prediction takes no label")
            running = self._running.get((entry.name, entry.version))
            if running is None:
                running = _Running(entry.task)
            if isinstance(entry.payload, tuple):
                labels = _class_labels(label, len(entry.payload), entry.classes)
                correct = sum(int(a == b) for a, b in zip(entry.payload, labels, strict=True))
                running.correct += correct
                running.total += len(labels)
            else:
                out = np.frombuffer(entry.payload, dtype=np.float32).astype(np.float64)
                want = _regression_label(label, out.size)
                running.abs_error += float(np.sum(np.abs(out - want)))
                running.values += out.size
                running.total += 1
            self._running[(entry.name, entry.version)] = running
            entry.labelled, entry.payload = True, None
            return "accepted"

    def snapshot(self, name: str | None, version: int | None) -> dict[str, Any]:
        """Flat figures of one version. Every key is always present; those that do not apply (or have no data
        yet) are None. accuracy and its 95% Wilson interval are fractions in [0, 1] over labelled rows;
        feedback_mae is the mean absolute error over every labelled value. The unknown/expired/duplicate counts
        are the book's (an unknown id has no version)."""
        with self._lock:
            r = self._running.get((name, version)) if name is not None and version is not None else None
            accuracy = low = high = mae = None
            if r is not None and r.task == "classification" and r.total:
                accuracy = r.correct / r.total
                low, high = wilson_interval(r.correct, r.total) or (None, None)
            if r is not None and r.task == "regression" and r.values:
                mae = r.abs_error / r.values
            return {"accuracy": accuracy, "accuracy_low": low, "accuracy_high": high, "feedback_mae": mae,
                    "feedback_total": r.total if r is not None else 0,
                    "feedback_unknown_total": self.unknown_total, "feedback_expired_total": self.expired_total,
                    "feedback_duplicate_total": self.duplicate_total}


def _first_output(outputs: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> np.ndarray | None:
    values = list(outputs.values()) if isinstance(outputs, Mapping) else list(outputs)
    return np.asarray(values[0]) if values else None


def _class_label(x: Any, classes: int) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"a classification label must be an integer class index, got {type(x).__name__}")
    if not 0 <= int(x) < classes:
        raise ValueError(f"class {int(x)} is out of range: the model has {classes} classes")
    return int(x)


def _class_labels(label: Any, rows: int, classes: int) -> list[int]:
    if isinstance(label, list):
        if len(label) != rows:
            raise ValueError(f"the prediction has {rows} rows, the label {len(label)} classes")
        return [_class_label(x, classes) for x in label]
    if rows != 1:
        raise ValueError(f"the prediction has {rows} rows: give a list of {rows} class indices")
    return [_class_label(label, classes)]


def _regression_label(label: Any, size: int) -> np.ndarray:
    flat: list[float] = []

    def walk(x: Any, depth: int) -> None:
        if isinstance(x, list):
            if depth >= _MAX_LABEL_DEPTH:
                raise ValueError("a regression label is nested too deeply")
            for y in x:
                walk(y, depth + 1)
                if len(flat) > size:
                    raise ValueError(f"a regression label must have {size} values, got more")
            return
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ValueError(f"a regression label must be numbers, got {type(x).__name__}")
        try:
            value = float(x)
        except OverflowError as e:  # an int beyond any float
            raise ValueError("a regression label must be finite") from e
        if not math.isfinite(value):
            raise ValueError("a regression label must be finite")
        flat.append(value)

    walk(label, 0)
    if len(flat) != size:
        raise ValueError(f"a regression label must have {size} value{'s' if size != 1 else ''}, got {len(flat)}")
    return np.asarray(flat, dtype=np.float64)
