"""Answer ids, the serving observer hook and labelled feedback, on a real exported ONNX model, real onnxruntime,
the real HTTP server and a real mosquitto.

The observer is told the same id the caller gets back (generated when the request has none), for HTTP and MQTT;
feedback reaches the sink with that id; malformed feedback (not JSON, no id, a label of the wrong type, a body over
the limit) is a 4xx or an MQTT error answer and never reaches the sink, and a label the sink refuses is a 400.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import torch

from agent.runtime import open_session
from agent.serve.holder import LoadedModel, ModelHolder, RequestStats
from agent.serve.http import InferenceServer
from agent.serve.mqtt import MqttInference, answer_mqtt_request
from agent.serve.oip import MAX_FEEDBACK_BYTES
from agent.transport.mqtt import MqttClient
from examples.local_broker import Mosquitto
from tests.integration.test_mqtt_inference import Requester

NAME = "clf"
DEV = "fb-dev"


class Recorder:
    """An observer and a feedback sink at once, as the telemetry hub is: it remembers answered ids, and takes one
    label per id (an int class index for this 3-class model; anything else is a ValueError)."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, LoadedModel, dict[str, np.ndarray], dict[str, np.ndarray], float]] = []
        self.failures: list[tuple[LoadedModel | None, str, float | None]] = []
        self.calls: list[tuple[str, str, Any]] = []
        self.labels: dict[str, Any] = {}

    def answered(self, request_id: str, model: LoadedModel, inputs: dict[str, np.ndarray], outputs: Any,
                 ms: float) -> None:
        self.answers.append((request_id, model, inputs, dict(outputs), ms))

    def failed(self, model: LoadedModel | None, kind: str, ms: float | None) -> None:
        self.failures.append((model, kind, ms))

    def feedback(self, model_name: str, request_id: str, label: Any) -> str:
        self.calls.append((model_name, request_id, label))
        if not isinstance(label, int) or not 0 <= label < 3:
            raise ValueError(f"a class index 0..2, got {label!r}")
        if request_id not in {a[0] for a in self.answers}:
            return "unknown"
        if request_id in self.labels:
            return "duplicate"
        self.labels[request_id] = label
        return "accepted"


class Broken:
    def answered(self, *args: Any) -> None:
        raise RuntimeError("observer bug")

    def failed(self, *args: Any) -> None:
        raise RuntimeError("observer bug")


class Clf(torch.nn.Module):
    """Scores for 3 classes and the argmax label: two outputs, so "ask for one" is testable."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x)
        return y, y.argmax(-1)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from packager.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("feedback") / "clf.onnx"
    torch.manual_seed(0)
    export_onnx(Clf(), (torch.randn(2, 4),), ["x"], path)
    return LoadedModel(NAME, 1, "onnx", open_session(path, "onnx", output_names=["scores", "label"]))


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def stats(rec: Recorder) -> RequestStats:
    return RequestStats(window=100, observers=[rec])


@pytest.fixture
def holder(model: LoadedModel, stats: RequestStats) -> ModelHolder:
    return ModelHolder(model, stats=stats)


@pytest.fixture
def server(holder: ModelHolder, stats: RequestStats, rec: Recorder) -> Iterator[InferenceServer]:
    with InferenceServer(holder, stats, "127.0.0.1", 0, timeout=2.0, feedback=rec) as s:
        yield s


@pytest.fixture
def client() -> Iterator[requests.Session]:
    s = requests.Session()
    s.trust_env = False
    yield s
    s.close()


X = np.array([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -1.0, 3.0]], dtype=np.float32)


def _body(**extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}],
            **extra}


def _infer(client: requests.Session, server: InferenceServer, **extra: Any) -> dict[str, Any]:
    r = client.post(f"{server.url}/v2/models/{NAME}/infer", json=_body(**extra), timeout=10)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _feedback(client: requests.Session, server: InferenceServer, body: Any, raw: bytes | None = None,
              name: str = NAME) -> requests.Response:
    data = raw if raw is not None else json.dumps(body).encode()
    return client.post(f"{server.url}/v2/models/{name}/feedback", data=data, timeout=10,
                       headers={"Content-Type": "application/json"})


# --- ids and the observer ------------------------------------------------------------------------------------


def test_the_observer_gets_the_id_the_caller_gets(client: requests.Session, server: InferenceServer,
                                                  rec: Recorder, model: LoadedModel) -> None:
    given = _infer(client, server, id="req-7", outputs=[{"name": "label"}])
    generated = _infer(client, server)
    empty = _infer(client, server, id="")
    assert given["id"] == "req-7"
    assert generated["id"] and empty["id"] and generated["id"] != empty["id"]
    assert [a[0] for a in rec.answers] == ["req-7", generated["id"], empty["id"]]
    _, seen_model, inputs, outputs, ms = rec.answers[0]
    assert seen_model is model and ms > 0
    np.testing.assert_array_equal(inputs["x"], X)
    # every output of the model, in its order, though the caller asked for "label" only
    assert list(outputs) == ["scores", "label"]
    scores, label = model.session.run({"x": X})
    np.testing.assert_allclose(outputs["scores"], scores, rtol=1e-6)
    assert [o["name"] for o in given["outputs"]] == ["label"]
    assert given["outputs"][0]["data"] == outputs["label"].tolist() == label.tolist()
    assert rec.failures == []


def test_refused_and_failed_requests_reach_the_observer(client: requests.Session, server: InferenceServer,
                                                        rec: Recorder, model: LoadedModel) -> None:
    assert client.post(f"{server.url}/v2/models/{NAME}/infer", data=b"{", timeout=10).status_code == 400
    assert client.post(f"{server.url}/v2/models/other/infer", json=_body(), timeout=10).status_code == 404
    too_big = "x" * (server.max_body + 1)
    assert client.post(f"{server.url}/v2/models/{NAME}/infer", data=too_big, timeout=10).status_code == 413
    assert [(m, kind) for m, kind, _ in rec.failures] == [(model, "rejected"), (None, "rejected"),
                                                        (model, "rejected")]
    assert rec.failures[0][2] is not None and rec.failures[2][2] is None  # the last never reached the serving layer
    assert rec.answers == []


def test_an_observer_that_raises_never_fails_the_request(holder: ModelHolder, stats: RequestStats, rec: Recorder,
                                                         client: requests.Session, server: InferenceServer,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    stats.observers.insert(0, Broken())
    caplog.set_level(logging.DEBUG, logger="agent.serve.holder")
    first, second = _infer(client, server, id="a"), _infer(client, server, id="b")
    assert (first["id"], second["id"]) == ("a", "b")
    assert [a[0] for a in rec.answers] == ["a", "b"]  # the next observer is still told
    assert client.post(f"{server.url}/v2/models/{NAME}/infer", data=b"{", timeout=10).status_code == 400
    assert stats.snapshot()["ok"] == 2 and stats.snapshot()["rejected"] == 1
    loud = [r for r in caplog.records if r.levelno == logging.ERROR and "observer" in r.getMessage()]
    assert len(loud) == 1 and loud[0].exc_info is not None  # logged once with its traceback, not per request


def test_mqtt_answers_carry_the_id_the_observer_gets(holder: ModelHolder, stats: RequestStats,
                                                     rec: Recorder) -> None:
    given = json.loads(answer_mqtt_request(holder, stats, json.dumps(_body(id="m-1")).encode()))
    generated = json.loads(answer_mqtt_request(holder, stats, json.dumps(_body()).encode()))
    assert given["id"] == "m-1" and generated["id"]
    assert [a[0] for a in rec.answers] == ["m-1", generated["id"]]


# --- feedback over HTTP --------------------------------------------------------------------------------------


def test_feedback_for_an_answer_is_accepted_once(client: requests.Session, server: InferenceServer,
                                                 rec: Recorder) -> None:
    answer = _infer(client, server)
    r = _feedback(client, server, {"id": answer["id"], "label": 2})
    assert (r.status_code, r.json()) == (200, {"id": answer["id"], "result": "accepted"})
    assert r.headers["Content-Type"] == "application/json"
    again = _feedback(client, server, {"id": answer["id"], "label": 1})
    assert (again.status_code, again.json()["result"]) == (200, "duplicate")
    unknown = _feedback(client, server, {"id": "never-answered", "label": 0})
    assert (unknown.status_code, unknown.json()) == (200, {"id": "never-answered", "result": "unknown"})
    assert rec.calls == [(NAME, answer["id"], 2), (NAME, answer["id"], 1), (NAME, "never-answered", 0)]
    assert rec.labels == {answer["id"]: 2}


@pytest.mark.parametrize(("raw", "message"), [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe", "not valid UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"label": 1}', "feedback needs 'id'"),
    (b'{"id": 7, "label": 1}', "feedback needs 'id'"),
    (b'{"id": "", "label": 1}', "feedback needs 'id'"),
    (b'{"id": "a"}', "feedback needs 'label'"),
    (b'{"id": "a", "label": "cat"}', "'label' must be"),
    (b'{"id": "a", "label": true}', "'label' must be"),
    (b'{"id": "a", "label": null}', "'label' must be"),
    (b'{"id": "a", "label": {"k": 1}}', "'label' must be"),
    (b'{"id": "a", "label": []}', "non-empty list of finite numbers"),
    (b'{"id": "a", "label": [[1, 2]]}', "non-empty list of finite numbers"),
    (b'{"id": "a", "label": [1, "2"]}', "non-empty list of finite numbers"),
    (b'{"id": "a", "label": NaN}', "not valid JSON"),
    (b'{"id": "a", "label": 1, "model_name": 3}', "'model_name' must be a string"),
])
def test_malformed_feedback_is_a_400_and_never_reaches_the_sink(
        client: requests.Session, server: InferenceServer, rec: Recorder, raw: bytes, message: str) -> None:
    r = _feedback(client, server, None, raw=raw)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert rec.calls == []


def test_a_label_the_sink_refuses_is_a_400(client: requests.Session, server: InferenceServer,
                                           rec: Recorder) -> None:
    answer = _infer(client, server)
    r = _feedback(client, server, {"id": answer["id"], "label": [0.1, 0.9]})
    assert r.status_code == 400
    assert "does not fit the prediction" in r.json()["error"] and "class index 0..2" in r.json()["error"]
    assert rec.labels == {}
    assert _feedback(client, server, {"id": answer["id"], "label": 1}).json()["result"] == "accepted"


def test_oversize_feedback_is_a_413_unread(client: requests.Session, server: InferenceServer,
                                          rec: Recorder) -> None:
    body = json.dumps({"id": "a", "label": [0.5] * (MAX_FEEDBACK_BYTES // 4)}).encode()
    assert len(body) > MAX_FEEDBACK_BYTES
    r = _feedback(client, server, None, raw=body)
    assert r.status_code == 413 and str(MAX_FEEDBACK_BYTES) in r.json()["error"]
    assert rec.calls == []
    assert _infer(client, server)["id"]  # the server is fine afterwards


def test_feedback_endpoint_methods_paths_and_a_disabled_sink(holder: ModelHolder, stats: RequestStats,
                                                             client: requests.Session,
                                                             server: InferenceServer) -> None:
    r = client.get(f"{server.url}/v2/models/{NAME}/feedback", timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = client.post(f"{server.url}/v2/models/{NAME}/versions/1/feedback", json={"id": "a", "label": 1}, timeout=10)
    assert r.status_code == 404
    with InferenceServer(holder, stats, "127.0.0.1", 0, timeout=2.0) as bare:
        r = client.post(f"{bare.url}/v2/models/{NAME}/feedback", json={"id": "a", "label": 1}, timeout=10)
        assert (r.status_code, r.json()) == (404, {"error": "feedback is not enabled on this agent"})


# --- feedback (and answer ids) over a real broker ------------------------------------------------------------


@pytest.fixture
def agent_side(mosquitto: Mosquitto, holder: ModelHolder, stats: RequestStats,
               rec: Recorder) -> Iterator[tuple[MqttClient, MqttInference]]:
    """The agent's own client, subscribed to its feedback and request topics, feeding MqttInference as the daemon
    does (one worker thread per topic here)."""
    prefix = f"f{uuid.uuid4().hex[:8]}/"
    client = MqttClient(mosquitto.url, f"agent-{uuid.uuid4().hex[:8]}", prefix=prefix)
    client.connect(timeout=10)

    def publish(topic: str, body: bytes, correlation: bytes | None) -> None:
        client.publish(topic, body, retain=False, qos=1, wait=False, correlation_data=correlation)

    answerer = MqttInference(holder, stats, publish, client.topics.prefix, DEV, feedback=rec)
    subs = [(client.subscribe_stream([client.topics.device(DEV, "feedback")]), answerer.feedback),
            (client.subscribe_stream([client.topics.device(DEV, "infer/request")]), answerer.answer)]
    threads = [threading.Thread(target=lambda s=s, f=f: [f(m) for m in s], daemon=True) for s, f in subs]
    for t in threads:
        t.start()
    yield client, answerer
    for s, _ in subs:
        s.close()
    client.close()


@pytest.fixture
def requester(mosquitto: Mosquitto) -> Iterator[Requester]:
    r = Requester(mosquitto.url)
    yield r
    r.close()


def test_mqtt_feedback_round_trip(agent_side: tuple[MqttClient, MqttInference], requester: Requester,
                                  rec: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    client, _ = agent_side
    prefix = client.topics.prefix
    requester.subscribe("apps/fb")
    # an inference over MQTT first: its answer's id is the one the observer got
    requester.ask(f"{prefix}devices/{DEV}/infer/request", json.dumps(_body()).encode(), "apps/fb", b"i1")
    topic, payload, corr = requester.got.get(timeout=10)
    answer_id = json.loads(payload)["id"]
    assert (topic, corr) == ("apps/fb", b"i1") and [a[0] for a in rec.answers] == [answer_id]

    fb = f"{prefix}devices/{DEV}/feedback"
    requester.ask(fb, json.dumps({"id": answer_id, "label": 1}).encode(), "apps/fb", b"f1")
    assert requester.got.get(timeout=10) == ("apps/fb", json.dumps(
        {"id": answer_id, "result": "accepted"}, separators=(",", ":")).encode(), b"f1")
    assert rec.calls == [(NAME, answer_id, 1)]

    requester.ask(fb, json.dumps({"id": "nope", "label": 0}).encode(), "apps/fb", b"f2")
    assert json.loads(requester.got.get(timeout=10)[1]) == {"id": "nope", "result": "unknown"}

    requester.ask(fb, b'{"id": "x", "label": "cat"}', "apps/fb", b"f3")
    topic, payload, corr = requester.got.get(timeout=10)
    assert corr == b"f3" and json.loads(payload)["status"] == 400
    requester.ask(fb, json.dumps({"id": "x", "label": [1.0] * MAX_FEEDBACK_BYTES}).encode(), "apps/fb", b"f4")
    assert json.loads(requester.got.get(timeout=10)[1])["status"] == 413
    requester.ask(fb, json.dumps({"id": answer_id, "label": 9}).encode(), "apps/fb", b"f5")
    assert json.loads(requester.got.get(timeout=10)[1])["status"] == 400  # the sink's ValueError
    assert rec.labels == {answer_id: 1}

    # a refused response topic: not applied, no answer, the reason logged
    caplog.set_level(logging.WARNING, logger="agent.serve.mqtt")
    before = len(rec.calls)
    requester.ask(fb, json.dumps({"id": answer_id, "label": 2}).encode(), f"{prefix}devices/{DEV}/state", b"f6")
    # no response topic: applied, no answer. Sent after the refused one, so once it is in, both were handled.
    second = _infer_mqtt(requester, prefix)
    requester.ask(fb, json.dumps({"id": second, "label": 0}).encode(), None, b"f7")
    _wait_for(lambda: len(rec.calls) > before)
    assert rec.calls[before:] == [(NAME, second, 0)]
    assert rec.labels == {answer_id: 1, second: 0}
    assert requester.got.empty()
    assert any("not taking MQTT feedback" in r.getMessage() and "inside the fleet's namespace" in r.getMessage()
               for r in caplog.records)


def _infer_mqtt(requester: Requester, prefix: str) -> str:
    requester.ask(f"{prefix}devices/{DEV}/infer/request", json.dumps(_body()).encode(), "apps/fb", b"i")
    request_id: str = json.loads(requester.got.get(timeout=10)[1])["id"]
    return request_id


def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_mqtt_feedback_without_a_sink_is_ignored(holder: ModelHolder, stats: RequestStats) -> None:
    sent: list[Any] = []
    answerer = MqttInference(holder, stats, lambda *a: sent.append(a), "p/", DEV)

    class Msg:
        topic = f"p/devices/{DEV}/feedback"
        payload = b'{"id": "a", "label": 1}'
        response_topic = "apps/fb"
        correlation_data = b"c"

    answerer.feedback(Msg())
    assert sent == []
