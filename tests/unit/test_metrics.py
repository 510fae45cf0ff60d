from __future__ import annotations

import math

import numpy as np
import pytest

from packager import metrics
from packager.tuning import Trial, choose, tune


def test_top1_and_drop() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([1, 0, 0, 0])
    assert metrics.top1_accuracy(logits, labels) == pytest.approx(75.0)
    assert metrics.metric_drop("classification", 97.5, 96.0, labels) == pytest.approx(1.5)


def test_cosine_identical_orthogonal_and_zero_rows() -> None:
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    assert metrics.mean_cosine(a, b) == pytest.approx((1 + 1 - 1) / 3)
    assert metrics.metric_value("embedding", a, None, a) == pytest.approx(1.0)


def test_regression_drop_is_r2_points() -> None:
    y = np.array([0.0, 2.0, 4.0, 6.0])  # variance 5
    assert metrics.metric_drop("regression", 0.5, 0.55, y) == pytest.approx(100 * 0.05 / 5)
    assert metrics.mse(np.array([[1.0], [2.0]]), np.array([1.5, 2.0])) == pytest.approx(0.125)


def test_reference_histograms_classification() -> None:
    rng = np.random.default_rng(0)
    ref = metrics.reference_histograms("classification", rng.normal(size=(50, 10)))
    assert sum(ref["confidence"]["counts"]) == 50  # type: ignore[index]
    assert len(ref["predicted_class"]["counts"]) == 10  # type: ignore[index]
    emb = metrics.reference_histograms("embedding", rng.normal(size=(20, 4)))
    assert "output_norm" in emb


def test_latency_summary() -> None:
    lat = metrics.latency_summary([0.001] * 95 + [0.010] * 5)
    assert lat.p50_ms == pytest.approx(1.0)
    assert lat.runs == 100


def _t(name: str, size: int, drop: float, error: str | None = None) -> Trial:
    return Trial({"name": name}, None, size, 0.0 if error is None else math.nan, drop, error)


def test_tune_stops_when_first_recipe_passes() -> None:
    tried: list[str] = []

    def attempt(r: str) -> Trial:
        tried.append(r)
        return _t(r, 100, 0.5)

    result = tune("a", lambda: ["b", "c"], attempt, max_drop=1.0)
    assert tried == ["a"] and result.chosen is not None and result.chosen.recipe["name"] == "a"


def test_tune_keeps_smallest_passing_alternative() -> None:
    table = {"a": _t("a", 100, 2.0), "b": _t("b", 120, 0.2), "c": _t("c", 110, 0.9), "d": _t("d", 90, 0, "boom")}
    result = tune("a", lambda: ["b", "c", "d"], table.__getitem__, max_drop=1.0)
    assert result.chosen is not None and result.chosen.recipe["name"] == "c"
    assert [t.recipe["name"] for t in result.trials] == ["a", "b", "c", "d"]


def test_choose_reports_least_bad_when_nothing_passes() -> None:
    result = choose([_t("a", 100, 3.0), _t("b", 100, 2.0), _t("c", 1, 0.0, "crash")], max_drop=1.0)
    assert result.chosen is None and result.best_failing is not None
    assert result.best_failing.recipe["name"] == "b"
