"""The ONNX path end to end: PyTorch -> one-file fp32 ONNX -> int8 ONNX (onnxruntime.quantization) -> OnnxSession."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from agent.errors import RuntimeUnavailable
from agent.runtime import open_session
from agent.runtime.onnx_session import OnnxSession
from packager import onnx_quant
from packager.errors import ConversionError, InputError
from packager.onnx_export import OPSET, export_onnx
from packager.onnx_quant import OnnxRecipe

pytestmark = pytest.mark.slow

SEQ = 32
VOCAB = 8000


class SmallCNN(torch.nn.Module):
    """~160k parameters, 1x8x8 input, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.c3 = torch.nn.Conv2d(64, 128, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc1 = torch.nn.Linear(128 * 2 * 2, 128)
        self.fc2 = torch.nn.Linear(128, 10)
        self.drop = torch.nn.Dropout(0.5)  # must be inert: export runs in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.c1(x)))
        x = self.pool(torch.relu(self.c2(x)))
        x = torch.flatten(torch.relu(self.c3(x)), 1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class EncoderLayer(torch.nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = torch.nn.Linear(d, d)
        self.k = torch.nn.Linear(d, d)
        self.v = torch.nn.Linear(d, d)
        self.o = torch.nn.Linear(d, d)
        self.ln1 = torch.nn.LayerNorm(d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.f1 = torch.nn.Linear(d, ff)
        self.f2 = torch.nn.Linear(ff, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, hd).transpose(1, 2)

        scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / math.sqrt(hd)
        scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * -1e4
        att = (torch.softmax(scores, dim=-1) @ split(self.v(x))).transpose(1, 2).reshape(b, t, d)
        x = self.ln1(x + self.o(att))
        return self.ln2(x + self.f2(torch.nn.functional.gelu(self.f1(x))))


class TinyEncoder(torch.nn.Module):
    """BERT-style: token + position embeddings, 2 self-attention layers, mean pooling over the mask."""

    def __init__(self, vocab: int = VOCAB, d: int = 64, heads: int = 4, ff: int = 256) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(SEQ, d)
        self.layers = torch.nn.ModuleList([EncoderLayer(d, heads, ff) for _ in range(2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(positions)[None]
        for layer in self.layers:
            x = layer(x, attention_mask)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class FixedBatch(torch.nn.Module):
    """Hard-codes batch 1, so a dynamic batch axis cannot be exported."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, 12))


class Unsupported(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eig(x)[0].real


def _tokens(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    ids = rng.integers(1, VOCAB, size=(n, SEQ), dtype=np.int64)
    lengths = rng.integers(8, SEQ + 1, size=n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _bytes(p: Path) -> int:
    return p.stat().st_size


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[SmallCNN, Path, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    model = SmallCNN()  # left in training mode on purpose
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    export_onnx(model, (torch.randn(1, 1, 8, 8),), ["x"], path)
    assert model.training, "export must restore the caller's training flag"
    calib = {"x": np.random.default_rng(1).standard_normal((300, 1, 8, 8)).astype(np.float32)}
    return model.eval(), path, calib


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyEncoder, Path, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    ex = _tokens(np.random.default_rng(0), 2)
    path = tmp_path_factory.mktemp("enc") / "encoder.onnx"
    export_onnx(model, (torch.from_numpy(ex["input_ids"]), torch.from_numpy(ex["attention_mask"])),
                ["input_ids", "attention_mask"], path)
    return model, path, _tokens(np.random.default_rng(1), 300)


def test_export_writes_one_self_contained_file(cnn: tuple, encoder: tuple) -> None:
    for _, path, _ in (cnn, encoder):
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "no .data sidecar, no temp files"
        m = onnx.load(str(path), load_external_data=False)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
        assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
        # Stack traces from the build machine are stripped.
        assert not any(n.metadata_props for n in m.graph.node)
    assert [i.name for i in onnx.load(str(encoder[1])).graph.input] == ["input_ids", "attention_mask"]


def test_session_specs_and_fp32_parity(cnn: tuple, encoder: tuple) -> None:
    model, path, calib = cnn
    s = open_session(path, "onnx", threads=2)
    assert s.format == "onnx"
    assert [(t.name, t.shape, t.dtype) for t in s.inputs] == [("x", (-1, 1, 8, 8), "float32")]
    assert len(s.outputs) == 1 and s.outputs[0].shape == (-1, 10) and s.outputs[0].dtype == "float32"
    x = calib["x"][:16]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(s.run({"x": x})[0], want, rtol=1e-4, atol=1e-4)

    model, path, calib = encoder
    s = OnnxSession(path, input_names=["ids", "mask"], output_names=["embedding"])
    assert [(t.name, t.shape, t.dtype) for t in s.inputs] == [("ids", (-1, SEQ), "int64"),
                                                                ("mask", (-1, SEQ), "int64")]
    assert [(t.name, t.shape, t.dtype) for t in s.outputs] == [("embedding", (-1, 64), "float32")]
    feeds = {k: v[:8] for k, v in calib.items()}
    with torch.no_grad():
        want = model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
    got = s.run({"ids": feeds["input_ids"].astype(np.int32), "mask": feeds["attention_mask"]})[0]  # int32 is cast
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_static_qdq_cnn_is_small_and_agrees(cnn: tuple, tmp_path: Path) -> None:
    _, path, calib = cnn
    recipe = onnx_quant.first_recipe(path)
    assert (recipe.mode, recipe.per_channel, recipe.name) == ("static", True, "static-minmax-perchannel-u8")
    out = tmp_path / "cnn.int8.onnx"
    onnx_quant.quantize(path, recipe, calib, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    ratio = _bytes(out) / _bytes(path)
    assert ratio <= 0.3
    # Graph overhead is trimmed (metadata, value_info, zero int32 zero points): a ~160k-parameter CNN's
    # int8 file stays within 0.27x of fp32 (int8 weights alone would be 0.25x).
    assert ratio <= 0.27, f"int8/fp32 = {ratio:.4f}"
    m = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in m.graph.node}
    rows = np.random.default_rng(7).standard_normal((500, 1, 8, 8)).astype(np.float32)
    ref = OnnxSession(path).run({"x": rows})[0]
    got = OnnxSession(out).run({"x": rows})[0]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.9
    assert json_roundtrip(recipe) == recipe


def json_roundtrip(r: OnnxRecipe) -> OnnxRecipe:
    return OnnxRecipe.from_json(r.to_json())


def test_dynamic_encoder_quantizes_embeddings(encoder: tuple, tmp_path: Path) -> None:
    _, path, calib = encoder
    recipe = onnx_quant.first_recipe(path)
    assert (recipe.mode, recipe.per_channel) == ("dynamic", True)
    out = tmp_path / "enc.int8.onnx"
    onnx_quant.quantize(path, recipe, calib, out)
    ratio = _bytes(out) / _bytes(path)
    assert ratio <= 0.3, f"int8/fp32 = {ratio:.4f}"
    m = onnx.load(str(out))
    big_float = [i.name for i in m.graph.initializer
                 if i.data_type == onnx.TensorProto.FLOAT and math.prod(i.dims) >= VOCAB]
    assert not big_float, f"fp32 tables left: {big_float}"

    # The embedding Gather is what makes the difference: kept in float, the file is far bigger.
    emb = next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Gather")
    keep = tmp_path / "enc.keep-emb.onnx"
    onnx_quant.quantize(path, OnnxRecipe.make("dynamic", float_nodes=[emb]), calib, keep)
    assert _bytes(keep) - _bytes(out) >= 0.7 * VOCAB * 64 * 3  # fp32 minus int8 table bytes

    ref = OnnxSession(path).run(calib)[0]
    got = OnnxSession(out).run(calib)[0]
    assert _cosine(ref, got).min() >= 0.99


@pytest.mark.parametrize("which", ["cnn", "encoder"])
def test_every_alternative_recipe_loads(which: str, cnn: tuple, encoder: tuple, tmp_path: Path) -> None:
    _, path, calib = cnn if which == "cnn" else encoder
    first = onnx_quant.first_recipe(path)
    alts = onnx_quant.alternative_recipes(path, calib, first)
    names = [r.name for r in alts]
    assert len(set(names)) == len(names) and first.name not in names
    assert any(r.float_nodes for r in alts), "keep-k-in-float recipes"
    assert {r.mode for r in alts} == {"static", "dynamic"}
    assert any(r.per_channel != first.per_channel for r in alts)
    if which == "cnn":
        assert {r.calibration for r in alts if r.mode == "static"} == {"minmax", "entropy", "percentile"}
        assert {r.activation_type for r in alts} == {"uint8", "int8"}
    rows = {k: v[:64] for k, v in calib.items()}
    ref = OnnxSession(path).run(rows)[0]
    for i, r in enumerate(alts):
        out = tmp_path / f"alt{i}.onnx"
        onnx_quant.quantize(path, r, calib, out)
        got = OnnxSession(out).run(rows)[0]
        assert got.shape == ref.shape and np.isfinite(got).all(), r.name
        assert _cosine(ref, got).mean() > 0.9, r.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"alt{i}.onnx" for i in range(len(alts)))


def test_sensitive_nodes_are_real_graph_nodes(cnn: tuple, encoder: tuple) -> None:
    for _, path, calib in (cnn, encoder):
        graph = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
        recipe = onnx_quant.first_recipe(path)
        worst = onnx_quant.sensitive_nodes(path, calib, recipe, 2)
        assert len(worst) == 2 and len(set(worst)) == 2
        assert all(graph.get(n) in {"Conv", "Gemm", "MatMul", "Gather"} for n in worst), worst
        assert onnx_quant.sensitive_nodes(path, calib, recipe, 0) == []


def test_bad_feeds_raise_value_error(cnn: tuple, encoder: tuple) -> None:
    s = OnnxSession(cnn[1])
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert s.run({"x": x.astype(np.float64)})[0].shape == (2, 10)  # float64 is cast
    with pytest.raises(ValueError, match="missing input"):
        s.run({})
    with pytest.raises(ValueError, match="unknown input"):
        s.run({"x": x, "y": x})
    with pytest.raises(ValueError, match=r"'x'.*\(\?, 1, 8, 8\).*\(2, 1, 9, 8\)"):
        s.run({"x": np.zeros((2, 1, 9, 8), np.float32)})
    with pytest.raises(ValueError, match=r"'x'.*4 dimensions"):
        s.run({"x": np.zeros((2, 64), np.float32)})
    with pytest.raises(ValueError, match=r"'x'.*floating point.*int64"):
        s.run({"x": x.astype(np.int64)})

    e = OnnxSession(encoder[1])
    ids = np.ones((2, SEQ), np.int64)
    with pytest.raises(ValueError, match=r"'input_ids'.*integer.*float32"):
        e.run({"input_ids": ids.astype(np.float32), "attention_mask": ids})
    with pytest.raises(ValueError, match="disagree on the number of rows"):
        e.run({"input_ids": ids, "attention_mask": ids[:1]})


def test_text_file_raises_runtime_unavailable(tmp_path: Path) -> None:
    p = tmp_path / "model.onnx"
    p.write_text("this is not a model\n")
    with pytest.raises(RuntimeUnavailable, match=r"model\.onnx") as info:
        OnnxSession(p)
    assert "\n" not in str(info.value) and info.value.__cause__ is not None
    with pytest.raises(RuntimeUnavailable, match="no such file"):
        open_session(tmp_path / "missing.onnx", "onnx")


def test_export_failure_names_operator_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bad.onnx"
    with pytest.raises(ConversionError, match="linalg_eig") as info:
        export_onnx(Unsupported(), (torch.randn(4, 4),), ["x"], out)
    assert "\n" not in str(info.value) and info.value.__cause__ is not None
    assert list(tmp_path.iterdir()) == []


def test_fixed_batch_falls_back_and_session_loops_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = FixedBatch().eval()
    out = tmp_path / "fixed.onnx"
    with caplog.at_level(logging.WARNING, logger="packager.onnx_export"):
        export_onnx(model, (torch.randn(3, 12),), ["x"], out)
    assert "dynamic batch" in caplog.text
    s = OnnxSession(out)
    assert s.inputs[0].shape == (1, 12)
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    with torch.no_grad():
        want = torch.cat([model(torch.from_numpy(r[None])) for r in x]).numpy()
    np.testing.assert_allclose(s.run({"x": x})[0], want, rtol=1e-5, atol=1e-5)
    # Calibration batches follow the fixed batch of 1.
    q = tmp_path / "fixed.int8.onnx"
    onnx_quant.quantize(out, onnx_quant.first_recipe(out), {"x": x}, q)
    assert OnnxSession(q).run({"x": x})[0].shape == (5, 3)


def test_torchscript_and_exported_program(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = model(x).numpy()
    ts = tmp_path / "ts.onnx"
    export_onnx(torch.jit.script(model), (x,), ["image"], ts)
    ep = tmp_path / "ep.onnx"
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    export_onnx(program, (x,), ["image"], ep)
    for p in (ts, ep):
        s = OnnxSession(p)
        assert s.inputs[0].name == "image" and s.inputs[0].shape == (-1, 1, 8, 8)
        np.testing.assert_allclose(s.run({"image": x.numpy()})[0], want, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep.onnx", "ts.onnx"]


def test_stdout_stays_clean(cnn: tuple, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _, path, calib = cnn
    export_onnx(SmallCNN(), (torch.randn(1, 1, 8, 8),), ["x"], tmp_path / "again.onnx")
    # The histogram calibrators print progress; it must not reach stdout (`packager --json`).
    onnx_quant.quantize(path, OnnxRecipe.make("static", calibration="entropy"), calib, tmp_path / "e.onnx")
    assert capfd.readouterr().out == ""


def test_bad_calibration_is_an_input_error(cnn: tuple, tmp_path: Path) -> None:
    _, path, _ = cnn
    out = tmp_path / "q.onnx"
    with pytest.raises(InputError, match="no input"):
        onnx_quant.quantize(path, onnx_quant.first_recipe(path), {"image": np.zeros((4, 1, 8, 8))}, out)
    with pytest.raises(InputError, match="wants float32"):
        onnx_quant.quantize(path, onnx_quant.first_recipe(path), {"x": np.zeros((4, 1, 8, 8), np.int64)}, out)
    assert list(tmp_path.iterdir()) == []


def test_recipe_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        OnnxRecipe("x", "dynamic", activation_type="int8")
    r = OnnxRecipe.make("static", per_channel=False, calibration="entropy", activation_type="int8",
                        float_nodes=["a", "b"])
    assert r.name == "static-entropy-pertensor-s8-float2"
    assert r.to_json()["float_nodes"] == ["a", "b"]


def test_copy_self_contained_inlines_external_data(cnn: tuple, tmp_path: Path) -> None:
    from packager.onnx_export import copy_self_contained

    _, path, _ = cnn
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "user.onnx"
    onnx.save(onnx.load(str(path)), str(src), save_as_external_data=True, location="user.onnx.data")
    assert (src_dir / "user.onnx.data").exists()
    dst = tmp_path / "model.onnx"
    copy_self_contained(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "src"]
    x = np.zeros((2, 1, 8, 8), np.float32)
    np.testing.assert_array_equal(OnnxSession(dst).run({"x": x})[0], OnnxSession(path).run({"x": x})[0])
    with pytest.raises(InputError, match="cannot read ONNX model"):
        copy_self_contained(tmp_path / "nope.onnx", tmp_path / "out.onnx")


def test_token_ids_past_the_vocabulary_are_a_caller_error(encoder: tuple) -> None:
    s = OnnxSession(encoder[1])
    feeds = _tokens(np.random.default_rng(2), 1)
    feeds["input_ids"] = feeds["input_ids"] + 10**6  # far past the embedding table
    with pytest.raises(ValueError, match="onnxruntime refused the inputs"):
        s.run(feeds)
