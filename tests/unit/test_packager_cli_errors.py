"""`packager` refuses bad arguments and bad input with one line on stderr and a non-zero exit, before any work.

Cheap: a two-weight ONNX model and no torch, so none of these runs a real build.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.cli import main as packager_main


def _tiny_onnx(path: Path) -> Path:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=np.zeros(40, np.int64))
    return {"model": _tiny_onnx(tmp_path / "tiny.onnx"), "data": tmp_path / "data.npz"}


def run(args: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = packager_main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def build_args(files: dict[str, Path], out: Path, *extra: object, model: object = None) -> list[object]:
    return ["build", files["model"] if model is None else model, "--calib", files["data"], "--eval", files["data"],
            "--out", out, *extra]


def _one_error_line(lines: list[str], code: int, *needles: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("packager: "), lines
    for needle in needles:
        assert needle in lines[0], lines


def test_version_zero_is_refused_before_any_work(files: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, lines = run(build_args(files, out, "--version", "0"), capsys)
    _one_error_line(lines, code, "--version", "positive")
    assert not out.exists()


def test_existing_bundle_is_found_before_the_model_is_even_read(files: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny-3.bundle").write_bytes(b"an earlier build")
    # The model file is missing: only a check made before loading it can name the existing bundle.
    code, lines = run(build_args(files, out, "--version", "3", "--name", "tiny", model=tmp_path / "gone.onnx"),
                      capsys)
    _one_error_line(lines, code, "tiny-3.bundle already exists")
    assert (out / "tiny-3.bundle").read_bytes() == b"an earlier build"


@pytest.mark.parametrize("out", ["/proc/edgeship-nowhere/out", "/proc/self/out"])
def test_out_under_proc_is_one_line(files: dict[str, Path], out: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run(build_args(files, Path(out)), capsys)
    _one_error_line(lines, code, f"--out {out}", "cannot write")


def test_out_probe_leaves_no_directory_behind(files: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a" / "b"
    code, lines = run(build_args(files, out, "--max-batch", "0"), capsys)  # fails after the probe
    _one_error_line(lines, code, "--max-batch")
    code, lines = run(build_args(files, out, "--task", "classification", "--eval", tmp_path / "none.npz"), capsys)
    _one_error_line(lines, code, "no such file")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("value", ["0", "65537", "-1"])
def test_max_batch_out_of_range(files: dict[str, Path], tmp_path: Path, value: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run(build_args(files, tmp_path / "out", "--max-batch", value), capsys)
    _one_error_line(lines, code, "--max-batch must be from 1 to 65536")


@pytest.mark.parametrize(
    ("role", "key", "value"),
    [("eval", "x", np.nan), ("eval", "x", np.inf), ("calib", "x", -np.inf), ("eval", "y", np.nan)],
)
def test_nan_or_inf_in_data_is_one_line_naming_file_and_array(
        files: dict[str, Path], tmp_path: Path, role: str, key: str, value: float,
        capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    y = np.zeros(40, np.float32)
    if key == "x":
        x[:] = value  # all of it, as in the issue
    else:
        y[5] = value
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x, y=y)
    args = build_args(files, tmp_path / "out", "--task", "regression")
    args[args.index(f"--{role}") + 1] = bad
    code, lines = run(args, capsys)
    assert code == 2, lines
    errors = [ln for ln in lines if ln.startswith("packager:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # progress lines may precede it, nothing follows
    assert str(bad) in errors[0] and f"array '{key}'" in errors[0] and "NaN or infinite" in errors[0]
    assert not (tmp_path / "out").exists()


def test_prune_of_an_onnx_model_is_refused(files: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run(build_args(files, tmp_path / "out", "--prune", "0.5"), capsys)
    assert code == 2
    assert lines[-1].startswith("packager: error: --prune needs a PyTorch model"), lines


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--broker", "http://localhost:1883"], "--broker"),
        (["--broker", "mqtt://"], "--broker"),
        (["--group", "a/b"], "--group 'a/b'"),
        (["--group", "+"], "--group '+'"),
        (["--group", "../x"], "--group '../x'"),
        (["--group", "g" * 65], "--group"),
        (["--fleet", "a/#"], "--fleet 'a/#'"),
        (["--fleet", ""], "--fleet ''"),
        (["--fleet", "a b"], "--fleet 'a b'"),
    ],
)
def test_publish_refuses_bad_broker_group_and_fleet(tmp_path: Path, args: list[str], needle: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    code, lines = run(["publish", tmp_path / "x.bundle", "--repo", repo, "--http-dir", tmp_path / "mirror", *args],
                      capsys)
    _one_error_line(lines, code, needle)
    assert not repo.exists() and not (tmp_path / "mirror").exists()


@pytest.mark.parametrize("command", [["refresh"], ["unpublish", "x-1"], ["keys", "rotate", "timestamp"]])
def test_other_transport_commands_refuse_a_bad_fleet(tmp_path: Path, command: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run([*command, "--repo", tmp_path / "repo", "--fleet", "a/#"], capsys)
    _one_error_line(lines, code, "--fleet 'a/#'")


@pytest.mark.parametrize("name", ["lab", "lab-2", "Lab_2.eu", "0", "g" * 64, "g" * 65, "a/b", "a/#", "+", "",
                                  ".hidden", "-x", "a b", "é"])
def test_packager_accepts_exactly_the_fleet_and_group_names_a_device_accepts(name: str) -> None:
    from agent.config import parse_config
    from agent.errors import ConfigError
    from packager.errors import InputError
    from packager.publish import check_level_name

    try:  # the device's own rule is the oracle
        parse_config({"agent": {"device_id": "d1", "state_dir": "/s", "fleet": name, "group": name},
                      "trust": {"root": "/r.json"}}, env={})
        device_ok = True
    except ConfigError:
        device_ok = False
    try:
        check_level_name("--group", name)
        packager_ok = True
    except InputError:
        packager_ok = False
    assert packager_ok == device_ok


def test_inspect_of_a_deeply_nested_manifest_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    bundle = tmp_path / "deep.bundle"
    with tarfile.open(bundle, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(deep)
        tar.addfile(info, io.BytesIO(deep))
    code, lines = run(["inspect", bundle], capsys)
    _one_error_line(lines, code)
