"""Pure accuracy, drift-reference and latency statistics. No runtimes, no files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.telemetry.drift import INPUT_STATISTIC, reference_drift

METRIC_BY_TASK = {"classification": "top1", "regression": "mse", "embedding": "cosine"}
DEFAULT_MAX_DROP = {"classification": 1.0, "regression": 1.0, "embedding": 0.01}


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Percent of rows whose arg-max equals the label."""
    return float(np.mean(np.argmax(logits.reshape(len(logits), -1), axis=1) == labels.reshape(-1)) * 100.0)


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((pred.reshape(len(pred), -1) - target.reshape(len(target), -1)) ** 2))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity; rows that are both zero count as identical."""
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
    dot = np.sum(a2 * b2, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-12))
    return float(np.mean(cos))


def metric_value(task: str, output: np.ndarray, labels: np.ndarray | None, fp32_output: np.ndarray) -> float:
    """The task's metric for one model's outputs on the evaluation set.

    Embeddings are scored by cosine to the fp32 model's own outputs (no labels needed), so fp32 scores 1.0.
    """
    if task == "classification":
        assert labels is not None
        return top1_accuracy(output, labels)
    if task == "regression":
        assert labels is not None
        return mse(output, labels)
    if task == "embedding":
        return mean_cosine(output, fp32_output)
    raise ValueError(f"unknown task {task!r}")


def metric_drop(task: str, fp32_value: float, int8_value: float, labels: np.ndarray | None) -> float:
    """How much worse int8 is, in the unit `--max-drop` uses.

    classification: top-1 percentage points; embedding: cosine lost; regression: R^2 percentage points, i.e. the
    MSE increase as a percent of the labels' variance (scale-free, so one default suits every target unit).
    """
    if task == "classification":
        return fp32_value - int8_value
    if task == "embedding":
        return fp32_value - int8_value
    if task == "regression":
        assert labels is not None
        var = float(np.var(labels.astype(np.float64)))
        return 100.0 * (int8_value - fp32_value) / max(var, 1e-12)
    raise ValueError(f"unknown task {task!r}")


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows where two models pick the same class."""
    return float(np.mean(np.argmax(a.reshape(len(a), -1), 1) == np.argmax(b.reshape(len(b), -1), 1)))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.reshape(len(logits), -1).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reference_histograms(task: str, output: np.ndarray, bins: int = 20,
                         inputs: np.ndarray | None = None) -> dict[str, object]:
    """What normal outputs look like on the evaluation set, for drift detection on the device later.

    "drift" holds what the device measures against (agent/telemetry/drift.py): decile bin edges of one number per
    row (top-1 confidence, row mean or L2 norm, by task) and the reference counts per bin; the other sections
    describe the outputs for people and the fleet view. "drift_input" (when `inputs`, the first input on the
    evaluation set, is given) holds the same for the mean of each input row.
    """
    flat = output.reshape(len(output), -1).astype(np.float64)
    ref: dict[str, object] = {"task": task, "samples": len(flat), "bins": bins}
    if task == "classification":
        probs = softmax(flat)
        conf_counts, conf_edges = np.histogram(probs.max(axis=1), bins=bins, range=(0.0, 1.0))
        ref["confidence"] = {"edges": _floats(conf_edges), "counts": conf_counts.tolist()}
        ref["predicted_class"] = {"counts": np.bincount(probs.argmax(axis=1), minlength=flat.shape[1]).tolist()}
    else:
        norms = np.linalg.norm(flat, axis=1)
        n_counts, n_edges = np.histogram(norms, bins=bins)
        ref["output_norm"] = {"edges": _floats(n_edges), "counts": n_counts.tolist()}
    v_counts, v_edges = np.histogram(flat, bins=bins)
    ref["output_values"] = {"edges": _floats(v_edges), "counts": v_counts.tolist(),
                            "mean": float(flat.mean()), "std": float(flat.std())}
    drift = reference_drift(task, output)
    if drift is not None:
        ref["drift"] = drift
    drift_input = reference_drift(task, inputs, statistic=INPUT_STATISTIC) if inputs is not None else None
    if drift_input is not None:
        ref["drift_input"] = drift_input
    return ref


def _floats(a: np.ndarray) -> list[float]:
    return [round(float(x), 6) for x in a]


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    runs: int


def latency_summary(seconds: Sequence[float]) -> Latency:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return Latency(round(float(np.percentile(ms, 50)), 4), round(float(np.percentile(ms, 95)), 4), len(ms))
