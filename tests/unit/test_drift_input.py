"""Input drift (issue 9: reference bins "of a per-input summary"): the packager's drift_input section (decile edges
of each evaluation input row's mean) and the hub's drift_input_* figures from the serving model's first input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from agent.bundle import TensorSpec
from agent.config import TelemetrySection
from agent.serve.holder import LoadedModel
from agent.telemetry.drift import INPUT_STATISTIC, DriftMonitor
from agent.telemetry.hub import Telemetry
from packager.metrics import reference_histograms


class FakeSession:
    format = "onnx"
    inputs = (TensorSpec("x", (-1, 4), "float32"),)
    outputs = (TensorSpec("y", (-1, 3), "float32"),)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.zeros((len(feeds["x"]), 3), dtype=np.float32)]


def test_reference_has_input_bins_only_when_inputs_are_given() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4))
    out = rng.normal(size=(500, 3))
    assert "drift_input" not in reference_histograms("classification", out)
    section = reference_histograms("classification", out, inputs=x)["drift_input"]
    assert isinstance(section, dict)
    assert section["statistic"] == INPUT_STATISTIC and section["samples"] == 500
    assert len(section["edges"]) == 9 and sum(section["counts"]) == 500
    assert max(section["counts"]) - min(section["counts"]) <= 2  # deciles of the row means
    assert DriftMonitor.from_reference({"drift_input": section}, min_samples=1, window=10,
                                       key="drift_input") is not None


def test_hub_reports_input_drift_from_the_first_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 4)).astype(np.float32)
    out = np.tile(np.array([[0.0, 0.0, 9.0]]), (1000, 1))
    release = tmp_path / "r1"
    release.mkdir()
    (release / "reference.json").write_text(json.dumps(reference_histograms("classification", out, inputs=x)))
    model = LoadedModel("m", 1, "onnx", FakeSession())
    cfg = TelemetrySection(drift_min_samples=100, drift_window=400)
    hub = Telemetry(cfg, tmp_path, serving=lambda: model, release_of=lambda m: release)
    confident = [np.array([[0.0, 0.0, 9.0]], np.float32)]
    for i in range(50):
        hub.answered(f"a{i}", model, {"x": x[i:i + 1]}, confident, 1.0)
    f = hub.figures(0.0)
    assert (f["drift_input_status"], f["drift_input_psi"], f["drift_input_samples"]) == ("unknown", None, 50)
    fresh = rng.normal(size=(400, 4)).astype(np.float32)  # the same distribution, other rows
    for i in range(400):
        hub.answered(f"b{i}", model, {"x": fresh[i:i + 1]}, confident, 1.0)
    f = hub.figures(1.0)
    assert f["drift_input_status"] == "ok" and f["drift_input_psi"] < 0.1
    for i in range(400):  # brighter inputs, the same confident outputs: only the input drift sees it
        hub.answered(f"c{i}", model, {"x": fresh[i:i + 1] + 1.5}, confident, 1.0)
    f = hub.figures(2.0)
    assert f["drift_input_status"] == "alarm" and f["drift_input_psi"] >= 0.25
    assert f["drift_status"] == "ok"


def test_a_reference_without_input_bins_reports_unknown(tmp_path: Path) -> None:
    release = tmp_path / "r1"
    release.mkdir()
    out = np.random.default_rng(2).normal(size=(100, 3))
    (release / "reference.json").write_text(json.dumps(reference_histograms("classification", out)))
    model = LoadedModel("m", 1, "onnx", FakeSession())
    hub = Telemetry(TelemetrySection(drift_min_samples=1), tmp_path, serving=lambda: model,
                    release_of=lambda m: release)
    hub.answered("a", model, {"x": np.ones((1, 4), np.float32)}, [np.zeros((1, 3), np.float32)], 1.0)
    f = hub.figures(0.0)
    assert f["drift_input_status"] == "unknown" and f["drift_input_psi"] is None and f["drift_samples"] == 1
