"""The TFLite path end to end: PyTorch -> full-int8 TFLite (litert-torch PT2E) -> LiteRTSession (real LiteRT)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.errors import RuntimeUnavailable
from agent.runtime import open_session
from agent.runtime.litert_session import LiteRTSession
from packager.errors import ConversionError
from packager.tflite_convert import convert_int8_tflite

pytestmark = pytest.mark.slow


class TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(5, 4)
        self.drop = torch.nn.Dropout(0.5)  # must be inert: conversion runs in eval mode

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.a(x) + self.b(y)))


class TokenModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.fc = torch.nn.Linear(6 * 8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.emb(ids), 1))


class EmbeddingEncoder(torch.nn.Module):
    """A token model whose size is its embedding table, like a small text encoder."""

    def __init__(self, vocab: int = 2000, dim: int = 64) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.fc1 = torch.nn.Linear(dim, dim)
        self.fc2 = torch.nn.Linear(dim, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(dim=1))))


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on data: torch.export cannot trace one graph
            return self.fc(x)
        return -self.fc(x)


class UnsupportedOp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(self.fc(x), 1)  # no litert-torch lowering


def _quadrant_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images whose label is the brightest quadrant, so the CNN has something real to learn."""
    x = torch.randn(n, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 4, (n,), generator=gen)
    for i, q in enumerate(labels.tolist()):
        r, c = divmod(q, 2)
        x[i, 0, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 1.5
    return x, labels


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-9))


def _calib(shapes: list[tuple[int, ...]], n: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(*s, generator=gen) for s in shapes) for _ in range(n)]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyCNN, Path]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        x, y = _quadrant_data(64, gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("cnn") / "model.int8.tflite"
    calib = [(x[None],) for x in _quadrant_data(32, gen)[0]]
    convert_int8_tflite(model, (calib[0][0],), calib, path)
    return model, path


def test_cnn_specs_are_quantized(cnn: tuple[TinyCNN, Path]) -> None:
    _, path = cnn
    session = LiteRTSession(path)
    assert session.format == "tflite"
    (inp,) = session.inputs
    assert (inp.name, inp.shape, inp.dtype, inp.quantized_dtype) == ("args_0", (-1, 1, 8, 8), "float32", "int8")
    assert inp.scale is not None and inp.scale > 0
    assert inp.zero_point is not None and -128 <= inp.zero_point <= 127
    (out,) = session.outputs
    assert (out.name, out.shape, out.dtype) == ("output_0", (-1, 4), "float32")
    assert out.quantized_dtype == "int8" and out.scale is not None


def test_cnn_int8_matches_float_model(cnn: tuple[TinyCNN, Path]) -> None:
    model, path = cnn
    x, _ = _quadrant_data(64, torch.Generator().manual_seed(123))
    with torch.no_grad():
        want = model(x).numpy()
    got = LiteRTSession(path).run({"args_0": x.numpy()})[0]
    assert got.shape == (64, 4) and got.dtype == np.float32
    agreement = float(np.mean(got.argmax(1) == want.argmax(1)))
    assert agreement >= 0.9, agreement
    assert _rel_err(got, want) < 0.1


def test_batch_of_five_equals_rows(cnn: tuple[TinyCNN, Path]) -> None:
    _, path = cnn
    session = LiteRTSession(path, threads=2)
    x = np.random.default_rng(5).normal(size=(5, 1, 8, 8)).astype(np.float32)
    batch = session.run({"args_0": x})[0]
    rows = np.concatenate([session.run({"args_0": x[i : i + 1]})[0] for i in range(5)])
    assert batch.shape == (5, 4)
    np.testing.assert_array_equal(batch, rows)
    # float64 input is accepted and quantized the same way
    np.testing.assert_array_equal(session.run({"args_0": x.astype(np.float64)})[0], batch)


def test_zero_rows(cnn: tuple[TinyCNN, Path]) -> None:
    out = LiteRTSession(cnn[1]).run({"args_0": np.zeros((0, 1, 8, 8), np.float32)})[0]
    assert out.shape == (0, 4)


@pytest.mark.parametrize(
    ("feeds", "match"),
    [
        (
            {"args_0": np.zeros((2, 1, 7, 8), np.float32)},
            r"'args_0'.*expected shape \(N, 1, 8, 8\), got \(2, 1, 7, 8\)",
        ),
        ({"args_0": np.zeros((1, 8, 8), np.float32)}, r"'args_0'.*expected shape"),
        ({}, r"missing input\(s\) 'args_0'"),
        ({"args_0": np.zeros((1, 1, 8, 8)), "extra": np.zeros(1)}, r"unexpected input\(s\) 'extra'"),
        ({"args_0": np.full((1, 1, 8, 8), "a")}, r"'args_0'.*numeric"),
        ({"args_0": np.full((1, 1, 8, 8), np.nan)}, r"'args_0'.*NaN"),
    ],
)
def test_bad_feeds_raise_value_error(cnn: tuple[TinyCNN, Path], feeds: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LiteRTSession(cnn[1]).run(feeds)


def test_concurrent_runs_agree(cnn: tuple[TinyCNN, Path]) -> None:
    session = LiteRTSession(cnn[1])
    rng = np.random.default_rng(7)
    inputs = [rng.normal(size=(3, 1, 8, 8)).astype(np.float32) for _ in range(8)]
    expected = [session.run({"args_0": x})[0] for x in inputs]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                for x, want in zip(inputs, expected, strict=True):
                    np.testing.assert_array_equal(session.run({"args_0": x})[0], want)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_open_session_renames(cnn: tuple[TinyCNN, Path]) -> None:
    session = open_session(cnn[1], "tflite", input_names=["image"], output_names=["logits"])
    assert [s.name for s in session.inputs] == ["image"]
    assert [s.name for s in session.outputs] == ["logits"]
    assert session.run({"image": np.zeros((2, 1, 8, 8), np.float32)})[0].shape == (2, 4)
    with pytest.raises(ValueError, match="2 input names"):
        LiteRTSession(cnn[1], input_names=["a", "b"])


def test_exported_graph_module_converts(cnn: tuple[TinyCNN, Path], tmp_path: Path) -> None:
    model, _ = cnn
    example = (torch.randn(1, 1, 8, 8),)
    torch.export.save(torch.export.export(model, example), tmp_path / "model.pt2")
    graph_module = torch.export.load(tmp_path / "model.pt2").module()
    out = tmp_path / "gm.tflite"
    calib = [(x[None],) for x in _quadrant_data(16, torch.Generator().manual_seed(3))[0]]
    convert_int8_tflite(graph_module, example, calib, out)
    x, _ = _quadrant_data(32, torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(x).numpy()
    got = LiteRTSession(out).run({"args_0": x.numpy()})[0]
    assert _rel_err(got, want) < 0.15


def test_two_inputs_in_forward_order(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = TwoInputs()
    model.train()
    out = tmp_path / "two.tflite"
    convert_int8_tflite(model, (torch.randn(1, 3), torch.randn(1, 5)), _calib([(1, 3), (1, 5)]), out)
    assert capfd.readouterr().out == ""  # stdout stays clean for `packager build --json`
    assert model.training  # the caller's mode is given back

    session = LiteRTSession(out, input_names=["x", "y"])
    assert [(s.name, s.shape) for s in session.inputs] == [("x", (-1, 3)), ("y", (-1, 5))]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = rng.normal(size=(16, 5)).astype(np.float32)
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    got = session.run({"x": x, "y": y})[0]
    assert _rel_err(got, want) < 0.1
    with pytest.raises(ValueError, match="different batch sizes"):
        session.run({"x": x, "y": y[:3]})


def test_integer_token_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TokenModel().eval()
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 50, (1, 6), generator=gen),) for _ in range(16)]
    out = tmp_path / "tokens.tflite"
    convert_int8_tflite(model, calib[0], calib, out)

    session = LiteRTSession(out)
    (inp,) = session.inputs
    assert (inp.dtype, inp.scale, inp.shape) == ("int32", None, (-1, 6))  # ids stay ids (int64 -> int32)
    ids = torch.randint(0, 50, (8, 6), generator=gen)
    with torch.no_grad():
        want = model(ids).numpy()
    got = session.run({"args_0": ids.numpy()})[0]  # int64 from the caller is fine
    assert got.dtype == np.float32
    assert _rel_err(got, want) < 0.1
    with pytest.raises(ValueError, match="integer values"):
        session.run({"args_0": np.full((1, 6), 1.5)})


def test_embedding_table_is_stored_int8(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    torch.manual_seed(0)
    model = EmbeddingEncoder().eval()
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 2000, (1, 16), generator=gen),) for _ in range(16)]
    out = tmp_path / "emb.tflite"
    convert_int8_tflite(model, calib[0], calib, out)
    assert capfd.readouterr().out == ""

    float_table_bytes = 2000 * 64 * 4
    assert out.stat().st_size < float_table_bytes // 2, out.stat().st_size
    tables = [
        np.dtype(d["dtype"]).name
        for d in Interpreter(model_path=str(out)).get_tensor_details()
        if tuple(d["shape"]) == (2000, 64)
    ]
    assert tables == ["int8"]

    ids = torch.randint(0, 2000, (32, 16), generator=gen)
    with torch.no_grad():
        want = model(ids).numpy()
    got = LiteRTSession(out).run({"args_0": ids.numpy()})[0]
    cosine = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert float(cosine.min()) >= 0.99, cosine.min()


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (DataDependent(), r"torch\.export: the model has data-dependent control flow"),
        (UnsupportedOp(), r"operator aten\.cumprod is not supported by litert-torch"),
    ],
)
def test_conversion_failure_leaves_nothing(tmp_path: Path, module: torch.nn.Module, match: str) -> None:
    out = tmp_path / "out" / "model.tflite"
    with pytest.raises(ConversionError, match=match) as info:
        convert_int8_tflite(module, (torch.randn(1, 4),), _calib([(1, 4)], n=2), out)
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is not None
    assert not out.parent.exists() or os.listdir(out.parent) == []


def test_failure_keeps_previous_file(tmp_path: Path) -> None:
    out = tmp_path / "model.tflite"
    out.write_bytes(b"previous")
    with pytest.raises(ConversionError):
        convert_int8_tflite(UnsupportedOp(), (torch.randn(1, 4),), _calib([(1, 4)], n=2), out)
    assert out.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["model.tflite"]


@pytest.mark.parametrize("content", [b"", b"not a flatbuffer" * 10, None])
def test_invalid_model_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "bad.tflite"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RuntimeUnavailable, match=r"bad\.tflite"):
        LiteRTSession(path)
