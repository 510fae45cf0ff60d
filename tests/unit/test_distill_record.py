"""The distillation record a student .pt2 carries into `packager build`'s report: untrusted, bounded, typed."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from packager.distill import MAX_RECORD_BYTES, RECORD_NAME, read_record, record_from_report

REPORT = {
    "task": "classification", "metric": "top1", "max_drop": 1.0,
    "teacher": {"model": "t.pt2", "kind": "exported", "sha256": "ab" * 32, "value": 98.3, "parameters": 217546,
                "onnx_bytes": 871000, "p50_ms": 0.03, "p95_ms": 0.04},
    "student": {"model": "pkg.mod:Student", "value": 97.5, "drop": 0.8, "parameters": 38282,
                "onnx_bytes": 155000, "p50_ms": 0.02},
    "training": {"data": "train.npz", "sha256": "cd" * 32, "samples": 1077, "epochs": 30, "temperature": 4.0,
                 "alpha": 0.7, "labels": True, "final_loss": 0.12, "steps": 1020},
    "evaluation": {"data": "eval.npz", "sha256": "ef" * 32, "samples": 360},
}


def _pt2(path: Path, entry: bytes | str, name: str = f"archive/extra/{RECORD_NAME}") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/models/model.json", "{}")
        z.writestr(name, entry)
    return path


def test_the_record_round_trips_without_the_fields_build_does_not_show(tmp_path: Path) -> None:
    rec = record_from_report(REPORT)
    assert "p95_ms" not in rec["teacher"] and "steps" not in rec["training"]
    got = read_record(_pt2(tmp_path / "s.pt2", json.dumps(rec)))
    assert got == rec
    assert got is not None and got["teacher"]["model"] == "t.pt2" and got["student"]["parameters"] == 38282


@pytest.mark.parametrize("entry", [
    "not json", "[1, 2]", "null", json.dumps({"teacher": "a string"}),
])
def test_malformed_records_are_ignored(tmp_path: Path, entry: str) -> None:
    assert read_record(_pt2(tmp_path / "s.pt2", entry)) is None


def test_oversized_records_are_ignored(tmp_path: Path) -> None:
    big = json.dumps({"teacher": {"model": "x" * MAX_RECORD_BYTES}})
    assert read_record(_pt2(tmp_path / "s.pt2", big)) is None


def test_only_known_fields_of_plain_types_are_kept(tmp_path: Path) -> None:
    hostile = {"metric": "top1", "teacher": {"model": "<script>", "value": float("nan"), "parameters": [1, 2],
                                              "evil": "x", "sha256": {"a": 1}, "p50_ms": 1e309},
               "student": {"model": "y" * 5000, "drop": 0.5}, "extra_section": {"model": "z"}}
    got = read_record(_pt2(tmp_path / "s.pt2", json.dumps(hostile).replace("NaN", "1e999")))
    assert got == {"metric": "top1", "teacher": {"model": "<script>"}, "student": {"drop": 0.5}}


def test_files_without_a_record_have_none(tmp_path: Path) -> None:
    assert read_record(_pt2(tmp_path / "s.pt2", "{}", name="archive/extra/other.json")) is None
    (tmp_path / "plain.pt2").write_bytes(b"not a zip")
    assert read_record(tmp_path / "plain.pt2") is None
    assert read_record(tmp_path / "missing.pt2") is None
