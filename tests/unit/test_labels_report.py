"""`--labels`/`--preprocess` parsing and checks (packager/serving_spec.py) and the readable report
(packager/report.py): axes near the data, per-class accuracy, confusion matrices, the processor in words, and the
sentence on int8 that did not pay."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import TensorSpec
from packager.build import BuildOptions, check_build_options
from packager.errors import InputError
from packager.report import axis_range, class_breakdown, host_in_words, int8_notes, report_html
from packager.serving_spec import labels_section, parse_preprocess, preprocessing_section, read_labels

IMAGE = (TensorSpec("x", (-1, 3, 8, 8), "float32"),)
LOGITS = (TensorSpec("logits", (-1, 3), "float32"),)


def test_read_labels(tmp_path: Path) -> None:
    p = tmp_path / "labels.txt"
    p.write_bytes("\ufeffcat\r\ndog\n  crane  \ncrane\n\n\n".encode())
    assert read_labels(p) == ["cat", "dog", "crane", "crane"]  # BOM, CRLF, spaces, trailing blanks; repeats kept
    for text, message in (("a\n\nb\n", "line 2 is blank"), ("", "no class names"), ("a\x1b[2Jb\n", "printable"),
                          ("x" * 300 + "\n", "at most 256")):
        p.write_text(text)
        with pytest.raises(InputError, match=message):
            read_labels(p)
    p.write_bytes(b"caf\xe9\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_labels(p)
    with pytest.raises(InputError, match="no such file"):
        read_labels(tmp_path / "missing.txt")


def test_parse_preprocess() -> None:
    got = parse_preprocess("scale=1/255 ; mean=0.485,0.456,0.406 std=0.229,0.224,0.225 layout=nhwc resize=Bilinear")
    assert got == {"scale": pytest.approx(1 / 255), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                   "layout": "NHWC", "resize": "bilinear"}
    for text, message in (("scale=abc", "not a number"), ("scale=1/0", "not a number"), ("crop=3", "unknown key"),
                          ("scale", "not key=value"), ("scale=1 scale=2", "given twice"), ("layout=CHW", "one of"),
                          ("  ", "empty"), ("mean=inf", "not finite")):
        with pytest.raises(InputError, match=message):
            parse_preprocess(text)


def test_preprocessing_checked_against_the_model_like_a_device_does() -> None:
    section, spec = preprocessing_section(parse_preprocess("scale=1/255 layout=NHWC mean=0.5,0.5,0.5"), IMAGE)
    assert section["input"] == "x" and section["model_layout"] == "NCHW" and spec.image
    with pytest.raises(InputError, match="--preprocess: preprocessing has 2 channel statistics, input 'x' has 3"):
        preprocessing_section(parse_preprocess("mean=0.5,0.5"), IMAGE)
    with pytest.raises(InputError, match="not one of the model's inputs"):
        preprocessing_section(parse_preprocess("input=y scale=2"), IMAGE)


def test_labels_section_counts_classes_and_detects_probabilities() -> None:
    logits = np.array([[3.0, -1.0, 0.5], [0.0, 2.0, 1.0]], np.float32)
    assert labels_section(["a", "b", "c"], LOGITS, logits).scores == "softmax"
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert labels_section(["a", "b", "c"], LOGITS, probs).scores == "raw"
    with pytest.raises(InputError, match="2 class names, the model's output 'logits' has 3 classes"):
        labels_section(["a", "b"], LOGITS, logits)


def test_labels_need_a_classifier_and_bad_options_cost_no_build(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_bytes(b"")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    base: dict[str, Any] = dict(model="m.pt2", calib=tmp_path / "d.npz", eval=tmp_path / "d.npz", out_dir=tmp_path)
    with pytest.raises(InputError, match="--labels goes with --task classification"):
        check_build_options(BuildOptions(**base, task="regression", labels=tmp_path / "labels.txt"))
    with pytest.raises(InputError, match="unknown key 'crop'"):
        check_build_options(BuildOptions(**base, preprocess="crop=2"))


def test_axis_starts_near_the_data_so_close_values_look_different() -> None:
    start, end, _ = axis_range([98.33, 98.06, 97.33])  # fp32, int8, and the gate
    assert 96.0 <= start < 97.33 and 98.33 < end <= 99.5
    # 98.33 and 98.06 lie more than a seventh of the axis apart (on an axis from 0: 0.27% of it)
    assert (98.33 - 98.06) / (end - start) > 0.15
    assert axis_range([0.5, 0.5])[0] < 0.5 < axis_range([0.5, 0.5])[1]
    page = report_html(_report(fp32=98.33, int8=98.06))
    ticks = [float(t) for t in re.findall(r'text-anchor="middle">([0-9.]+)</text>', page)]
    assert ticks and min(ticks) > 90


def test_class_breakdown() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    fp32 = np.eye(3)[[0, 0, 1, 1, 2, 2]]
    int8 = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    got = class_breakdown(y, {"fp32": fp32, "onnx int8": int8}, ["cat", "dog", "eel"])
    assert got["support"] == [2, 2, 2]
    assert got["accuracy"] == {"fp32": [100.0, 100.0, 100.0], "onnx int8": [50.0, 100.0, 50.0]}
    assert got["confusion"]["onnx int8"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert got["top_confusions"]["onnx int8"] == [{"true": 0, "predicted": 1, "count": 1},
                                                  {"true": 2, "predicted": 0, "count": 1}]
    page = report_html(_report(classes=got))
    assert "Per-class accuracy" in page and "<td>eel</td>" in page and "Confusion matrix: onnx int8" in page
    assert "<td>-50.0</td>" in page


def test_host_in_words() -> None:
    avx2 = host_in_words({"cpu": "Intel(R) Celeron(R) J4125", "machine": "x86_64", "cores": 4, "int8_isa": ["avx2"]})
    assert avx2.startswith("Built and timed on Intel(R) Celeron(R) J4125 (x86_64, 4 cores)") and "no VNNI" in avx2
    arm = host_in_words({"cpu": "Cortex-A76", "machine": "aarch64", "cores": 4, "int8_isa": ["asimddp"]})
    assert "dot-product (SDOT/UDOT)" in arm
    assert "VNNI int8 dot-product" in host_in_words({"machine": "x86_64", "int8_isa": ["avx2", "avx512_vnni"]})


def test_int8_that_did_not_pay_gets_a_sentence() -> None:
    slow = _report(fp32=97.0, int8=96.9, int8_bytes=700, int8_p50=0.04)
    notes = int8_notes(slow)
    assert len(notes) == 1 and "slower than fp32 and barely smaller" in notes[0]
    assert "per-call overhead" in notes[0] and "scales and zero points" in notes[0]
    assert "per-call overhead" in report_html(slow)
    assert int8_notes(_report(fp32=97.0, int8=96.9)) == []  # 0.26x bytes, half the latency: nothing to explain


def _report(fp32: float = 97.0, int8: float = 96.5, int8_bytes: int = 260, int8_p50: float = 0.01,
            classes: dict[str, Any] | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "name": "digits", "version": 1, "task": "classification", "metric": "top1", "max_drop": 1.0,
        "fp32": {"bytes": 1000, "value": fp32, "p50_ms": 0.02, "p95_ms": 0.03, "metric": "top1"},
        "artifacts": [{"format": "onnx", "bytes": int8_bytes, "value": int8, "drop": fp32 - int8,
                       "p50_ms": int8_p50, "p95_ms": int8_p50}],
        "host": {"cpu": "AMD EPYC", "machine": "x86_64", "cores": 2, "int8_isa": ["avx2"]},
    }
    if classes is not None:
        report["classes"] = classes
    return report


def test_what_other_build_steps_add_is_rendered() -> None:
    report = _report()
    report["pruning"] = {"method": "channels", "amount": 0.5, "parameters_before": 218000, "parameters_after": 60000,
                         "layers": 3, "finetune": {"epochs": 5, "samples": 360, "labels": True}, "value_before": 97.0,
                         "value_after": 96.6, "drop": 0.4, "bytes": 300, "zstd_bytes": 280, "p50_ms": 0.01,
                         "p95_ms": 0.012}
    report["distillation"] = {"metric": "top1", "teacher": {"model": "t.pt2", "parameters": 218000, "value": 97.5},
                              "student": {"model": "s:make", "parameters": 40000, "value": 96.9, "drop": 0.6},
                              "training": {"epochs": 8, "temperature": 4.0}}
    report["notes"] = ["No int8 recipe paid for itself: shipped fp32 (--allow-fp32)."]
    report["artifacts"][0]["trials"] = [{"recipe": {"name": "r1"}, "bytes": 1100, "value": 96.9, "drop": 0.1,
                                         "passed": False, "why": "1.10x the fp32 bytes"}]
    page = report_html(report)
    assert "218,000" in page and "60,000" in page and "5 epochs on 360 samples with labels" in page
    assert "<td>fp32 pruned</td><td>300</td><td>280</td><td>0.300</td><td>96.6</td><td>0.4</td><td>0.01</td>" in page
    assert "Distillation" in page and "0.183x the teacher's parameters" in page
    assert "shipped fp32 (--allow-fp32)" in page and "miss: 1.10x the fp32 bytes" in page
