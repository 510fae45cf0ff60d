"""The memory bound on device-side preprocessing (agent/preprocess.py MAX_PREPROCESS_ELEMENTS): hostile shapes are
refused (413) before anything is converted or allocated, over the codec, HTTP and MQTT alike; the largest requests
allowed run in about the memory of their output (measured in a child process); a manifest number too large for a
float is a clean bundle rejection."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import requests

from agent.bundle import MAX_CHANNELS, Preprocessing, TensorSpec, parse_manifest
from agent.errors import BadRequest, BundleRejected, InputTooLarge
from agent.preprocess import MAX_PREPROCESS_ELEMENTS, prepare, work_elements
from agent.serve.holder import LoadedModel, ModelHolder, RequestStats
from agent.serve.http import InferenceServer
from agent.serve.mqtt import answer_mqtt_request
from agent.serve.oip import run_infer
from tests.unit.test_bundle import make_manifest

ROOT = Path(__file__).resolve().parents[2]
MODEL = TensorSpec("x", (-1, 3, 224, 224), "float32")
BILINEAR = Preprocessing("x", "NHWC", "NCHW", 1 / 255, (0.5,), (0.25,), "bilinear", "uint8")
MIB = 1 << 20


def _huge(shape: tuple[int, ...], dtype: str = "uint8") -> np.ndarray:
    """A read-only view of `shape` over one element: converting it would allocate the whole shape."""
    return np.broadcast_to(np.zeros((1,) * len(shape), dtype), shape)


@pytest.mark.parametrize(("shape", "layout", "model"), [
    ((8, 1, 8192, 3), "NHWC", MODEL),  # the reviewer's request: 0.39 MB of JSON, 538 MB of RSS before the bound
    ((64, 8192, 1, 3), "NHWC", MODEL),
    ((64, 3, 8192, 8192), "NCHW", MODEL),  # 12.9 GB if it were ever converted
    ((1, 1, 1, 700), "NHWC", TensorSpec("x", (-1, -1, 224, 224), "float32")),  # channels -1: 224 x 224 x 700
    ((3, 4096, 4096, 1), "NHWC", TensorSpec("x", (-1, 1, 4096, 4096), "float32")),  # no resize, still too much
])
def test_hostile_shapes_are_refused_before_anything_is_allocated(shape: tuple[int, ...], layout: str,
                                                                 model: TensorSpec) -> None:
    resize = None if shape[1:3] == model.shape[2:] else "bilinear"
    spec = Preprocessing("x", layout, "NCHW", 1 / 255, (0.5,), (0.25,), resize, "uint8")
    raw = _huge(shape)
    tracemalloc.start()  # numpy reports its data buffers to tracemalloc
    try:
        with pytest.raises(InputTooLarge, match=f"more than the limit of {MAX_PREPROCESS_ELEMENTS}") as e:
            prepare(spec, raw, model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10, f"{peak} bytes allocated before the refusal"
    assert e.value.status == 413 and "send fewer or smaller images" in str(e.value)


def test_the_budget_is_inclusive_and_charges_the_larger_side_of_each_axis() -> None:
    assert work_elements(8, (1, 8192), (224, 224), 3) == 8 * 224 * 8192 * 3 > MAX_PREPROCESS_ELEMENTS
    n = MAX_PREPROCESS_ELEMENTS // (224 * 8192 * 3)
    assert prepare(BILINEAR, _huge((n, 1, 8192, 3)), MODEL).shape == (n, 3, 224, 224)
    with pytest.raises(InputTooLarge):
        prepare(BILINEAR, _huge((n + 1, 1, 8192, 3)), MODEL)


def test_a_model_of_any_channel_count_takes_a_bounded_one() -> None:
    model = TensorSpec("x", (-1, -1, 8, 8), "float32")
    spec = Preprocessing("x", "NHWC", "NCHW", 1.0, (0.0,), (1.0,), "nearest")
    assert prepare(spec, np.ones((1, 3, 3, 7), np.uint8), model).shape == (1, 7, 8, 8)
    too_many = f"{MAX_CHANNELS + 1} channels in NHWC layout, the model takes 1..{MAX_CHANNELS}"
    with pytest.raises(BadRequest, match=too_many):
        prepare(spec, _huge((1, 1, 1, MAX_CHANNELS + 1)), model)
    with pytest.raises(BadRequest, match="0 channels"):
        prepare(spec, np.ones((1, 3, 3, 0), np.uint8), model)


def test_a_flat_input_is_held_to_the_same_budget() -> None:
    spec = Preprocessing("x", scale=2.0)
    flat = TensorSpec("x", (-1, -1), "float32")
    np.testing.assert_array_equal(prepare(spec, np.ones((2, 3), np.uint8), flat), np.full((2, 3), 2.0, np.float32))
    with pytest.raises(InputTooLarge):
        prepare(spec, _huge((2, MAX_PREPROCESS_ELEMENTS // 2 + 1)), flat)


# --- over the transports: the max_batch refusal path (413, counted as rejected) -------------------------------------


class Session:
    """A session for a 224x224 RGB model that counts what it was fed."""

    format = "onnx"
    inputs = (MODEL,)
    outputs = (TensorSpec("logits", (-1, 10), "float32"),)

    def __init__(self) -> None:
        self.runs = 0

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        return [np.zeros((len(feeds["x"]), 10), np.float32)]


def _holder() -> tuple[ModelHolder, RequestStats, Session]:
    session = Session()
    m = make_manifest(inputs=(MODEL,), outputs=Session.outputs, preprocessing=BILINEAR.to_json())
    stats = RequestStats()
    holder = ModelHolder(LoadedModel("cls", 1, "onnx", session, manifest=m), stats=stats)  # type: ignore[arg-type]
    return holder, stats, session


def _request(shape: tuple[int, ...]) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(shape), "datatype": "UINT8",
                                   "data": [7] * int(np.prod(shape))}]}, separators=(",", ":")).encode()


HOSTILE = _request((8, 1, 8192, 3))


def test_the_hostile_request_is_a_413_over_the_codec_and_mqtt() -> None:
    assert len(HOSTILE) < 400_000  # 0.39 MB
    holder, stats, session = _holder()
    with pytest.raises(InputTooLarge) as e:
        run_infer(holder, stats, HOSTILE)
    assert e.value.status == 413
    doc = json.loads(answer_mqtt_request(holder, stats, HOSTILE))
    assert doc["status"] == 413 and "more than the limit of" in doc["error"], doc
    snap = stats.snapshot()
    assert (snap["rejected"], snap["errors"], session.runs) == (2, 0, 0), snap
    ok = json.loads(answer_mqtt_request(holder, stats, _request((1, 1, 8192, 3))))
    assert ok["outputs"][0]["shape"] == [1, 10] and session.runs == 1, ok


def test_the_hostile_request_is_a_413_over_http() -> None:
    holder, stats, session = _holder()
    server = InferenceServer(holder, stats, "127.0.0.1", 0)
    server.start()
    try:
        with requests.Session() as client:
            client.trust_env = False
            url = f"http://127.0.0.1:{server.port}/v2/models/cls/infer"
            r = client.post(url, data=HOSTILE, timeout=30)
            assert r.status_code == 413 and "send fewer or smaller images" in r.json()["error"], r.text
            assert client.post(url, data=_request((1, 1, 8192, 3)), timeout=30).status_code == 200
    finally:
        server.stop()
    assert session.runs == 1


# --- memory, measured in a child process -------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from agent.bundle import Preprocessing, TensorSpec
    from agent.preprocess import prepare

    def status(key):  # KiB. VmHWM, not ru_maxrss: that one keeps the forking parent's RSS across exec
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    model_shape, raw_shape = json.loads(sys.argv[1])
    model = TensorSpec("x", tuple(model_shape), "float32")
    spec = Preprocessing("x", "NHWC", "NCHW", 1 / 255, (0.5,), (0.25,), "bilinear", "uint8")
    raw = np.empty(raw_shape, np.uint8)
    raw.fill(200)  # touched, without temporaries that would raise the high-water mark
    prepare(spec, np.zeros((1, 5, 7, raw_shape[3]), np.uint8), model)  # first use: lazy imports, caches
    rss = status("VmRSS")
    out = prepare(spec, raw, model)
    peak = status("VmHWM")
    print(json.dumps({"grew": (peak - rss) * 1024, "out": out.nbytes, "sum": float(out[:, :, :4, :4].sum())}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
@pytest.mark.parametrize(("model_shape", "raw_shape"), [
    # exactly the budget: 2 x 4096 x 4096 x 1, a 128 MiB float32 output; the input's 3000 rows grow to 4096
    ((-1, 1, 4096, 4096), (2, 3000, 4096, 1)),
    # the reviewer's shape at the most images allowed: rows first, this made 378 MiB of temporaries
    ((-1, 3, 224, 224), (MAX_PREPROCESS_ELEMENTS // (224 * 8192 * 3), 1, 8192, 3)),
    # a tiny input grown to a large model input: 96 MiB of output
    ((-1, 3, 2048, 2048), (2, 16, 16, 3)),
])
def test_the_largest_allowed_requests_cost_about_their_output(model_shape: tuple[int, ...],
                                                              raw_shape: tuple[int, ...]) -> None:
    n, h, w, c = raw_shape
    assert work_elements(n, (h, w), (model_shape[2], model_shape[3]), c) <= MAX_PREPROCESS_ELEMENTS
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps([model_shape, raw_shape])], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert got["sum"] == pytest.approx(n * 16 * model_shape[1] * (200 / 255 - 0.5) / 0.25, rel=1e-4)
    # the output itself, plus tiles of CHUNK_ELEMENTS (a few MiB): never the full-size temporaries of before
    assert got["grew"] <= got["out"] + 32 * MIB, got


# --- bundle: a number too large for a float --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["scale", "mean", "std", "latency_budget_ms"])
def test_an_integer_too_large_for_a_float_is_a_manifest_error(where: str) -> None:
    doc = make_manifest(inputs=(MODEL,), preprocessing=BILINEAR.to_json()).to_json()
    doc["files"] = {"model.int8.onnx": {"sha256": "0" * 64, "bytes": 1}}
    if where == "latency_budget_ms":
        doc[where] = 10**400
    else:
        doc["preprocessing"][where] = 10**400 if where == "scale" else [10**400]
    with pytest.raises(BundleRejected, match=f"{where} must be finite") as e:
        parse_manifest(json.dumps(doc).encode())
    assert e.value.reason == "manifest"
