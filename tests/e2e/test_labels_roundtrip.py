"""Labels and preprocessing round trip (issue 15): `packager build --labels --preprocess` (the real CLI) ->
`packager publish` -> a real `edge-agent run` deploys the bundle -> a client sends raw images (uint8 pixels, NHWC, at
twice the model's size) over HTTP and MQTT and gets class names with scores, and the raw logits, equal to the
artifact's own run of the model-ready evaluation data.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.deploy.machine import State
from agent.runtime import open_session
from examples.digits.train import train_digits
from examples.local_broker import Mosquitto
from tests.e2e.test_daemon import BIN, TIMEOUT, Device, _env

pytestmark = pytest.mark.slow

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PREPROCESS = "scale=1/16 layout=NHWC resize=nearest dtype=uint8"


def raw_images(x: np.ndarray) -> np.ndarray:
    """Model-ready digits ([N, 1, 8, 8], pixel / 16) as a camera would send them: uint8 pixels, NHWC, 16x16."""
    pixels = np.rint(x * 16).astype(np.uint8).transpose(0, 2, 3, 1)
    return pixels.repeat(2, axis=1).repeat(2, axis=2)


def body(x: np.ndarray, datatype: str, **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": datatype,
                                   "data": x.ravel().tolist()}], **extra}).encode()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The bundle, 16 evaluation inputs (model-ready) and the bundle's ONNX artifact's logits for them."""
    tmp = tmp_path_factory.mktemp("labels")
    paths = train_digits(tmp / "digits", epochs=2)
    (tmp / "labels.txt").write_text("\n".join(NAMES) + "\n")
    r = subprocess.run([str(BIN / "packager"), "build", str(paths["exported_program"]), "--calib", str(paths["calib"]),
                        "--eval", str(paths["eval"]), "--out", str(tmp / "out"), "--name", "digits", "--version", "1",
                        "--format", "onnx", "--labels", str(tmp / "labels.txt"), "--preprocess", PREPROCESS],
                       cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    bundle = tmp / "out" / "digits-1.bundle"
    manifest = verify_bundle(bundle, dest=tmp / "unpacked").manifest
    assert manifest.labels is not None and list(manifest.labels.names) == NAMES
    with np.load(paths["eval"], allow_pickle=False) as z:
        x = z["x"][:16].astype(np.float32)
    logits = open_session(tmp / "unpacked" / "model.int8.onnx", "onnx").run({"x": x})[0]
    return bundle, x, logits


@pytest.fixture
def device(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Device]:
    dev = Device(tmp_path, mosquitto)
    dev.start()
    yield dev
    dev.close()


def post(dev: Device, data: bytes) -> tuple[int, dict[str, Any]]:
    conn = dev.http()
    try:
        conn.request("POST", "/v2/models/digits/infer", body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def deploy(dev: Device, bundle: Path, raw: np.ndarray) -> None:
    """Publish and send raw requests until version 1 is committed (probation gates on answered requests)."""
    dev.publish(bundle)
    dev.wait_ready(path="/v2/health/live")
    deadline = time.monotonic() + TIMEOUT
    i = 0
    while True:
        ds = dev.state()
        if ds.state is State.IDLE and ds.current is not None and ds.current.version == 1:
            return
        assert ds.state is not State.ROLLBACK, f"{ds}\n{dev.log_tail()}"
        assert time.monotonic() < deadline, f"v1 did not commit in {TIMEOUT:g}s\n{dev.log_tail()}"
        status, doc = post(dev, body(raw[i % len(raw)][None], "UINT8"))
        assert status in (200, 503), (status, doc)  # 503 before the model is served
        i += 1
        time.sleep(0.02)


def test_raw_images_in_class_names_out_over_http_and_mqtt(device: Device,
                                                           built: tuple[Path, np.ndarray, np.ndarray]) -> None:
    bundle, x, logits = built
    raw = raw_images(x)
    deploy(device, bundle, raw)
    expected = [NAMES[i] for i in logits.argmax(1)]

    status, meta = device.get("/v2/models/digits")
    assert status == 200, meta
    assert meta["parameters"]["labels"]["names"] == NAMES
    assert meta["parameters"]["preprocessing"]["raw_input"] == {"name": "x", "datatype": "UINT8",
                                                               "shape": [-1, -1, -1, 1]}
    assert device.get("/v2")[1]["extensions"] == ["classification"]

    # HTTP: raw pixels in; the raw logits and the top-3 names with softmax scores out
    status, doc = post(device, body(raw, "UINT8", parameters={"classification": 3}))
    assert status == 200, doc
    by_name = {o["name"]: o for o in doc["outputs"]}
    got = np.asarray(by_name["linear_1"]["data"], np.float32).reshape(by_name["linear_1"]["shape"])
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
    classes = by_name["classification"]
    assert classes["datatype"] == "BYTES" and classes["shape"] == [len(x), 3]
    assert [row[0] for row in classes["parameters"]["labels"]] == expected
    top = [s.split(":", 2) for s in classes["data"][::3]]
    assert [t[2] for t in top] == expected and all(0.0 < float(t[0]) <= 1.0 for t in top)
    scores = np.asarray(classes["parameters"]["scores"])
    assert np.all(np.diff(scores, axis=1) <= 0) and np.all(scores.sum(axis=1) <= 1.0 + 1e-6)

    # a client that preprocessed the data itself says so: the same logits
    status, doc = post(device, body(x, "FP32", parameters={"preprocessed": True}))
    assert status == 200, doc
    np.testing.assert_allclose(np.asarray(doc["outputs"][0]["data"], np.float32).reshape(logits.shape), logits,
                               rtol=1e-5, atol=1e-5)
    # ... and model-ready data sent without saying so is refused (it is no NHWC image), not silently misread
    status, doc = post(device, body(x[:1], "FP32"))
    assert status == 400 and "NHWC" in doc["error"], doc

    # MQTT: the same raw request, Triton's per-output form, answered on a response topic of the device's own
    reply = device.topics.device(device.id, f"infer/response/{uuid.uuid4().hex}")
    with device.mqtt.subscribe_stream([reply]) as replies:
        device.mqtt.publish(device.topics.device(device.id, "infer/request"),
                            body(raw[:4], "UINT8", outputs=[{"name": "linear_1", "parameters": {"classification": 1}}]),
                            retain=False, response_topic=reply, correlation_data=b"c1")
        msg = replies.get(timeout=10)
    assert msg is not None and msg.correlation_data == b"c1"
    answer = json.loads(msg.payload)
    out = answer["outputs"][0]
    assert out["name"] == "linear_1" and out["datatype"] == "BYTES" and out["shape"] == [4, 1], answer
    assert [s.split(":", 2)[2] for s in out["data"]] == expected[:4]
