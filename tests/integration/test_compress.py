"""Smaller models (issue 15a) with real, short training runs on the digits example: structured channel pruning
with a fine-tune, `packager distill`, and the QAT fallback. Each gate that a smaller model misses is exit 3."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.bundle import verify_bundle
from agent.runtime import open_session
from examples.digits.data import load_splits
from examples.digits.train import train_digits
from packager import onnx_quant
from packager.build import BuildOptions, Progress, build
from packager.cli import main as packager_main
from packager.errors import ConversionError
from packager.torch_model import load_source

pytestmark = pytest.mark.slow
EPOCHS = 8  # the teacher: enough for ~97% top-1 on digits, a few seconds on a quiet 2-core machine
FACTORY = "examples.digits.model:DigitsCNN"
STUDENT = "examples.digits.student:DigitsStudent"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("digits-compress")
    paths = train_digits(d, epochs=EPOCHS)
    x, y = load_splits(0)["train"]
    np.savez(d / "train.npz", x=x, y=y)
    return {**paths, "train": d / "train.npz"}


def run_cli(args: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    code = packager_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_channel_pruning_ships_a_smaller_model_gated_against_the_unpruned_one(
        digits: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["build", FACTORY, "--weights", digits["state_dict"], "--calib", digits["calib"],
                              "--eval", digits["eval"], "--out", tmp_path, "--format", "onnx",
                              "--prune-channels", "0.25", "--finetune-epochs", "4", "--max-drop", "2", "--json"],
                             capsys)
    assert code == 0, err
    result = json.loads(out)
    p = result["pruning"]
    assert p["method"] == "channels" and p["amount"] == 0.25
    assert p["parameters_after"] < 0.7 * p["parameters_before"]
    assert p["bytes"] < 0.7 * result["fp32"]["bytes"]  # dense tensors really shrank, unlike --prune
    assert p["p50_ms"] > 0
    assert any("pruned 25% of the channels" in line for line in err)

    bundle = verify_bundle(Path(result["bundle"]))
    report = _report(Path(result["bundle"]), tmp_path)
    pruning = report["pruning"]
    assert pruning["finetune"]["epochs"] == 4 and pruning["finetune"]["labels"] is True
    assert pruning["finetune"]["samples"] == 360
    assert pruning["layers"] >= 3  # conv1, conv2, fc1 (fc2 writes the classes and is kept)
    # every drop is from the unpruned source model
    assert pruning["drop"] == pytest.approx(pruning["value_before"] - pruning["value_after"])
    assert report["fp32"]["value"] == pytest.approx(pruning["value_before"])
    art = report["artifacts"][0]
    assert art["drop"] == pytest.approx(pruning["value_before"] - art["value"])
    # the model still takes digits and answers ten classes
    assert [list(t.shape)[1:] for t in bundle.manifest.inputs] == [[1, 8, 8]]
    assert [list(t.shape)[1:] for t in bundle.manifest.outputs] == [[10]]


def _report(bundle: Path, tmp: Path) -> dict:
    dest = tmp / "x"
    verify_bundle(bundle, dest=dest)
    return json.loads((dest / "report.json").read_text())


def test_channel_pruning_that_loses_too_much_exits_3_and_writes_nothing(
        digits: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["build", FACTORY, "--weights", digits["state_dict"], "--calib", digits["calib"],
                            "--eval", digits["eval"], "--out", out, "--format", "onnx", "--prune-channels", "0.9",
                            "--finetune-epochs", "0"], capsys)
    assert code == 3, err
    assert err[-1].startswith("packager: error: accuracy gate failed, no bundle written: pruning "
                              "(--prune-channels 0.9)"), err[-1]
    assert not out.exists() or not any(out.iterdir())


def test_channel_pruning_needs_a_module_not_an_exported_program(
        digits: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["build", digits["exported_program"], "--calib", digits["calib"], "--eval",
                            digits["eval"], "--out", tmp_path, "--format", "onnx", "--prune-channels", "0.5"], capsys)
    assert code == 2
    assert err[-1].startswith("packager: error: --prune-channels needs a package.module:factory model"), err[-1]


def test_distill_trains_a_quarter_size_student_and_build_names_the_teacher(
        digits: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    student = tmp_path / "student.pt2"
    code, out, err = run_cli(["distill", "--teacher", digits["exported_program"], "--student", STUDENT,
                              "--data", digits["train"], "--eval", digits["eval"], "--epochs", "15",
                              "--max-drop", "3", "--out", student, "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["student"]["parameters"] <= r["teacher"]["parameters"] / 4
    assert r["student"]["onnx_bytes"] < r["teacher"]["onnx_bytes"] / 4
    assert r["student"]["drop"] <= 3
    assert r["training"]["labels"] is True and r["training"]["epochs"] == 15
    assert r["training"]["final_loss"] < r["training"]["first_loss"]
    assert r["teacher"]["model"] == str(digits["exported_program"])

    # the student goes through the same checked loaders as any .pt2, and build carries the record
    assert load_source(str(student), None).kind == "exported"
    code, out, err = run_cli(["build", student, "--calib", digits["calib"], "--eval", digits["eval"],
                              "--out", tmp_path / "b", "--format", "onnx", "--json"], capsys)
    assert code == 0, err
    report = _report(Path(json.loads(out)["bundle"]), tmp_path)
    rec = report["distillation"]
    assert rec["teacher"]["model"] == str(digits["exported_program"])
    assert rec["student"]["parameters"] == r["student"]["parameters"]
    assert rec["training"]["temperature"] == 4.0


def test_distilled_student_below_the_gate_exits_3_and_writes_nothing(
        digits: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    student = tmp_path / "student.pt2"
    code, _, err = run_cli(["distill", "--teacher", digits["exported_program"], "--student", STUDENT,
                            "--data", digits["train"], "--epochs", "1", "--lr", "1e-6", "--out", student], capsys)
    assert code == 3, err
    assert err[-1].startswith("packager: error: distillation gate failed, no student written: student top1"), err
    assert not student.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--student", "not a factory"], "--student 'not a factory': expected package.module:factory"),
    (["--student", STUDENT, "--out-suffix"], "the student is written as a torch.export .pt2 file"),
    (["--student", STUDENT, "--temperature", "0"], "--temperature must be a positive number"),
    (["--student", STUDENT, "--alpha", "1.5"], "--alpha must be in [0, 1]"),
])
def test_distill_refuses_bad_arguments_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       args: list[str], message: str) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / ("s.onnx" if "--out-suffix" in args else "s.pt2")
    args = [a for a in args if a != "--out-suffix"]
    code, _, err = run_cli(["distill", "--teacher", tmp_path / "missing.pt2", *args, "--data", data,
                            "--out", out], capsys)
    assert code == 2
    assert message in err[-1], err


def test_qat_fallback_ships_an_int8_qdq_model_when_every_ptq_recipe_fails(
        digits: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Post-training quantization is made to fail (the code under test is what happens next): QAT runs for
    # real, on the labelled calibration data, and its artifact is gated and shipped like any recipe.
    def ptq_fails(*_a: object, **_k: object) -> None:
        raise ConversionError("post-training quantization disabled by the test")

    monkeypatch.setattr(onnx_quant, "quantize", ptq_fails)
    result = build(BuildOptions(model=str(digits["exported_program"]), calib=digits["calib"], eval=digits["eval"],
                                out_dir=tmp_path / "out", formats=("onnx",), qat_epochs=2, latency_runs=20),
                   Progress(0, enabled=False))
    art = result.report["artifacts"][0]
    assert art["recipe"]["name"] == "qat-pt2e-x86-perchannel-u7s8" and art["recipe"]["qat"] is True
    assert art["drop"] <= 1.0
    trials = art["trials"]
    assert [t["recipe"].get("qat", False) for t in trials][-1] is True
    assert all("error" in t for t in trials[:-1])  # the post-training recipes, each listed with its failure

    files = tmp_path / "x"
    verify_bundle(result.bundle, dest=files)
    model = onnx.load(str(files / "model.int8.onnx"))
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == 4  # conv1, conv2, fc1, fc2 stored as int8
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    # and it answers like the fp32 model on the evaluation data
    x = np.load(digits["eval"])["x"]
    y = np.load(digits["eval"])["y"]
    got = open_session(files / "model.int8.onnx", "onnx").run({"x": x})[0]
    assert (got.argmax(1) == y).mean() >= 0.9


def test_qat_is_not_tried_without_labels(digits: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def ptq_fails(*_a: object, **_k: object) -> None:
        raise ConversionError("post-training quantization disabled by the test")

    monkeypatch.setattr(onnx_quant, "quantize", ptq_fails)
    unlabelled = tmp_path / "calib.npz"
    np.savez(unlabelled, x=np.load(digits["calib"])["x"])
    from packager.errors import AccuracyGateError

    with pytest.raises(AccuracyGateError, match="every recipe failed"):
        build(BuildOptions(model=str(digits["exported_program"]), calib=unlabelled, eval=digits["eval"],
                           out_dir=tmp_path / "out", formats=("onnx",), latency_runs=20), Progress(0, enabled=False))
