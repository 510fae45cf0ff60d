"""MQTT inference through the daemon's own wiring (`Daemon._attach`) on a real mosquitto and real onnxruntime.

Answers go where the request's response topic says only when that topic is allowed (docs/agent.md): never into the
fleet's namespace, never to a topic the agent cannot publish to; each refusal is logged with its reason. A batch
over the model's limit gets an error answer naming it.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import parse_config
from agent.daemon import Daemon
from agent.runtime import open_session
from agent.serve.holder import LoadedModel
from examples.local_broker import Mosquitto

DEV = "infer-dev"


def _onnx_model(path: Path) -> None:
    from packager.onnx_export import export_onnx

    torch.manual_seed(0)
    export_onnx(torch.nn.Linear(4, 2), (torch.randn(2, 4),), ["x"], path)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = tmp_path_factory.mktemp("mqtt_infer") / "lin.onnx"
    _onnx_model(path)
    return LoadedModel("lin", 1, "onnx", open_session(path, "onnx", output_names=["y"]))


@pytest.fixture
def daemon(mosquitto: Mosquitto, model: LoadedModel, tmp_path: Path) -> Iterator[Daemon]:
    fleet = f"f{uuid.uuid4().hex[:8]}"
    (tmp_path / "root.json").write_text("{}")
    cfg = parse_config({"agent": {"device_id": DEV, "state_dir": str(tmp_path / "state"), "fleet": fleet},
                        "mqtt": {"url": mosquitto.url}, "trust": {"root": str(tmp_path / "root.json")}}, env={})
    d = Daemon(cfg)
    d.holder.swap(model)
    client = d._new_client()
    client.connect(timeout=10)
    d._attach(client)
    yield d
    client.close()
    d._infer_pool.shutdown(wait=True)


class Requester:
    """A plain paho MQTT 5 client: it can ask for response topics our own client would refuse to send."""

    def __init__(self, url: str) -> None:
        port = int(url.rsplit(":", 1)[1])
        self.got: queue.Queue[tuple[str, bytes, bytes | None]] = queue.Queue()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"req-{uuid.uuid4().hex[:8]}",
                             protocol=paho.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *args: self.subacks.put(args)
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        self.got.put((msg.topic, bytes(msg.payload), bytes(corr) if corr is not None else None))

    def subscribe(self, *filters: str) -> None:
        for f in filters:
            self.c.subscribe(f, qos=1)
        for _ in filters:
            self.subacks.get(timeout=10)

    def ask(self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        self.c.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def requester(mosquitto: Mosquitto) -> Iterator[Requester]:
    r = Requester(mosquitto.url)
    yield r
    r.close()


def _request(rows: int) -> bytes:
    x = np.ones((rows, 4), dtype=np.float32)
    return json.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def _get(r: Requester, timeout: float = 10.0) -> tuple[str, bytes, bytes | None]:
    return r.got.get(timeout=timeout)


def test_allowed_response_topics_are_answered(daemon: Daemon, requester: Requester) -> None:
    prefix = daemon.mqtt.topics.prefix
    own = f"{prefix}devices/{DEV}/infer/response"
    req = f"{prefix}devices/{DEV}/infer/request"
    requester.subscribe("apps/ui/replies", own, own + "/r1")
    for asked, answered_on in (("apps/ui/replies", "apps/ui/replies"), (None, own), (own + "/r1", own + "/r1")):
        corr = uuid.uuid4().bytes
        requester.ask(req, _request(2), asked, corr)
        topic, payload, got_corr = _get(requester)
        doc = json.loads(payload)
        assert (topic, got_corr) == (answered_on, corr)
        assert doc["model_name"] == "lin" and doc["outputs"][0]["shape"] == [2, 2]


def test_oversize_batch_gets_an_error_answer(daemon: Daemon, requester: Requester) -> None:
    prefix = daemon.mqtt.topics.prefix
    requester.subscribe("apps/ui/replies")
    requester.ask(f"{prefix}devices/{DEV}/infer/request", _request(65), "apps/ui/replies", b"c-65")
    topic, payload, corr = _get(requester)
    assert (topic, corr) == ("apps/ui/replies", b"c-65")
    assert json.loads(payload) == {"status": 413, "error": "input 'x' has a batch of 65 rows; model 'lin' takes at "
                                                           "most 64 rows per request (max_batch): split the request"}


def test_disallowed_response_topics_get_no_answer_and_a_logged_reason(
        daemon: Daemon, requester: Requester, caplog: pytest.LogCaptureFixture) -> None:
    prefix = daemon.mqtt.topics.prefix
    refused = {
        "/x": "has an empty level",
        "a//b": "has an empty level",
        f"{prefix}tuf/timestamp.json": "inside the fleet's namespace",
        f"{prefix}targets/abc/meta": "inside the fleet's namespace",
        f"{prefix}deployments/default.json": "inside the fleet's namespace",
        f"{prefix}devices/other/infer/response": "inside the fleet's namespace",
        f"{prefix}devices/{DEV}/state": "inside the fleet's namespace",
    }
    requester.subscribe(*refused, "apps/ui/replies")
    req = f"{prefix}devices/{DEV}/infer/request"
    caplog.set_level(logging.WARNING, logger="agent.serve.mqtt")
    for topic in refused:
        requester.ask(req, _request(1), topic, b"c")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum("not answering" in r.getMessage() for r in caplog.records) < len(refused):
        time.sleep(0.05)
    for topic, reason in refused.items():
        assert any(r.levelno == logging.WARNING and repr(topic) in r.getMessage() and reason in r.getMessage()
                   for r in caplog.records), (topic, [r.getMessage() for r in caplog.records])
    # a request the agent does answer, sent after all the refused ones: nothing else arrived meanwhile
    requester.ask(req, _request(1), "apps/ui/replies", b"last")
    assert _get(requester)[0] == "apps/ui/replies"
    assert requester.got.empty()
    assert daemon.stats.snapshot()["rejected"] == len(refused)
    # the same refused topic again is not logged again
    before = len(caplog.records)
    requester.ask(req, _request(1), "/x", b"again")
    requester.ask(req, _request(1), "apps/ui/replies", b"after")
    assert _get(requester)[0] == "apps/ui/replies"
    assert len([r for r in caplog.records[before:] if "not answering" in r.getMessage()]) == 0


def test_a_request_on_an_apps_own_topic_is_answered_only_on_that_apps_response_topic(
        daemon: Daemon, requester: Requester, caplog: pytest.LogCaptureFixture) -> None:
    """`infer/request/cam` (which a broker's ACL lets only the app cam write) is answered on `infer/response/cam`,
    with or without that response topic asked for; asked to answer anywhere else (another app's response topic, the
    shared one, outside the fleet), the agent refuses and logs why: cam cannot write into door's answers."""
    prefix = daemon.mqtt.topics.prefix
    base = f"{prefix}devices/{DEV}/infer/"
    cam, door = base + "response/cam", base + "response/door"
    requester.subscribe(cam, door, base + "response", "apps/ui/replies")
    caplog.set_level(logging.WARNING, logger="agent.serve.mqtt")
    refused = (door, base + "response", "apps/ui/replies")
    for topic in refused:
        requester.ask(base + "request/cam", _request(1), topic, b"forged")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum("not answering" in r.getMessage() for r in caplog.records) < len(refused):
        time.sleep(0.05)
    for topic in refused:
        assert any(repr(topic) in r.getMessage() and "the only answer topic of app 'cam'" in r.getMessage()
                   for r in caplog.records), (topic, [r.getMessage() for r in caplog.records])
    for asked in (None, cam):
        requester.ask(base + "request/cam", _request(1), asked, b"mine")
        topic, payload, corr = _get(requester)
        assert (topic, corr) == (cam, b"mine") and json.loads(payload)["model_name"] == "lin"
    assert requester.got.empty()
    assert daemon.stats.snapshot()["rejected"] == len(refused)
