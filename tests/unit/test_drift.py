"""Drift: the packager's reference bins (packager/metrics.py) and the device's DriftMonitor and PSI."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from agent.telemetry.drift import (
    PSI_EPSILON,
    DriftMonitor,
    bin_counts,
    drift_status,
    merge_counts,
    psi,
    unknown_snapshot,
)
from packager import metrics

CLASSES = 10


def _logits(rng: np.random.Generator, n: int, margin: float = 3.0) -> np.ndarray:
    """A classifier's logits: noise plus a margin on the predicted class (a smaller margin: less confident)."""
    z = rng.standard_normal((n, CLASSES))
    z[np.arange(n), rng.integers(0, CLASSES, n)] += margin
    return z.astype(np.float32)


def _reference(task: str, output: np.ndarray) -> dict[str, Any]:
    """reference.json as the packager writes it and the device reads it back."""
    return json.loads(json.dumps(metrics.reference_histograms(task, output)))


def _monitor(ref: dict[str, Any], window: int = 1000, min_samples: int = 200) -> DriftMonitor:
    m = DriftMonitor.from_reference(ref, min_samples=min_samples, window=window)
    assert m is not None
    return m


def test_psi_hand_computed() -> None:
    # (0.4-0.5)ln(0.4/0.5) + (0.4-0.3)ln(0.4/0.3) + (0.2-0.2)ln(1) = 0.0223144 + 0.0287682
    assert psi([50, 30, 20], [40, 40, 20]) == pytest.approx(0.0510826, abs=1e-7)
    assert psi([5, 3, 2], [40, 40, 20]) == pytest.approx(0.0510826, abs=1e-7)  # fractions, not raw counts
    assert psi([1, 1], [7, 7]) == 0.0
    # an empty live bin: its fraction is floored at the epsilon
    # (1-0.5)ln(1/0.5) + (1e-4-0.5)ln(1e-4/0.5) = 0.3465736 + 4.2577450
    assert PSI_EPSILON == 1e-4
    assert psi([50, 50], [100, 0]) == pytest.approx(4.6043186, abs=1e-6)
    for bad in (([1, 2], [1, 2, 3]), ([0, 0], [1, 1]), ([1, 1], [0, 0]), ([1, -1], [1, 1])):
        with pytest.raises(ValueError):
            psi(*bad)


def test_status_thresholds() -> None:
    assert [drift_status(v) for v in (None, math.nan, 0.0, 0.0999, 0.1, 0.2499, 0.25, 3.0)] == [
        "unknown", "unknown", "ok", "ok", "warn", "warn", "alarm", "alarm"]


def test_packager_reference_has_decile_bins_and_keeps_the_old_fields() -> None:
    out = _logits(np.random.default_rng(0), 2000)
    ref = _reference("classification", out)
    assert sum(ref["confidence"]["counts"]) == 2000 and "output_values" in ref and "predicted_class" in ref
    d = ref["drift"]
    assert d["schema"] == 1 and d["statistic"] == "top1_confidence" and d["samples"] == 2000
    assert len(d["edges"]) == 9 and len(d["counts"]) == 10 and sum(d["counts"]) == 2000
    assert all(190 <= c <= 210 for c in d["counts"]), d["counts"]  # each bin ~10%
    assert d["edges"] == sorted(d["edges"])

    reg = _reference("regression", np.random.default_rng(1).normal(5.0, 2.0, (1000, 1)))
    assert reg["drift"]["statistic"] == "output_mean" and "output_norm" in reg
    assert min(reg["drift"]["edges"]) > 0  # signed values, not norms: the deciles of N(5, 2)
    emb = _reference("embedding", np.random.default_rng(2).normal(size=(300, 16)))
    assert emb["drift"]["statistic"] == "output_l2_norm" and sum(emb["drift"]["counts"]) == 300


def test_tied_deciles_merge_into_fewer_bins() -> None:
    # a saturated classifier: most rows have confidence exactly 1.0
    out = np.zeros((100, 3), np.float32)
    out[:, 0] = 100.0
    out[:10, 0] = 0.5
    d = _reference("classification", out)["drift"]
    assert len(d["counts"]) == len(d["edges"]) + 1 < 10 and sum(d["counts"]) == 100
    m = _monitor(_reference("classification", out), min_samples=50)
    for row in out:
        m.observe([row[None, :]])
    assert m.snapshot()["drift_psi"] == pytest.approx(0.0)


def test_stays_quiet_on_10000_in_distribution_samples() -> None:
    m = _monitor(_reference("classification", _logits(np.random.default_rng(10), 2000)))
    live = _logits(np.random.default_rng(11), 10_000)
    worst = 0.0
    for i, row in enumerate(live, 1):
        m.observe([row[None, :]])
        snap = m.snapshot()
        if i < 200:
            assert snap["drift_status"] == "unknown" and snap["drift_psi"] is None  # never "ok" without data
        else:
            worst = max(worst, snap["drift_psi"])
    assert worst < 0.1, worst
    assert m.snapshot()["drift_samples"] == 1000  # the window slides


@pytest.mark.parametrize("margin", [1.0, 6.0])  # less and more confident than the reference
def test_alarms_within_500_samples_of_a_shift(margin: float) -> None:
    m = _monitor(_reference("classification", _logits(np.random.default_rng(20), 2000)))
    for row in _logits(np.random.default_rng(21), 1000):  # a full window of normal traffic first
        m.observe([row[None, :]])
    assert m.snapshot()["drift_status"] == "ok"
    alarmed_at = None
    for i, row in enumerate(_logits(np.random.default_rng(22), 500, margin=margin), 1):
        m.observe([row[None, :]])
        if m.snapshot()["drift_psi"] > 0.25:
            alarmed_at = i
            break
    assert alarmed_at is not None and alarmed_at <= 500
    assert m.snapshot()["drift_status"] == "alarm"


def test_regression_shift_and_batches() -> None:
    rng = np.random.default_rng(30)
    m = _monitor(_reference("regression", rng.normal(0.0, 1.0, (2000, 1)).astype(np.float32)))
    m.observe({"y": rng.normal(0.0, 1.0, (400, 1)).astype(np.float32)})  # one batch: one value per row
    assert m.snapshot()["drift_status"] == "ok" and m.snapshot()["drift_samples"] == 400
    m.observe([rng.normal(-1.5, 1.0, (500, 1)).astype(np.float32)])  # a shift downwards (a norm would miss it)
    assert m.snapshot()["drift_status"] == "alarm"


def test_out_of_range_values_go_to_the_end_bins_and_non_finite_are_skipped() -> None:
    m = _monitor(_reference("regression", np.linspace(0.0, 1.0, 1000)[:, None]), min_samples=1)
    m.observe([np.array([[-1e9], [1e9], [np.nan], [np.inf]], np.float32)])
    counts = m.snapshot()["drift_bin_counts"]
    assert counts[0] == 1 and counts[-1] == 1 and sum(counts) == 2
    assert bin_counts([1.0, 2.0], np.array([0.0, 1.0, 1.5, 2.0, 9.0])) == [1, 2, 2]  # [lower, upper)
    m.observe([])
    m.observe([np.zeros((0, 1), np.float32)])
    assert m.snapshot()["drift_samples"] == 2


def test_counts_merge_exactly_across_devices() -> None:
    ref = _reference("classification", _logits(np.random.default_rng(40), 2000))
    a, b, one = (_monitor(ref, window=10_000) for _ in range(3))
    xa, xb = _logits(np.random.default_rng(41), 300), _logits(np.random.default_rng(42), 150, margin=1.0)
    a.observe([xa])
    b.observe([xb])
    one.observe([xa])
    one.observe([xb])
    merged = merge_counts(a.snapshot()["drift_bin_counts"], b.snapshot()["drift_bin_counts"])
    assert merged == one.snapshot()["drift_bin_counts"]
    assert psi(ref["drift"]["counts"], merged) == pytest.approx(one.snapshot()["drift_psi"])
    with pytest.raises(ValueError):
        merge_counts([1, 2], [1, 2, 3])


@pytest.mark.parametrize("reference", [
    {"task": "classification", "samples": 10, "bins": 20, "confidence": {"edges": [0, 1], "counts": [10]}},
    {"drift": {"schema": 2, "statistic": "top1_confidence", "edges": [0.5], "counts": [1, 1]}},
    {"drift": {"schema": 1, "statistic": "top1_confidence", "edges": [0.5, 0.4], "counts": [1, 1, 1]}},
    {"drift": {"schema": 1, "statistic": "top1_confidence", "edges": [0.5], "counts": [1]}},
    {"drift": {"schema": 1, "statistic": "top1_confidence", "edges": [0.5], "counts": [0, 0]}},
    {"drift": {"schema": 1, "statistic": "median", "edges": [0.5], "counts": [1, 1]}},
    {"drift": {"schema": 1, "statistic": "top1_confidence", "edges": [None], "counts": [1, 1]}},
    {"drift": "nope"},
])
def test_no_usable_reference_means_unknown(reference: dict[str, Any]) -> None:
    # a bundle built before the drift section existed (the first case), or a malformed one
    assert DriftMonitor.from_reference(reference, min_samples=10, window=100) is None
    snap = unknown_snapshot()
    assert snap["drift_status"] == "unknown" and snap["drift_psi"] is None
