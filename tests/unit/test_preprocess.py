"""Bundles that carry preprocessing and class names (issue 15): the manifest sections refused when hostile, the
device-side preprocessing (numpy, checked against torch's own resize), top-k with names, and the OIP parameters
(`classification` per request and per output, `preprocessed`) through the codec on a fake session."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent.bundle import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_RAW_SIDE,
    Labels,
    Preprocessing,
    TensorSpec,
    parse_manifest,
    verify_bundle,
    write_bundle,
)
from agent.errors import BadRequest, BundleRejected
from agent.preprocess import prepare, raw_shape, resize, top_k
from agent.serve.holder import LoadedModel, ModelHolder, RequestStats
from agent.serve.oip import model_metadata, parse_infer_request, run_infer
from tests.unit.test_bundle import make_manifest

IMAGE = TensorSpec("x", (-1, 3, 4, 4), "float32")
NAMES = [f"class {i}" for i in range(10)]


def _manifest_doc(**changes: Any) -> dict[str, Any]:
    doc = make_manifest().to_json()
    doc["files"] = {"model.int8.onnx": {"sha256": "0" * 64, "bytes": 1}}
    doc.update(changes)
    return doc


def _parse(doc: dict[str, Any]) -> Any:
    return parse_manifest(json.dumps(doc).encode())


GOOD_PREP = {"input": "x", "layout": "NHWC", "model_layout": "NCHW", "scale": 0.0625, "mean": [0.5],
             "std": [0.25], "resize": "nearest", "dtype": "uint8"}


def test_manifest_round_trip_with_labels_and_preprocessing(tmp_path: Path) -> None:
    m = make_manifest(preprocessing=GOOD_PREP, labels=Labels("logits", tuple(NAMES), "softmax"))
    (tmp_path / "m.onnx").write_bytes(b"m")
    out = write_bundle(tmp_path / "digits-3.bundle", m, {"model.int8.onnx": tmp_path / "m.onnx"})
    read = verify_bundle(tmp_path / "digits-3.bundle").manifest
    assert read == out and read.labels is not None and read.labels.names[3] == "class 3"
    assert read.preprocess == Preprocessing("x", "NHWC", "NCHW", 0.0625, (0.5,), (0.25,), "nearest", "uint8")
    assert _parse(_manifest_doc(preprocessing={"note": "free text"})).preprocess is None  # older bundles


@pytest.mark.parametrize(("prep", "message"), [
    ({**GOOD_PREP, "crop": 3}, "unknown key"),
    ({**GOOD_PREP, "input": "nope"}, "not one of the model's inputs"),
    ({**GOOD_PREP, "layout": "HWC"}, "layout and model_layout must be one of"),
    ({**GOOD_PREP, "scale": 0}, "scale must not be 0"),
    ({**GOOD_PREP, "scale": "2"}, "scale must be a number"),
    ({**GOOD_PREP, "std": [0.0]}, "std values must be positive"),
    ({**GOOD_PREP, "std": [-1.0]}, "std values must be positive"),
    ({**GOOD_PREP, "mean": []}, "mean must be a list of 1 to"),
    ({**GOOD_PREP, "mean": [0.0] * 5000}, "mean must be a list of 1 to"),
    ({**GOOD_PREP, "mean": [True]}, "must be a number"),
    ({**GOOD_PREP, "mean": [0.1, 0.2, 0.3]}, "3 channel statistics, input 'x' has 1 channels"),
    ({**GOOD_PREP, "resize": "lanczos"}, "resize must be one of"),
    ({**GOOD_PREP, "dtype": "float64"}, "dtype must be one of"),
    ({**GOOD_PREP, "note": ["x"]}, "note must be a string"),
])
def test_hostile_preprocessing_is_refused(prep: dict[str, Any], message: str) -> None:
    with pytest.raises(BundleRejected, match=message) as e:
        _parse(_manifest_doc(preprocessing=prep))
    assert e.value.reason == "manifest"


def test_preprocessing_needs_an_image_input_for_image_steps() -> None:
    flat = TensorSpec("x", (-1, 64), "float32").to_json()
    doc = _manifest_doc(inputs=[flat], preprocessing={"input": "x", "layout": "NHWC"})
    with pytest.raises(BundleRejected, match="needs a 4-D image input"):
        _parse(doc)
    ok = _parse(_manifest_doc(inputs=[flat], preprocessing={"input": "x", "scale": 2.0}))  # scalar steps: any rank
    assert ok.preprocess is not None and not ok.preprocess.image
    dyn = TensorSpec("x", (-1, 1, -1, -1), "float32").to_json()
    with pytest.raises(BundleRejected, match="resize needs a fixed height and width"):
        _parse(_manifest_doc(inputs=[dyn], preprocessing={"input": "x", "resize": "bilinear"}))
    ints = TensorSpec("x", (-1, 1, 8, 8), "int64").to_json()
    with pytest.raises(BundleRejected, match="feeds float inputs only"):
        _parse(_manifest_doc(inputs=[ints], preprocessing={"input": "x", "scale": 2.0}))


@pytest.mark.parametrize(("labels", "message"), [
    ({"output": "logits", "names": NAMES[:9]}, "9 names, output 'logits' has 10 classes"),
    ({"output": "nope", "names": NAMES}, "not one of the model's outputs"),
    ({"output": "logits", "names": "abc"}, "must be a list of 1 to"),
    ({"output": "logits", "names": []}, "must be a list of 1 to"),
    ({"output": "logits", "names": ["x"] * (MAX_LABELS + 1)}, "must be a list of 1 to"),
    ({"output": "logits", "names": [*NAMES[:9], 7]}, r"names\[9\] must be a printable string"),
    ({"output": "logits", "names": [*NAMES[:9], ""]}, r"names\[9\] must be a printable string"),
    ({"output": "logits", "names": [*NAMES[:9], "a\nb"]}, r"names\[9\] must be a printable string"),
    ({"output": "logits", "names": [*NAMES[:9], "\x1b[31mred"]}, r"names\[9\] must be a printable string"),
    ({"output": "logits", "names": [*NAMES[:9], "y" * (MAX_LABEL_CHARS + 1)]}, "must be a printable string"),
    ({"output": "logits", "names": NAMES, "scores": "sigmoid"}, "scores must be one of"),
    ({"output": "logits", "names": NAMES, "extra": 1}, "unknown key"),
    ({"names": NAMES}, "missing field"),
])
def test_hostile_labels_are_refused(labels: dict[str, Any], message: str) -> None:
    with pytest.raises(BundleRejected, match=message) as e:
        _parse(_manifest_doc(labels=labels))
    assert e.value.reason == "manifest"


def test_prepare_nhwc_uint8_to_nchw_float_per_channel() -> None:
    spec = Preprocessing("x", "NHWC", "NCHW", 1 / 255, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    raw = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    out = prepare(spec, raw, IMAGE)
    assert out.shape == (2, 3, 4, 4) and out.dtype == np.float32
    want = (raw.astype(np.float32) / 255 - np.array([0.5, 0.25, 0.0], np.float32)) / np.array([0.5, 0.25, 1.0])
    np.testing.assert_allclose(out, want.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-6)
    assert raw_shape(spec, IMAGE) == [-1, 4, 4, 3]


def test_nearest_resize_undoes_an_integer_upscale_and_bilinear_matches_torch() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 17, size=(2, 8, 8, 1)).astype(np.float32)
    up = img.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_array_equal(resize(up, 8, 8, "nearest"), img)
    for h, w in ((8, 8), (5, 11), (17, 3), (1, 1)):
        src = rng.normal(size=(2, 13, 9, 3)).astype(np.float32)
        ours = resize(src, h, w, "bilinear")
        theirs = torch.nn.functional.interpolate(torch.from_numpy(src).permute(0, 3, 1, 2), size=(h, w),
                                                 mode="bilinear", align_corners=False, antialias=False)
        np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), atol=1e-5)
        near = torch.nn.functional.interpolate(torch.from_numpy(src).permute(0, 3, 1, 2), size=(h, w),
                                               mode="nearest")
        np.testing.assert_array_equal(resize(src, h, w, "nearest"), near.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize(("raw", "message"), [
    (np.zeros((1, 4, 4), np.uint8), "send a 4-D image batch in NHWC"),
    (np.zeros((1, 4, 4, 2), np.uint8), "2 channels in NHWC layout, the model takes 3"),
    (np.zeros((1, 5, 4, 3), np.uint8), r"5x4 pixels, the model takes 4x4 \(this bundle does not resize\)"),
    (np.zeros((1, 4, 4, 3), bool), "preprocessing takes numbers"),
])
def test_prepare_refuses_what_does_not_fit(raw: np.ndarray, message: str) -> None:
    spec = Preprocessing("x", "NHWC", "NCHW", 1.0, (0.0,), (1.0,))
    with pytest.raises(BadRequest, match=message):
        prepare(spec, raw, IMAGE)


def test_resize_bounds_the_raw_size_and_overflow_is_refused() -> None:
    spec = Preprocessing("x", "NHWC", "NCHW", 1.0, (0.0,), (1.0,), "bilinear")
    with pytest.raises(BadRequest, match=f"height and width must be 1..{MAX_RAW_SIDE}"):
        prepare(spec, np.zeros((1, MAX_RAW_SIDE + 1, 1, 3), np.uint8), IMAGE)
    assert prepare(spec, np.zeros((1, 1, 30, 3), np.uint8), IMAGE).shape == (1, 3, 4, 4)
    half = TensorSpec("x", (-1, 3, 4, 4), "float16")
    with pytest.raises(BadRequest, match="overflow float16"):
        prepare(replace(spec, scale=1e6), np.full((1, 4, 4, 3), 255, np.uint8), half)


def test_top_k_softmax_scores_names_and_ties() -> None:
    out = np.array([[0.0, 2.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]], np.float32)
    labels = Labels("y", ("a", "b", "c", "d"), "softmax")
    rows = top_k(out, 3, labels)
    assert [[c.index for c in r] for r in rows] == [[1, 3, 2], [0, 1, 2]]  # a tie goes to the lower index
    p = np.exp(out[0] - 2) / np.exp(out[0] - 2).sum()
    assert rows[0][0].score == pytest.approx(p[1]) and rows[0][0].name == "b"
    assert rows[0][0].triton() == f"{p[1]:.6g}:1:b"
    assert len(top_k(out, 99, labels)[0]) == 4  # at most the number of classes
    raw = top_k(out, 1, None)[1][0]
    assert (raw.score, raw.name, raw.triton()) == (5.0, None, "5:0")  # no labels: Triton's value:index


# --- the OIP codec with a fake session ---------------------------------------------------------------------------


class Recorder:
    """A session that returns fixed logits and keeps what it was fed."""

    format = "onnx"
    inputs = (TensorSpec("x", (-1, 1, 4, 4), "float32"),)
    outputs = (TensorSpec("logits", (-1, 10), "float32"),)

    def __init__(self) -> None:
        self.fed: list[np.ndarray] = []

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = feeds["x"]
        self.fed.append(x)
        logits = np.zeros((len(x), 10), np.float32)
        logits[:, 7] = 3.0
        logits[:, 2] = 1.0
        return [logits]


def _served(session: Recorder, *, prep: dict[str, Any] | None, labels: bool) -> tuple[ModelHolder, RequestStats]:
    spec = session.inputs[0]
    m = make_manifest(inputs=(spec,), outputs=session.outputs, preprocessing=prep or {},
                      labels=Labels("logits", tuple(NAMES), "softmax") if labels else None)
    stats = RequestStats()
    return ModelHolder(LoadedModel("digits", 3, "onnx", session, manifest=m), stats=stats), stats  # type: ignore[arg-type]


def _body(x: np.ndarray, datatype: str, **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": datatype,
                                   "data": x.ravel().tolist()}], **extra}).encode()


def test_raw_input_is_preprocessed_and_answers_name_the_classes() -> None:
    session = Recorder()
    holder, stats = _served(session, prep={"input": "x", "layout": "NHWC", "scale": 0.0625, "resize": "nearest",
                                           "dtype": "uint8"}, labels=True)
    raw = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1) % 17  # 8x8 NHWC: the device resizes to 4x4
    doc = json.loads(run_infer(holder, stats, _body(raw, "UINT8", parameters={"classification": 2})))
    np.testing.assert_allclose(session.fed[-1], (raw[:, ::2, ::2, :] / 16).transpose(0, 3, 1, 2))
    by_name = {o["name"]: o for o in doc["outputs"]}
    assert by_name["logits"]["datatype"] == "FP32" and len(by_name["logits"]["data"]) == 10  # raw outputs too
    cls = by_name["classification"]
    assert cls["datatype"] == "BYTES" and cls["shape"] == [1, 2]
    assert cls["parameters"]["labels"] == [["class 7", "class 2"]]
    assert cls["data"][0].endswith(":7:class 7") and float(cls["data"][0].split(":")[0]) > 0.5
    # Triton's form: the output itself comes back as classes
    doc = json.loads(run_infer(holder, stats, _body(raw, "UINT8", outputs=[
        {"name": "logits", "parameters": {"classification": 1}}])))
    assert [o["name"] for o in doc["outputs"]] == ["logits"] and doc["outputs"][0]["datatype"] == "BYTES"
    assert doc["outputs"][0]["data"][0].endswith(":7:class 7")
    # a client that preprocessed already says so, and its data goes to the model as sent
    ready = np.full((1, 1, 4, 4), 0.25, np.float32)
    run_infer(holder, stats, _body(ready, "FP32", parameters={"preprocessed": True}))
    np.testing.assert_array_equal(session.fed[-1], ready)
    # without saying so, model-ready data is refused as a raw image of the wrong layout/size, not silently rescaled
    with pytest.raises(BadRequest, match="4 channels in NHWC layout"):
        run_infer(holder, stats, _body(ready, "FP32"))


def test_metadata_tells_what_to_send_raw_and_the_names() -> None:
    holder, _ = _served(Recorder(), prep={"input": "x", "layout": "NHWC", "resize": "bilinear", "dtype": "uint8"},
                        labels=True)
    model = holder.get()
    assert model is not None
    params = model_metadata(model)["parameters"]
    assert params["preprocessing"]["raw_input"] == {"name": "x", "datatype": "UINT8", "shape": [-1, -1, -1, 1]}
    assert params["labels"]["names"] == NAMES and params["labels"]["output"] == "logits"
    plain, _ = _served(Recorder(), prep=None, labels=False)
    assert plain.get() is not None and "parameters" not in model_metadata(plain.get())  # type: ignore[arg-type]


@pytest.mark.parametrize(("extra", "message"), [
    ({"parameters": {"classification": 0}}, "classification' must be an integer from 1"),
    ({"parameters": {"classification": True}}, "classification' must be an integer from 1"),
    ({"parameters": {"classification": "3"}}, "must be an integer, got a string"),
    ({"parameters": {"preprocessed": "yes"}}, "preprocessed' must be true or false"),
    ({"outputs": [{"name": "logits", "parameters": {"classification": 10**9}}]}, "from 1 to 65536"),
    ({"outputs": [{"name": "logits", "parameters": []}]}, "'parameters' must be an object"),
])
def test_bad_parameters_are_400(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_infer_request(_body(np.zeros((1, 1, 4, 4), np.float32), "FP32", **extra))


def test_classification_without_labels_is_tritons_value_and_index() -> None:
    holder, stats = _served(Recorder(), prep=None, labels=False)
    doc = json.loads(run_infer(holder, stats, _body(np.zeros((2, 1, 4, 4), np.float32), "FP32",
                                                    parameters={"classification": 1})))
    cls = next(o for o in doc["outputs"] if o["name"] == "classification")
    assert cls["data"] == ["3:7", "3:7"] and "parameters" not in cls
