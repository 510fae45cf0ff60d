"""The accuracy gate and the recipe tuner, on models built to defeat naive int8 quantization."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from packager.cli import main as packager_main

pytestmark = pytest.mark.slow


class OutlierMLP(torch.nn.Module):
    """A digits classifier whose input carries one huge, irrelevant feature.

    Per-tensor int8 quantization of the input spends its whole range on that feature, so the 64 pixel features
    (in [0, 1]) all round to the same step and accuracy collapses. Keeping the first layer in float fixes it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(65, 48)
        self.fc2 = torch.nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Unsupported(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eig(x)[0].real


def _digits_with_outlier(seed: int) -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    rng = np.random.default_rng(seed)
    pixels = (d.data / 16.0).astype(np.float32)
    outlier = rng.uniform(2000.0, 4000.0, size=(len(pixels), 1)).astype(np.float32)
    return np.concatenate([pixels, outlier], axis=1), d.target.astype(np.int64)


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    x, y = _digits_with_outlier(0)
    train, calib, evaluation = slice(0, 1100), slice(1100, 1450), slice(1450, None)
    torch.manual_seed(0)
    model = OutlierMLP()
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        with torch.no_grad():
            model.fc1.weight[:, 64] = 0.0  # the outlier feature carries no information
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt * torch.tensor([1.0] * 64 + [0.0])), yt).backward()
        opt.step()
    with torch.no_grad():
        model.fc1.weight[:, 64] = 0.0
    model.eval()
    d = tmp_path_factory.mktemp("fragile")
    batch = torch.export.Dim("batch", max=4096)
    ep = torch.export.export(model, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(d / "fragile.pt2"))
    np.savez(d / "calib.npz", x=x[calib], y=y[calib])
    np.savez(d / "eval.npz", x=x[evaluation], y=y[evaluation])
    return {"model": d / "fragile.pt2", "calib": d / "calib.npz", "eval": d / "eval.npz"}


def _build(fragile: dict[str, Path], out: Path, fmt: str, capsys: pytest.CaptureFixture[str]
           ) -> tuple[int, str, str]:
    code = packager_main(["build", str(fragile["model"]), "--calib", str(fragile["calib"]), "--eval",
                          str(fragile["eval"]), "--out", str(out), "--format", fmt, "--json"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tuner_recovers_when_the_first_recipe_misses(fragile: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = _build(fragile, tmp_path, "onnx", capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert "missed the gate: trying alternative recipes" in err
    with tarfile.open(result["bundle"]) as tar:
        f = tar.extractfile("report.json")
        assert f is not None
        report = json.load(f)
    trials = report["artifacts"][0]["trials"]
    assert len(trials) > 2
    assert not trials[0]["passed"] and trials[0]["drop"] > 10.0  # naive int8 really does collapse
    chosen = report["artifacts"][0]["recipe"]
    assert chosen != trials[0]["recipe"]
    passing = [t for t in trials if t["passed"]]
    assert report["artifacts"][0]["bytes"] == min(t["bytes"] for t in passing)  # smallest that passes
    assert result["artifacts"][0]["drop"] <= 1.0


def test_gate_failure_exits_3_names_the_artifact_and_writes_nothing(fragile: dict[str, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, stdout, err = _build(fragile, out, "tflite", capsys)
    assert code == 3, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("packager: error: accuracy gate failed") and "tflite" in last and "drop" in last
    assert json.loads(stdout)["exit_code"] == 3
    assert not out.exists() or list(out.iterdir()) == []


def test_unsupported_operator_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ep = torch.export.export(Unsupported(), (torch.randn(1, 4, 4),))
    torch.export.save(ep, str(tmp_path / "eig.pt2"))
    x = np.random.default_rng(0).normal(size=(40, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(40, np.int64))
    out = tmp_path / "out"
    code = packager_main(["build", str(tmp_path / "eig.pt2"), "--calib", str(tmp_path / "d.npz"), "--eval",
                          str(tmp_path / "d.npz"), "--out", str(out), "--format", "onnx"])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("packager: error: ONNX export failed") and "linalg_eig" in last
    assert not out.exists() or list(out.iterdir()) == []


def test_regression_task_gates_in_r2_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    # 256 hidden units: with 32 (~300 weights) every int8 recipe's Q/DQ scaffolding outweighed what int8 saves,
    # and an int8 file larger than fp32 does not pay (packager/verdict.py).
    model = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).eval()
    x = rng.normal(size=(300, 8)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()[:, 0] + rng.normal(scale=0.05, size=300).astype(np.float32)
    ep = torch.export.export(model, (torch.from_numpy(x[:2]),),
                             dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(ep, str(tmp_path / "reg.pt2"))
    np.savez(tmp_path / "calib.npz", x=x[:150])
    np.savez(tmp_path / "eval.npz", x=x[150:], y=y[150:])
    code = packager_main(["build", str(tmp_path / "reg.pt2"), "--calib", str(tmp_path / "calib.npz"), "--eval",
                          str(tmp_path / "eval.npz"), "--out", str(tmp_path / "out"), "--task", "regression",
                          "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["fp32"]["metric"] == "mse" and result["fp32"]["value"] == pytest.approx(0.0025, rel=0.5)
    for a in result["artifacts"]:
        assert a["drop"] <= 1.0 and a["value"] >= 0
