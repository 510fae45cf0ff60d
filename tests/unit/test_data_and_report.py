from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bundle import TensorSpec
from packager.data import fit_to_specs, load_npz
from packager.errors import InputError
from packager.report import report_html

SPEC = (TensorSpec("x", (-1, 1, 8, 8), "float32"),)


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_single_input_may_be_called_x(tmp_path: Path) -> None:
    p = _npz(tmp_path / "d.npz", x=np.zeros((4, 1, 8, 8)), y=np.arange(4))
    ds = fit_to_specs(load_npz(p, ["input"], "eval", need_labels=True), (TensorSpec("input", (-1, 1, 8, 8),
                                                                                    "float32"),), "eval")
    assert ds.inputs["input"].dtype == np.float32 and ds.n == 4


def test_multi_input_needs_each_name(tmp_path: Path) -> None:
    p = _npz(tmp_path / "d.npz", input_ids=np.zeros((3, 5), np.int64))
    with pytest.raises(InputError, match="no array 'attention_mask'"):
        load_npz(p, ["input_ids", "attention_mask"], "calibration", need_labels=False)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 1, 8, 8))}, "labels 'y' are required"),
        ({"x": np.zeros((4, 1, 8, 8)), "y": np.arange(3)}, "disagree on the number of samples"),
        ({"z": np.zeros((4, 1, 8, 8)), "y": np.arange(4)}, "no array 'x'"),
    ],
)
def test_bad_data_files(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    p = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError, match=message):
        load_npz(p, ["x"], "evaluation", need_labels=True)


def test_unreadable_and_pickled_data_refused(tmp_path: Path) -> None:
    text = tmp_path / "t.npz"
    text.write_text("not a zip")
    with pytest.raises(InputError, match=r"not a readable \.npz"):
        load_npz(text, ["x"], "evaluation", need_labels=False)
    pickled = tmp_path / "p.npz"
    np.savez(pickled, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(InputError, match="allow_pickle"):
        load_npz(pickled, ["x"], "evaluation", need_labels=False)
    with pytest.raises(InputError, match="no such file"):
        load_npz(tmp_path / "missing.npz", ["x"], "evaluation", need_labels=False)


@pytest.mark.parametrize(
    ("arrays", "names", "bad"),
    [
        ({"x": np.full((4, 2), np.nan, np.float32)}, ["x"], "x"),  # all NaN, as in the issue
        ({"x": np.array([[0.0, np.inf]] * 4)}, ["x"], "x"),
        ({"x": np.zeros((4, 2)), "y": np.array([0.0, 1.0, -np.inf, 2.0])}, ["x"], "y"),
        ({"ids": np.zeros((4, 3), np.int64), "mask": np.array([[1.0, np.nan, 1.0]] * 4)}, ["ids", "mask"], "mask"),
    ],
)
def test_nan_and_inf_refused_naming_file_and_array(tmp_path: Path, arrays: dict[str, np.ndarray],
                                                   names: list[str], bad: str) -> None:
    p = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError, match=rf"calibration data {p}: array '{bad}' has \d+ NaN or infinite value"):
        load_npz(p, names, "calibration", need_labels=False)


def test_non_finite_values_in_arrays_the_model_does_not_read_are_ignored(tmp_path: Path) -> None:
    p = _npz(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32), notes=np.array([np.nan]))
    assert load_npz(p, ["x"], "evaluation", need_labels=False).n == 4


def test_report_html_shows_pruning_as_a_row_measured_from_the_unpruned_model() -> None:
    model = {"bytes": 1000, "value": 97.0, "p50_ms": 0.1, "p95_ms": 0.2}
    report = {
        "name": "digits", "version": 1, "task": "classification", "metric": "top1", "max_drop": 1.0,
        "fp32": dict(model, metric="top1"), "artifacts": [dict(model, format="onnx", bytes=260, drop=0.9)],
        "pruning": {"amount": 0.5, "sparsity": 0.5, "tensors": 4, "parameters": 100, "value_before": 97.0,
                    "value_after": 96.4, "drop": 0.6, "passed": True, "bytes": 1000, "zstd_bytes": 600},
    }
    page = report_html(report)
    assert "<td>fp32 pruned</td><td>1000</td><td>600</td><td>1.000</td><td>96.4</td><td>0.6</td>" in page
    assert "measured from the unpruned model" in page


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((4, 1, 9, 9), np.float32), r"per-sample shape \(1, 9, 9\), the model expects \(1, 8, 8\)"),
        (np.zeros((4, 64), np.float32), "per-sample shape"),
        (np.zeros((4, 1, 8, 8), np.int64), "must be floating point"),
    ],
)
def test_shape_and_dtype_checked_against_model(tmp_path: Path, x: np.ndarray, message: str) -> None:
    ds = load_npz(_npz(tmp_path / "d.npz", x=x), ["x"], "evaluation", need_labels=False)
    with pytest.raises(InputError, match=message):
        fit_to_specs(ds, SPEC, "evaluation")


def test_report_html_is_self_contained_and_escaped() -> None:
    model = {"bytes": 1000, "value": 97.0, "p50_ms": 0.1, "p95_ms": 0.2}
    report = {
        "name": "<b>digits</b>", "version": 1, "task": "classification", "metric": "top1", "max_drop": 1.0,
        "fp32": dict(model, metric="top1"),
        "artifacts": [dict(model, format="onnx", bytes=260, drop=0.3, recipe={"name": "r1"},
                           trials=[{"recipe": {"name": "r1"}, "bytes": 260, "value": 96.7, "drop": 0.3,
                                    "passed": True}])],
    }
    page = report_html(report)
    assert "<b>digits</b>" not in page and "&lt;b&gt;digits&lt;/b&gt;" in page
    assert page.count("<svg") == 3 and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "chosen" in page
