"""PROBATION: the pure verdict on request figures, and the watch loop with a fake model session and real stats,
manifest and golden file on disk."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import bundle
from agent.bundle import (
    GOLDEN_FILE,
    MANIFEST,
    Artifact,
    FileEntry,
    Manifest,
    TensorSpec,
    golden_input_key,
    golden_output_key,
    read_golden_rows,
)
from agent.config import DeploySection
from agent.deploy import probation
from agent.deploy.probation import judge_probation, watch_probation
from agent.errors import BundleRejected, ProbationFailed, StopRequested
from agent.serve.holder import LoadedModel, RequestStats

BUDGET_MS = 5.0
X = TensorSpec("x", (-1, 4), "float32")
Y = TensorSpec("logits", (-1, 3), "float32")


def _snap(ok: int = 0, errors: int = 0, rejected: int = 0, p95: float | None = None,
          samples: int | None = None) -> dict[str, Any]:
    answered = ok + errors
    return {"count": ok + errors + rejected, "ok": ok, "rejected": rejected, "errors": errors,
            "error_rate": errors / answered if answered else 0.0, "p50_ms": p95, "p95_ms": p95, "p99_ms": p95,
            "samples": ok if samples is None else samples, "window_s": 1.0}


@pytest.mark.parametrize("snap, verdict", [
    pytest.param(_snap(), None, id="nothing-yet"),
    pytest.param(_snap(ok=100, p95=1.0), None, id="healthy"),
    pytest.param(_snap(ok=10, errors=10, p95=1.0), "error_rate", id="half-errors"),
    pytest.param(_snap(ok=99, errors=1, p95=1.0), None, id="at-the-limit"),  # 0.01 is not above 0.01
    pytest.param(_snap(ok=98, errors=2, p95=1.0), "error_rate", id="just-above"),
    pytest.param(_snap(ok=5, errors=14, p95=1.0), None, id="errors-below-min-requests"),
    pytest.param(_snap(ok=5, errors=15, p95=1.0), "error_rate", id="errors-at-min-requests"),
    # the client's own mistakes (4xx) neither count as answered requests nor as errors
    pytest.param(_snap(ok=10, errors=1, rejected=500, p95=1.0), None, id="rejected-not-answered"),
    pytest.param(_snap(ok=100, p95=BUDGET_MS + 0.1), "latency", id="slow"),
    pytest.param(_snap(ok=100, p95=BUDGET_MS), None, id="at-budget"),
    pytest.param(_snap(ok=19, p95=50.0), None, id="slow-below-min-samples"),
    pytest.param(_snap(ok=100, p95=None, samples=0), None, id="no-p95"),
    pytest.param(_snap(ok=50, errors=50, p95=50.0), "error_rate", id="error-rate-judged-first"),
])
def test_judge_probation(snap: dict[str, Any], verdict: str | None) -> None:
    out = judge_probation(snap, BUDGET_MS, max_error_rate=0.01, min_requests=20)
    assert (out[0] if out else None) == verdict
    if out:
        assert out[1]  # a message for the event's log


# --- the watch loop ----------------------------------------------------------------------------------------------

ROWS = 12
rng = np.random.default_rng(0)
GOLDEN_X = rng.standard_normal((ROWS, 4)).astype(np.float32)
WEIGHTS = rng.standard_normal((4, 3)).astype(np.float32)


def _logits(x: np.ndarray) -> np.ndarray:
    return x @ WEIGHTS


class FakeSession:
    format = "onnx"
    inputs = (X,)
    outputs = (Y,)

    def __init__(self, run: Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None = None) -> None:
        self.calls: list[int] = []
        self._run = run or (lambda feeds: [_logits(feeds["x"])])

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.calls.append(len(feeds["x"]))
        return self._run(feeds)


def _manifest() -> Manifest:
    art = Artifact("onnx", "model.int8.onnx", (X,), (Y,), {"name": "static"}, 97.5, 0.3, 0.1, 0.2)
    return Manifest(name="m", version=2, task="classification", created="2026-01-01T00:00:00+00:00", inputs=(X,),
                    outputs=(Y,), artifacts=(art,), metric="top1", fp32_metric_value=97.8, max_drop=1.0,
                    parity={"kind": "top1", "min_agreement": 0.97}, latency_budget_ms=BUDGET_MS,
                    target={}, preprocessing={}, provenance={"source_sha256": "0" * 64},
                    files={"model.int8.onnx": FileEntry("0" * 64, 1)})


@pytest.fixture
def release(tmp_path: Path) -> Path:
    path = tmp_path / "release"
    path.mkdir()
    (path / MANIFEST).write_text(json.dumps(_manifest().to_json()))
    np.savez(path / GOLDEN_FILE, allow_pickle=False,
             **{"input.x": GOLDEN_X, "onnx.output.0": _logits(GOLDEN_X)})
    return path


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probation, "POLL_S", 0.01)
    monkeypatch.setattr(probation, "PROBE_INTERVAL_S", 0.02)
    monkeypatch.setattr(probation, "MIN_PROBE_WAIT_S", 0.1)


def _model(session: FakeSession) -> LoadedModel:
    return LoadedModel("m", 2, "onnx", session)


def _deploy(**kw: Any) -> DeploySection:
    return DeploySection(**{"probation_s": 0.1, "probation_requests": 0, "max_error_rate": 0.01,
                            "min_requests_for_rate": 20, **kw})


def test_passes_with_a_healthy_model_and_probes_it(release: Path) -> None:
    session, stats = FakeSession(), RequestStats()
    for _ in range(30):
        stats.record_ok(1.0)
    watch_probation(_model(session), stats, release, "onnx", _deploy(), threading.Event())
    assert len(session.calls) >= 2  # during the window and once more at its end
    assert set(session.calls) == {probation.GOLDEN_PROBE_ROWS}


def test_ends_after_probation_requests_without_waiting_for_the_window(release: Path) -> None:
    session, stats = FakeSession(), RequestStats()
    for _ in range(5):
        stats.record_ok(1.0)
    watch_probation(_model(session), stats, release, "onnx", _deploy(probation_s=86400.0, probation_requests=5),
                    threading.Event())


@pytest.mark.parametrize("record, reason", [
    (lambda s: [s.record_error() for _ in range(20)], "error_rate"),
    (lambda s: [s.record_ok(BUDGET_MS * 10) for _ in range(20)], "latency"),
])
def test_fails_on_live_figures(release: Path, record: Callable[[RequestStats], object], reason: str) -> None:
    stats = RequestStats()
    record(stats)
    with pytest.raises(ProbationFailed) as info:
        watch_probation(_model(FakeSession()), stats, release, "onnx", _deploy(probation_s=86400.0),
                        threading.Event())
    assert info.value.reason == reason


def test_fails_when_errors_arrive_during_the_window(release: Path) -> None:
    stats = RequestStats()
    session = FakeSession(lambda feeds: [stats.record_error(), _logits(feeds["x"])][1:])  # type: ignore[list-item]
    with pytest.raises(ProbationFailed) as info:
        watch_probation(_model(session), stats, release, "onnx", _deploy(probation_s=86400.0), threading.Event())
    assert info.value.reason == "error_rate"


def test_fails_on_golden_parity(release: Path) -> None:
    wrong = FakeSession(lambda feeds: [-_logits(feeds["x"])])  # every arg-max moves
    with pytest.raises(ProbationFailed) as info:
        watch_probation(_model(wrong), RequestStats(), release, "onnx", _deploy(), threading.Event())
    assert info.value.reason == "parity"


def test_fails_when_the_probe_raises(release: Path) -> None:
    def boom(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("kernel failed")

    with pytest.raises(ProbationFailed, match="kernel failed") as info:
        watch_probation(_model(FakeSession(boom)), RequestStats(), release, "onnx", _deploy(), threading.Event())
    assert info.value.reason == "error"


def test_fails_on_a_hung_model(release: Path) -> None:
    release_hang = threading.Event()

    def hang(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        release_hang.wait(30)
        return [_logits(feeds["x"])]

    try:
        with pytest.raises(ProbationFailed) as info:
            watch_probation(_model(FakeSession(hang)), RequestStats(), release, "onnx", _deploy(), threading.Event())
        assert info.value.reason == "hang"
    finally:
        release_hang.set()


def test_a_stop_request_ends_it_with_stop_requested(release: Path) -> None:
    stopping = threading.Event()
    session = FakeSession(lambda feeds: [stopping.set(), _logits(feeds["x"])][1:])  # type: ignore[list-item]
    with pytest.raises(StopRequested):
        watch_probation(_model(session), RequestStats(), release, "onnx", _deploy(probation_s=86400.0), stopping)
    assert len(session.calls) == 1  # no final probe after a stop


def test_without_golden_rows_only_the_figures_are_judged(release: Path, caplog: pytest.LogCaptureFixture) -> None:
    (release / GOLDEN_FILE).write_bytes(b"not an npz")
    session = FakeSession(lambda feeds: [-_logits(feeds["x"])])  # would fail parity if probed
    watch_probation(_model(session), RequestStats(), release, "onnx", _deploy(), threading.Event())
    assert session.calls == []
    assert "no golden rows" in caplog.text


def test_without_a_serving_model_only_the_figures_are_judged(release: Path) -> None:
    watch_probation(None, RequestStats(), release, "onnx", _deploy(), threading.Event())
    stats = RequestStats()
    for _ in range(20):
        stats.record_error()
    with pytest.raises(ProbationFailed):
        watch_probation(None, stats, release, "onnx", _deploy(), threading.Event())


def test_an_unreadable_release_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(BundleRejected) as info:
        watch_probation(None, RequestStats(), tmp_path / "gone", "onnx", _deploy(), threading.Event())
    assert info.value.reason == "unreadable"


# --- the golden set's keys (agent/bundle.py: the one place packager and agent take them from) -------------------

def test_golden_keys_are_the_bundle_format() -> None:
    assert bundle.GOLDEN_FILE == "golden.npz"
    assert golden_input_key("x") == "input.x"
    assert golden_output_key("tflite", 1) == "tflite.output.1"


def test_read_golden_rows(release: Path) -> None:
    inputs, outputs = read_golden_rows(release, _manifest(), "onnx", 5)
    np.testing.assert_array_equal(inputs["x"], GOLDEN_X[:5])
    assert len(outputs) == 1
    np.testing.assert_array_equal(outputs[0], _logits(GOLDEN_X)[:5])
    assert read_golden_rows(release, _manifest(), "tflite", 5)[1] == []  # no outputs for that format


def test_read_golden_rows_refuses_missing_inputs_and_bad_files(release: Path) -> None:
    np.savez(release / GOLDEN_FILE, allow_pickle=False, **{"input.other": GOLDEN_X})
    with pytest.raises(BundleRejected, match=r"input\.x") as info:
        read_golden_rows(release, _manifest(), "onnx", 5)
    assert info.value.reason == "parity"
    (release / GOLDEN_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BundleRejected):
        read_golden_rows(release, _manifest(), "onnx", 5)
    np.save(release / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (release / "obj.npy").rename(release / GOLDEN_FILE)
    with pytest.raises(BundleRejected):  # never unpickles
        read_golden_rows(release, _manifest(), "onnx", 5)
