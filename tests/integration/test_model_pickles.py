"""`packager build` never unpickles anything from a model file that could import or call code (issue 7, item 1).

A tiny genuine model is saved as a torch.export .pt2, a TorchScript archive and a state_dict; then a pickle whose
`__reduce__` creates a marker file is put into each kind of entry torch would unpickle. The real CLI must refuse each
with exit 2 and one line on stderr, and the marker must never appear.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from packager.cli import main as packager_main

torch = pytest.importorskip("torch")


class _Evil:
    """Unpickling this runs `touch MARKER`: what an attacker's model file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Evil(marker), protocol=2)


def _evil_torch_zip(marker: Path) -> bytes:
    """A torch.save archive (what torch.load reads in a zip) whose data.pkl is the attacker's pickle."""
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, buf)
    return _rewrite(buf.getvalue(), {"data.pkl": _evil_pickle(marker)})


def _rewrite(archive: bytes, replace: dict[str, bytes | None], root: str | None = None) -> bytes:
    """Copy a zip, replacing entries by name below the root folder (None deletes); names not there are added."""
    src = zipfile.ZipFile(io.BytesIO(archive))
    names = src.namelist()
    root = root if root is not None else names[0].split("/", 1)[0] + "/"
    out = io.BytesIO()
    todo = dict(replace)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in names:
            rel = name[len(root):] if name.startswith(root) else name
            if rel in todo:
                data = todo.pop(rel)
                if data is not None:
                    dst.writestr(name, data)
            else:
                dst.writestr(name, src.read(name))
        for rel, data in todo.items():
            if data is not None:
                dst.writestr(root + rel, data)
    return out.getvalue()


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.register_buffer("scale", torch.ones(2))
        self.c = torch.tensor([1.0, 2.0])  # becomes a lifted tensor constant in the .pt2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale + self.c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = _Tiny().eval()
    ep = torch.export.export(model, (torch.zeros(1, 4),))
    torch.export.save(ep, str(d / "tiny.pt2"))
    torch.jit.save(torch.jit.script(model), str(d / "tiny.ts"))
    torch.save(torch.nn.Linear(3, 3).state_dict(), str(d / "sd.pt"))
    rng = np.random.default_rng(0)
    for name in ("calib", "eval"):
        np.savez(d / f"{name}.npz", x=rng.random((40, 4), dtype=np.float32), y=rng.integers(0, 2, 40))
    state = {k: v for k, v in model.state_dict().items()}
    legacy = io.BytesIO()
    with zipfile.ZipFile(d / "tiny.pt2") as z:
        model_json = z.read("tiny/models/model.json")
    parts = {"version": ".".join(map(str, _schema_version())).encode(), "serialized_exported_program.json": model_json,
             "serialized_state_dict.pt": _saved(state), "serialized_constants.pt": _saved({"c": model.c}),
             "serialized_example_inputs.pt": _saved(((torch.zeros(1, 4),), {}))}
    with zipfile.ZipFile(legacy, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)
    (d / "legacy.pt2").write_bytes(legacy.getvalue())
    return {"pt2": d / "tiny.pt2", "ts": d / "tiny.ts", "sd": d / "sd.pt", "legacy": d / "legacy.pt2",
            "calib": d / "calib.npz", "eval": d / "eval.npz"}


def _schema_version() -> tuple[int, ...]:
    from torch._export.serde.schema import SCHEMA_VERSION

    return tuple(SCHEMA_VERSION)


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _config(archive: bytes, rel: str) -> dict:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return json.loads(z.read("tiny/" + rel))


def _pt2_with(tiny: dict[str, Path], kind: str, marker: Path) -> bytes:
    base = tiny["pt2"].read_bytes()
    wcfg, ccfg = "data/weights/model_weights_config.json", "data/constants/model_constants_config.json"
    if kind == "sample_inputs":
        return _rewrite(base, {"data/sample_inputs/model.pt": _evil_torch_zip(marker)})
    if kind == "weight":  # a weight torch says is pickled (as it does for tensor subclasses)
        cfg = _config(base, wcfg)
        cfg["config"]["lin.weight"]["use_pickle"] = True
        return _rewrite(base, {wcfg: json.dumps(cfg).encode(), "data/weights/weight_0": _evil_torch_zip(marker)})
    if kind == "weight_any_name":  # the config may name any file in the archive
        cfg = _config(base, wcfg)
        cfg["config"]["lin.bias"].update(path_name="notes.txt", use_pickle=True)
        return _rewrite(base, {wcfg: json.dumps(cfg).encode(), "data/weights/weight_1": None,
                               "data/weights/notes.txt": _evil_pickle(marker)})
    if kind == "constant":
        cfg = _config(base, ccfg)
        cfg["config"]["c"]["use_pickle"] = True
        return _rewrite(base, {ccfg: json.dumps(cfg).encode(), "data/constants/tensor_0": _evil_pickle(marker)})
    if kind == "opaque_constant":  # read with plain pickle.loads
        cfg = _config(base, ccfg)
        cfg["config"]["c"].update(path_name="opaque_obj_0", use_pickle=True, tensor_meta=None)
        return _rewrite(base, {ccfg: json.dumps(cfg).encode(), "data/constants/tensor_0": None,
                               "data/constants/opaque_obj_0": _evil_pickle(marker)})
    if kind == "legacy_weights_file":  # data/weights/<model>.pt: torch.load, falling back to weights_only=False
        return _rewrite(base, {"data/weights/model.pt": _evil_torch_zip(marker)})
    if kind == "legacy_constants_file":
        return _rewrite(base, {"data/constants/model.pt": _evil_torch_zip(marker)})
    # The pre-2.7 layout torch.export.load still reads: serialized_* entries at the top of the zip.
    legacy = tiny["legacy"].read_bytes()
    return _rewrite(legacy, {f"serialized_{kind.removeprefix('legacy_')}.pt": _evil_torch_zip(marker)}, root="")


PT2_KINDS = ["sample_inputs", "weight", "weight_any_name", "constant", "opaque_constant", "legacy_weights_file",
             "legacy_constants_file", "legacy_state_dict", "legacy_constants", "legacy_example_inputs"]


def _build(tiny: dict[str, Path], model: object, out: Path, capsys: pytest.CaptureFixture[str],
           *extra: object) -> tuple[int, str]:
    args = ["build", model, *extra, "--calib", tiny["calib"], "--eval", tiny["eval"], "--out", out,
            "--format", "onnx"]
    code = packager_main([str(a) for a in args])
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, marker: Path, out: Path, entry: str) -> None:
    assert not marker.exists(), "the model file's pickle ran code during the build"
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("packager: error: "), err
    assert "refused" in lines[0] and entry in lines[0], lines[0]
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("kind", PT2_KINDS)
def test_pt2_with_a_code_running_pickle_is_refused(tiny: dict[str, Path], kind: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    model = tmp_path / "evil.pt2"
    model.write_bytes(_pt2_with(tiny, kind, marker))
    code, err = _build(tiny, model, tmp_path / "out", capsys)
    entry = {"sample_inputs": "sample_inputs/model.pt", "weight": "weight_0", "weight_any_name": "notes.txt",
             "constant": "tensor_0", "opaque_constant": "opaque_obj_0", "legacy_weights_file": "weights/model.pt",
             "legacy_constants_file": "constants/model.pt"}.get(kind, f"serialized_{kind.removeprefix('legacy_')}")
    _assert_refused(code, err, marker, tmp_path / "out", entry)


@pytest.mark.parametrize("entry", ["data.pkl", "constants.pkl"])
def test_torchscript_with_a_code_running_pickle_is_refused(tiny: dict[str, Path], entry: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    model = tmp_path / "evil.ts"
    model.write_bytes(_rewrite(tiny["ts"].read_bytes(), {entry: _evil_pickle(marker)}))
    code, err = _build(tiny, model, tmp_path / "out", capsys)
    _assert_refused(code, err, marker, tmp_path / "out", entry)


def test_weights_with_a_code_running_pickle_are_refused(tiny: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pt"
    weights.write_bytes(_rewrite(tiny["sd"].read_bytes(), {"data.pkl": _evil_pickle(marker)}))
    code, err = _build(tiny, "examples.digits.model:DigitsCNN", tmp_path / "out", capsys, "--weights", weights)
    _assert_refused(code, err, marker, tmp_path / "out", "data.pkl")


def test_genuine_pt2_torchscript_and_weights_still_load(tiny: dict[str, Path]) -> None:
    from packager.torch_model import load_source, run_torch

    x = np.random.default_rng(1).random((3, 4), dtype=np.float32)
    expected = _Tiny()
    torch.manual_seed(0)
    expected = _Tiny().eval()
    want = expected(torch.from_numpy(x)).detach().numpy()
    for path, kind in ((tiny["pt2"], "exported"), (tiny["ts"], "torchscript")):
        source = load_source(str(path), None)
        assert source.kind == kind and source.input_names == ["x"]
        np.testing.assert_allclose(run_torch(source, {"x": x})[0], want, rtol=1e-6)
    from examples.digits.model import DigitsCNN

    genuine = DigitsCNN().state_dict()
    sd = tiny["sd"].with_name("digits_sd.pt")
    torch.save(genuine, str(sd))
    source = load_source("examples.digits.model:DigitsCNN", sd)
    loaded = source.module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in genuine.items())


# --- the exported program's JSON (models/model.json) ---------------------------------------------------------
# torch.export.load passes every `expr_str` to sympy.sympify (which evaluates Python) and resolves node targets
# as attribute paths below `torch`, so the graph JSON is checked before torch reads the archive too.

class _Dyn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine export with a dynamic batch dimension: its graph JSON holds sympy expressions."""
    path = tmp_path_factory.mktemp("dyn") / "dyn.pt2"
    torch.manual_seed(0)
    ep = torch.export.export(_Dyn().eval(), (torch.zeros(2, 4),),
                             dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    torch.export.save(ep, str(path))
    return path


def _edit_graph(pt2: Path, edit: Callable[[dict], None]) -> bytes:
    data = pt2.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        name = next(n for n in z.namelist() if n.endswith("/models/model.json"))
        program = json.loads(z.read(name))
    edit(program)
    return _rewrite(data, {"models/model.json": json.dumps(program).encode()})


def _walk(obj: object, key: str) -> list[dict]:
    """Every dict below obj that has `key`."""
    found: list[dict] = []
    if isinstance(obj, dict):
        if key in obj:
            found.append(obj)
        for v in obj.values():
            found.extend(_walk(v, key))
    elif isinstance(obj, list):
        for v in obj:
            found.extend(_walk(v, key))
    return found


def test_pt2_with_a_code_running_shape_expression_is_refused(dynamic_pt2: Path, tiny: dict[str, Path],
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"

    def edit(program: dict) -> None:
        exprs = _walk(program, "expr_str")
        assert exprs, "a dynamic export carries symbolic shape expressions"
        for e in exprs:  # sympify evaluates this as Python and still gets the genuine symbol back
            e["expr_str"] = f"(__import__('os').system('touch {marker}'), {e['expr_str']})[1]"

    model = tmp_path / "evil.pt2"
    model.write_bytes(_edit_graph(dynamic_pt2, edit))
    code, err = _build(tiny, model, tmp_path / "out", capsys)
    _assert_refused(code, err, marker, tmp_path / "out", "models/model.json")
    assert "symbolic expression" in err


def test_pt2_with_a_node_calling_os_system_is_refused(tiny: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"

    def edit(program: dict) -> None:
        # torch resolves "torch.os.system" by getattr from torch and, as it is callable, makes it a graph node
        # that runs with the model
        graph = program["graph_module"]["graph"]
        graph["nodes"].insert(0, {
            "target": "torch.os.system", "name": "system",
            "inputs": [{"name": "", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
            "outputs": [{"as_int": 0}], "metadata": {}, "is_hop_single_tensor_return": None})

    model = tmp_path / "evil.pt2"
    model.write_bytes(_edit_graph(tiny["pt2"], edit))
    code, err = _build(tiny, model, tmp_path / "out", capsys)
    _assert_refused(code, err, marker, tmp_path / "out", "models/model.json")
    assert "torch.os.system" in err


def test_genuine_exports_of_the_examples_still_load(dynamic_pt2: Path, tmp_path: Path) -> None:
    from examples.bert_encoder import make_tiny_bert, random_token_batch
    from examples.digits.model import DigitsCNN
    from examples.midcnn import MidResNet
    from packager.torch_model import load_source, run_torch

    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", min=2, max=64)
    torch.manual_seed(0)
    feeds = random_token_batch(2)
    cases: list[tuple[str, torch.nn.Module, dict[str, np.ndarray], object]] = [
        ("digits", DigitsCNN().eval(), {"x": np.zeros((2, 1, 8, 8), np.float32)}, ({0: batch},)),
        ("midcnn", MidResNet().eval(), {"x": np.zeros((2, 1, 32, 32), np.float32)}, ({0: batch},)),
        ("bert", make_tiny_bert().eval(), feeds, ({0: batch, 1: seq}, {0: batch, 1: seq})),
    ]
    for name, model, inputs, dynamic in cases:
        args = tuple(torch.from_numpy(v) for v in inputs.values())
        path = tmp_path / f"{name}.pt2"
        torch.export.save(torch.export.export(model, args, dynamic_shapes=dynamic), str(path))
        source = load_source(str(path), None)
        want = model(*args).detach().numpy()
        np.testing.assert_allclose(run_torch(source, inputs)[0], want, rtol=1e-5, atol=1e-5)
    source = load_source(str(dynamic_pt2), None)
    assert source.kind == "exported"
