"""The OIP v2 REST API on a real exported ONNX model, real onnxruntime, real sockets.

Covers every endpoint, an infer round trip equal to the session's own output, model swaps under continuous
load (no failed request, every answer from exactly one model), malformed requests (right 4xx, a message naming
the problem, the server fine afterwards) and clients that are slow, idle or too many.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

from agent.bundle import TensorSpec
from agent.errors import ListenError
from agent.runtime import open_session
from agent.serve.holder import LoadedModel, ModelHolder, RequestStats
from agent.serve.http import DEFAULT_MAX_INFLIGHT, InferenceServer
from agent.serve.mqtt import answer_mqtt_request

NAME = "tiny"
MAX_BODY = 256 << 10
TIMEOUT_S = 1.0  # per-request deadline in these tests (the default is 10 s)


class Tiny(torch.nn.Module):
    """Two inputs (float features, int64 ids) and two outputs (float scores, int64 label)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 3)
        self.emb = torch.nn.Embedding(5, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x) + self.emb(ids)
        return y, y.argmax(-1)


def _export(path: Path, seed: int) -> None:
    from packager.onnx_export import export_onnx

    torch.manual_seed(seed)
    export_onnx(Tiny(), (torch.randn(2, 8), torch.tensor([1, 2])), ["x", "ids"], path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, LoadedModel]:
    d = tmp_path_factory.mktemp("http_models")
    loaded = []
    for version, seed in ((1, 0), (2, 1)):
        path = d / f"tiny-{version}.onnx"
        _export(path, seed)
        session = open_session(path, "onnx", output_names=["scores", "label"])
        loaded.append(LoadedModel(name=NAME, version=version, fmt="onnx", session=session))
    return loaded[0], loaded[1]


@pytest.fixture
def stats() -> RequestStats:
    return RequestStats(window=1000)


@pytest.fixture
def served(models: tuple[LoadedModel, LoadedModel], stats: RequestStats) -> Iterator[InferenceServer]:
    holder = ModelHolder(models[0], stats=stats)
    server = InferenceServer(holder, stats, "127.0.0.1", 0, max_body=MAX_BODY, timeout=TIMEOUT_S)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client() -> Iterator[requests.Session]:
    s = requests.Session()
    s.trust_env = False  # never a proxy for 127.0.0.1
    yield s
    s.close()


X = np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(3, 8)
IDS = np.array([0, 3, 4], dtype=np.int64)


def _body(x: np.ndarray = X[:1], ids: np.ndarray = IDS[:1], **extra: Any) -> dict[str, Any]:
    return {"inputs": [
        {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()},
        {"name": "ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()},
    ], **extra}


def _outputs(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}


def _raw(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; everything the server sends back until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def _status_and_json(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --- endpoints ----------------------------------------------------------------------------------------------


def test_server_and_model_endpoints(served: InferenceServer, client: requests.Session) -> None:
    base = served.url
    r = client.get(f"{base}/v2")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.json()["name"] == "edgeship" and r.json()["extensions"] == ["classification"] and r.json()["version"]
    assert client.get(f"{base}/v2/health/live").json() == {"live": True}
    assert client.get(f"{base}/v2/health/ready").status_code == 200

    for path in (f"/v2/models/{NAME}", f"/v2/models/{NAME}/versions/1"):
        meta = client.get(base + path).json()
        assert meta == {
            "name": NAME, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]},
                       {"name": "ids", "datatype": "INT64", "shape": [-1]}],
            "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
                        {"name": "label", "datatype": "INT64", "shape": [-1]}],
        }
        assert client.get(f"{base}{path}/ready").status_code == 200
    head = client.head(f"{base}/v2/models/{NAME}")
    assert head.status_code == 200 and int(head.headers["Content-Length"]) > 0 and head.content == b""

    for path, needle in (("/v2/models/other", "unknown model 'other'"),
                         (f"/v2/models/{NAME}/versions/7", "no version '7'"),
                         ("/v2/models/other/ready", "unknown model"),
                         (f"/v2/models/{NAME}/versions/7/ready", "no version"),
                         ("/v1/models/tiny", "no such endpoint"),
                         (f"/v2/models/{NAME}/explain", "no such endpoint")):
        r = client.get(base + path)
        assert r.status_code == 404 and needle in r.json()["error"], (path, r.text)


def test_not_ready_until_a_model_is_swapped_in(models: tuple[LoadedModel, LoadedModel], stats: RequestStats,
                                               client: requests.Session) -> None:
    holder = ModelHolder(stats=stats)
    with InferenceServer(holder, stats, port=0, timeout=TIMEOUT_S) as server:
        base = server.url
        assert client.get(f"{base}/v2/health/live").status_code == 200
        r = client.get(f"{base}/v2/health/ready")
        assert r.status_code == 503 and r.json()["ready"] is False
        assert client.get(f"{base}/v2/models/{NAME}/ready").status_code == 503
        r = client.post(f"{base}/v2/models/{NAME}/infer", json=_body())
        assert r.status_code == 503 and "no model" in r.json()["error"]

        assert holder.swap(models[1]) is None
        assert client.get(f"{base}/v2/health/ready").status_code == 200
        assert client.get(f"{base}/v2/models/{NAME}/versions/2/ready").status_code == 200
        r = client.post(f"{base}/v2/models/{NAME}/infer", json=_body())
        assert r.status_code == 200 and r.json()["model_version"] == "2"


def test_infer_round_trip_equals_the_session(served: InferenceServer, models: tuple[LoadedModel, LoadedModel],
                                            client: requests.Session) -> None:
    want = models[0].session.run({"x": X[:1], "ids": IDS[:1]})
    r = client.post(f"{served.url}/v2/models/{NAME}/infer", json=_body(id="req-1", parameters={}))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == NAME and doc["model_version"] == "1" and doc["id"] == "req-1"
    assert [(o["name"], o["datatype"], o["shape"]) for o in doc["outputs"]] == [
        ("scores", "FP32", [1, 3]), ("label", "INT64", [1])]
    got = _outputs(doc)
    np.testing.assert_array_equal(got["scores"].astype(np.float32), want[0])  # float32 survives JSON exactly
    np.testing.assert_array_equal(got["label"], want[1])

    # Versioned URL, nested data, FP64 into the FP32 input (cast), INT32 ids (widened), one output asked for.
    body = _body()
    body["inputs"][0].update(datatype="FP64", data=X[:1].tolist())
    body["inputs"][1].update(datatype="INT32")
    body["outputs"] = [{"name": "label"}]
    doc = client.post(f"{served.url}/v2/models/{NAME}/versions/1/infer", json=body).json()
    assert [o["name"] for o in doc["outputs"]] == ["label"] and doc["outputs"][0]["data"] == want[1].tolist()
    assert isinstance(doc["id"], str) and doc["id"]  # generated when the request has none


def test_batch_of_three(served: InferenceServer, models: tuple[LoadedModel, LoadedModel],
                        client: requests.Session) -> None:
    want = models[0].session.run({"x": X, "ids": IDS})
    doc = client.post(f"{served.url}/v2/models/{NAME}/infer", json=_body(X, IDS)).json()
    got = _outputs(doc)
    assert got["scores"].shape == (3, 3) and got["label"].shape == (3,)
    np.testing.assert_array_equal(got["scores"].astype(np.float32), want[0])
    np.testing.assert_array_equal(got["label"], want[1])


# --- swapping under load --------------------------------------------------------------------------------------


def test_swaps_under_continuous_load_fail_no_request(served: InferenceServer, models: tuple[LoadedModel, LoadedModel],
                                                    stats: RequestStats) -> None:
    expected = {str(m.version): m.session.run({"x": X, "ids": IDS})[0] for m in models}
    assert not np.array_equal(expected["1"], expected["2"])
    holder = served.holder
    url = f"{served.url}/v2/models/{NAME}/infer"
    payload = json.dumps(_body(X, IDS))
    stop = threading.Event()
    seen: list[str] = []
    failures: list[str] = []

    def hammer() -> None:
        s = requests.Session()
        s.trust_env = False
        try:
            while not stop.is_set():
                try:
                    r = s.post(url, data=payload, headers={"Content-Type": "application/json"}, timeout=5)
                except requests.RequestException as e:
                    failures.append(repr(e))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                doc = r.json()
                scores = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(3, 3)
                if not np.array_equal(scores, expected[doc["model_version"]]):
                    failures.append(f"version {doc['model_version']} answered with another model's scores")
                seen.append(doc["model_version"])
        finally:
            s.close()

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    swaps = 0
    deadline = time.monotonic() + 10
    while (swaps < 24 or len(seen) < 400) and time.monotonic() < deadline:
        time.sleep(0.01)
        holder.swap(models[(swaps + 1) % 2])
        swaps += 1
    stop.set()
    for t in threads:
        t.join(10)
    assert not failures, failures[:5]
    assert swaps >= 24 and len(seen) >= 400, (swaps, len(seen))
    assert set(seen) == {"1", "2"}
    snap = stats.snapshot()  # the window restarted at the last swap
    assert snap["errors"] == 0 and snap["rejected"] == 0


class _FakeSession:
    """A ModelSession whose run() can be held open (to pin a request in flight) or made to misbehave."""

    format = "onnx"
    inputs: tuple[TensorSpec, ...] = (TensorSpec("x", (-1, 8), "float32"),)
    outputs: tuple[TensorSpec, ...] = (TensorSpec("y", (-1,), "float32"),)

    def __init__(self, value: float, gate: threading.Event | None = None, broken: bool = False) -> None:
        self.value, self.gate, self.broken, self.entered = value, gate, broken, threading.Event()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5)
        if self.broken:  # a bug-shaped failure: the output cannot be serialized
            return [np.array([object()] * len(feeds["x"]), dtype=object)]
        return [np.full(len(feeds["x"]), self.value, dtype=np.float32)]


def test_request_in_flight_finishes_on_the_model_it_started_with(client: requests.Session) -> None:
    gate = threading.Event()
    old = LoadedModel(name="fake", version=1, fmt="onnx", session=_FakeSession(1.0, gate))
    new = LoadedModel(name="fake", version=2, fmt="onnx", session=_FakeSession(2.0))
    stats = RequestStats()
    holder = ModelHolder(old, stats=stats)
    body: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]}
    with InferenceServer(holder, stats, port=0, timeout=5) as server:
        url = f"{server.url}/v2/models/fake/infer"
        answers: list[requests.Response] = []
        t = threading.Thread(target=lambda: answers.append(requests.post(url, json=body, timeout=10)))
        t.start()
        assert old.session.entered.wait(5)  # type: ignore[attr-defined]
        assert holder.swap(new) is old
        r = client.post(url, json=body)  # new requests go to the new model at once
        assert r.json()["model_version"] == "2" and r.json()["outputs"][0]["data"] == [2.0]
        gate.set()
        t.join(10)
        assert answers[0].status_code == 200
        assert answers[0].json()["model_version"] == "1" and answers[0].json()["outputs"][0]["data"] == [1.0]
        snap = stats.snapshot()  # the old model's late answer is not counted against the new one
        assert (snap["ok"], snap["samples"]) == (1, 1)


def test_unexpected_error_is_a_logged_500_without_traceback(client: requests.Session,
                                                            caplog: pytest.LogCaptureFixture,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    model = LoadedModel(name="fake", version=1, fmt="onnx", session=_FakeSession(0.0, broken=True))
    stats = RequestStats()
    body: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]}
    with InferenceServer(ModelHolder(model, stats=stats), stats, port=0, timeout=5) as server:
        r = client.post(f"{server.url}/v2/models/fake/infer", json=body)
        assert r.status_code == 500 and r.json() == {"error": "internal server error (logged by the agent)"}
        assert client.get(f"{server.url}/v2/health/live").status_code == 200
    assert any(rec.levelname == "ERROR" and rec.exc_info for rec in caplog.records)
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err  # logged, never printed
    assert stats.snapshot()["errors"] == 1


# --- malformed requests ---------------------------------------------------------------------------------------


def _infer_bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _with(i: int, **changes: Any) -> bytes:
    body = _body()
    body["inputs"][i].update(changes)
    return _infer_bytes(body)


MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("bad JSON", b'{"inputs": [', 400, "not valid JSON"),
    ("not an object", b"[1, 2, 3]", 400, "must be a JSON object, got a list"),
    ("inputs missing", b'{"id": "a"}', 400, "no 'inputs'"),
    ("inputs empty", b'{"inputs": []}', 400, "non-empty list"),
    ("input not an object", b'{"inputs": [3]}', 400, "inputs[0] must be an object"),
    ("unknown input", _infer_bytes({"inputs": [*_body()["inputs"], {"name": "z", "shape": [1], "datatype": "FP32",
                                                                      "data": [1]}]}), 400, "unknown input(s) ['z']"),
    ("missing input", _infer_bytes({"inputs": _body()["inputs"][:1]}), 400, "missing input(s) ['ids']"),
    ("input given twice", _infer_bytes({"inputs": [*_body()["inputs"], _body()["inputs"][0]]}), 400,
     "more than once"),
    ("no datatype", _infer_bytes({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}), 400, "no 'datatype'"),
    ("datatype unknown", _with(0, datatype="FP99"), 400, "unknown datatype 'FP99'"),
    ("BYTES", _with(0, datatype="BYTES", data=["a"] * 8), 400, "BYTES tensors are not supported"),
    ("strings declared FP32", _with(0, data=["a"] * 8), 400, "FP32 data must be numbers"),
    ("string among numbers", _with(0, data=[1, 2, 3, "4", 5, 6, 7, 8]), 400, "FP32 data must be numbers"),
    ("null among numbers", _with(0, data=[1, 2, 3, None, 5, 6, 7, 8]), 400, "FP32 data must be numbers"),
    ("booleans declared FP32", _with(0, data=[True] * 8), 400, "got true/false"),
    ("NaN in data", _with(0).replace(b"-1.0", b"NaN", 1), 400, "NaN is not a valid JSON number"),
    ("Infinity in data", _with(0).replace(b"-1.0", b"-Infinity", 1), 400, "-Infinity is not a valid JSON number"),
    ("FP32 overflow", _with(0, data=[1e300] * 8), 400, "values overflow FP32"),
    ("floats in INT64 data", _with(1, data=[1.5]), 400, "INT64 data must be integers, got non-integer numbers"),
    ("FP32 declared for the INT64 input", _with(1, datatype="FP32", data=[1.0]), 400,
     "input 'ids' takes INT64; got FP32 data (floats are not converted to integers)"),
    ("INT64 out of range", _with(1, data=[2**70]), 400, "integers too large"),
    ("INT8 out of range", _with(1, datatype="INT8", data=[300]), 400, "outside the INT8 range"),
    ("shape vs data length", _with(0, shape=[1, 8], data=[0.5] * 7), 400, "shape [1, 8] needs 8 values, 'data' has 7"),
    ("negative shape", _with(0, shape=[-1, 8]), 400, "'shape' must be a list of at most 32 non-negative integers"),
    ("wrong per-sample shape", _with(0, shape=[1, 7], data=[0.5] * 7), 400, "input 'x': expected shape (?, 8)"),
    ("inputs disagree on rows", _with(1, shape=[2], data=[1, 2]), 400, "disagree on the number of rows"),
    ("ragged nested data", _with(0, shape=[2, 2], data=[[1, 2], [3]]), 400, "ragged"),
    ("data not a list", _with(0, data=3), 400, "'data' must be a list"),
    ("id not a string", _infer_bytes(_body(id=5)), 400, "'id' must be a string"),
    ("unknown output", _infer_bytes(_body(outputs=[{"name": "logits"}])), 400, "unknown output(s) ['logits']"),
    ("invalid UTF-8", b'{"inputs": "\xff\xfe"}', 400, "not valid UTF-8"),
    ("nested too deeply", b"[" * 100_000, 400, "nested too deeply"),
]


@pytest.mark.parametrize(("what", "body", "status", "needle"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_infer_request(served: InferenceServer, client: requests.Session, stats: RequestStats,
                                 what: str, body: bytes, status: int, needle: str) -> None:
    r = client.post(f"{served.url}/v2/models/{NAME}/infer", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (what, r.text)
    assert needle in r.json()["error"], (what, r.json())
    assert "Traceback" not in r.text
    r = client.post(f"{served.url}/v2/models/{NAME}/infer", json=_body())  # same connection, still answering
    assert r.status_code == 200
    snap = stats.snapshot()
    assert (snap["rejected"], snap["errors"], snap["ok"]) == (1, 0, 1)


def test_malformed_framing_and_methods(served: InferenceServer, client: requests.Session) -> None:
    port, path = served.port, f"/v2/models/{NAME}/infer"
    cases: list[tuple[str, bytes, int, str]] = [
        ("oversize body", f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**9}\r\n\r\n".encode(), 413,
         f"over the limit of {MAX_BODY} bytes"),
        ("no Content-Length", f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 411,
         "Content-Length header required"),
        ("chunked body", f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
         411, "Transfer-Encoding is not supported"),
        ("bad Content-Length", f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".encode(), 400,
         "bad Content-Length"),
        ("unknown method", f"BREW {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 501, "Unsupported method ('BREW')"),
        ("garbage request line", b"\x00\x01\x02 hello\r\n\r\n", 400, "Bad HTTP/0.9 request type"),
        ("bad HTTP version", b"GET /v2 HTTX/1.1\r\n\r\n", 400, "Bad request version"),
        ("unknown model", b"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
         400, "no 'inputs'"),  # the body is judged first: it is wrong whatever the model
    ]
    for what, data, status, needle in cases:
        got_status, doc = _status_and_json(_raw(port, data))
        assert got_status == status and needle in doc["error"], (what, got_status, doc)

    r = client.post(f"{served.url}/v2/models/nope/infer", json=_body())
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = client.post(f"{served.url}/v2/models/{NAME}/versions/3/infer", json=_body())
    assert r.status_code == 404 and "no version '3'" in r.json()["error"]
    r = client.get(f"{served.url}{path}")
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and "use POST" in r.json()["error"]
    r = client.put(f"{served.url}{path}", json=_body())
    assert r.status_code == 405
    r = client.post(f"{served.url}/v2/health/live", json={})
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"
    r = client.post(f"{served.url}{path}", json=_body())
    assert r.status_code == 200 and r.json()["model_version"] == "1"


def test_ids_past_the_vocabulary_are_a_400(served: InferenceServer, client: requests.Session,
                                           stats: RequestStats) -> None:
    # id 7 is past the embedding table: validation cannot know, onnxruntime refuses it inside the graph
    r = client.post(f"{served.url}/v2/models/{NAME}/infer", json=_body(ids=np.array([7])))
    assert r.status_code == 400 and "refused the inputs" in r.json()["error"]
    snap = stats.snapshot()
    assert (snap["rejected"], snap["errors"]) == (1, 0)  # the client's fault: not held against the model


class _Breaks:
    """A session whose runtime fails the way a broken native kernel does (not a bad-input ValueError)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.format, self.inputs, self.outputs = inner.format, inner.inputs, inner.outputs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if int(np.asarray(feeds["ids"]).ravel()[0]) == 3:
            raise RuntimeError("kernel exploded")
        return list(self.inner.run(feeds))


def test_model_failure_is_a_500_and_counted(models: tuple[LoadedModel, LoadedModel], stats: RequestStats,
                                            client: requests.Session) -> None:
    m = models[0]
    holder = ModelHolder(LoadedModel(m.name, m.version, m.fmt, _Breaks(m.session)), stats=stats)
    with InferenceServer(holder, stats, "127.0.0.1", 0, max_body=MAX_BODY, timeout=TIMEOUT_S) as served:
        r = client.post(f"{served.url}/v2/models/{NAME}/infer", json=_body(ids=np.array([3])))
        assert r.status_code == 500 and "failed to run" in r.json()["error"] and "Traceback" not in r.text
        assert client.post(f"{served.url}/v2/models/{NAME}/infer", json=_body(ids=np.array([1]))).status_code == 200
    snap = stats.snapshot()
    assert (snap["count"], snap["ok"], snap["errors"], snap["error_rate"]) == (2, 1, 1, 0.5)
    assert snap["p50_ms"] is not None and snap["p50_ms"] > 0


# --- slow, idle and too many clients ------------------------------------------------------------------------------


def test_slowloris_does_not_block_other_clients(served: InferenceServer, client: requests.Session) -> None:
    path = f"/v2/models/{NAME}/infer"
    half_headers = socket.create_connection(("127.0.0.1", served.port))
    half_headers.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Le".encode())
    half_bodies = []  # more of them than inferences may run at once: a slow sender must not hold a slot
    for _ in range(DEFAULT_MAX_INFLIGHT + 2):
        half_bodies.append(socket.create_connection(("127.0.0.1", served.port)))
        half_bodies[-1].sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{{\"in".encode())
    trickle = socket.create_connection(("127.0.0.1", served.port))
    try:
        t0 = time.monotonic()
        for _ in range(5):
            assert client.post(served.url + path, json=_body()).status_code == 200
        assert time.monotonic() - t0 < TIMEOUT_S / 2  # answered while the slow ones hang

        # A client trickling one header byte at a time is cut off at the per-request deadline, not kept forever.
        closed_at = None
        for byte in f"GET /v2 HTTP/1.1\r\nX-Slow: {'a' * 100}".encode():
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic() - t0
                break
            time.sleep(0.05)
        assert closed_at is not None and closed_at < TIMEOUT_S * 3, closed_at

        half_headers.settimeout(5)
        assert half_headers.recv(1024) == b""  # closed without an answer: nothing parseable arrived
        for half_body in half_bodies:
            half_body.settimeout(5)
            status, doc = _status_and_json(half_body.recv(4096))
            assert status == 408 and "timed out reading the request body" in doc["error"]
    finally:
        for s in (half_headers, trickle, *half_bodies):
            s.close()
    assert client.get(f"{served.url}/v2/health/live").status_code == 200


def test_connection_cap_refuses_with_503(models: tuple[LoadedModel, LoadedModel], stats: RequestStats,
                                         client: requests.Session) -> None:
    holder = ModelHolder(models[0], stats=stats)
    with InferenceServer(holder, stats, port=0, timeout=TIMEOUT_S, max_connections=2) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        time.sleep(0.2)  # both accepted and waiting for a request
        status, doc = _status_and_json(_raw(server.port, b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 503 and "too many connections" in doc["error"]
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert client.get(f"{server.url}/v2/health/live").status_code == 200


def test_keep_alive_and_stop_closes_idle_connections(served: InferenceServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    body = json.dumps(_body())
    for _ in range(3):
        conn.request("POST", f"/v2/models/{NAME}/infer", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.version == 11 and not r.will_close
        r.read()
        if _ == 0:
            sock = conn.sock
        assert conn.sock is sock  # one TCP connection for all three
    t0 = time.monotonic()
    served.stop()
    assert time.monotonic() - t0 < 1.0
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("GET", "/v2")
        conn.getresponse()
    conn.close()


def test_port_in_use_is_a_listen_error(served: InferenceServer, stats: RequestStats) -> None:
    other = InferenceServer(served.holder, stats, "127.0.0.1", served.port)
    with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{served.port}"):
        other.start()


def test_stats_window_restarts_at_swap(models: tuple[LoadedModel, LoadedModel]) -> None:
    stats = RequestStats(window=3)
    holder = ModelHolder(models[0], stats=stats)
    for ms in (1.0, 2.0, 3.0, 4.0):
        stats.record_ok(ms, tag=models[0])
    stats.record_rejected()
    stats.record_error()
    snap = stats.snapshot()
    assert (snap["count"], snap["ok"], snap["samples"], snap["p50_ms"]) == (6, 4, 3, 3.0)
    assert snap["error_rate"] == pytest.approx(1 / 5)
    holder.swap(models[1])
    stats.record_ok(50.0, tag=models[0])  # a request that started on the old model: not the new one's figure
    stats.record_ok(5.0, tag=models[1])
    snap = stats.snapshot()
    assert (snap["count"], snap["errors"], snap["p99_ms"], snap["error_rate"]) == (1, 0, 5.0, 0.0)


def test_mqtt_answers_use_the_same_codec(models: tuple[LoadedModel, LoadedModel]) -> None:
    stats = RequestStats()
    holder = ModelHolder(models[1], stats=stats)
    want = models[1].session.run({"x": X[:1], "ids": IDS[:1]})
    extras: list[dict[str, Any]] = [{}, {"model_name": NAME}, {"model_name": NAME, "model_version": "2"}]
    for extra in extras:
        doc = json.loads(answer_mqtt_request(holder, stats, _infer_bytes({**_body(), "id": "m1", **extra})))
        assert doc["id"] == "m1" and doc["model_version"] == "2"
        np.testing.assert_array_equal(np.array(doc["outputs"][0]["data"], dtype=np.float32), want[0].ravel())
    assert json.loads(answer_mqtt_request(holder, stats, b"{")) == {
        "error": "request body is not valid JSON: Expecting property name enclosed in double quotes at line 1 "
                 "column 2", "status": 400}
    doc = json.loads(answer_mqtt_request(holder, stats, _infer_bytes(_body(model_name=NAME, model_version="1"))))
    assert doc["status"] == 404 and "no version '1'" in doc["error"]
    doc = json.loads(answer_mqtt_request(holder, stats, b"{}", max_body=1))
    assert doc["status"] == 413
    assert json.loads(answer_mqtt_request(ModelHolder(), stats, _infer_bytes(_body())))["status"] == 503
    snap = stats.snapshot()
    assert (snap["ok"], snap["rejected"], snap["errors"]) == (3, 4, 0)


# --- the batch limit (issue 7 item 3) ---------------------------------------------------------------------------


def _zeros_body(rows: int) -> bytes:
    """A valid request of `rows` rows, zeros written as `0` (the cheapest body for a given number of values)."""
    x = ",".join(["0"] * (rows * 8))
    ids = ",".join(["0"] * rows)
    return (f'{{"inputs":[{{"name":"x","shape":[{rows},8],"datatype":"FP32","data":[{x}]}},'
            f'{{"name":"ids","shape":[{rows}],"datatype":"INT64","data":[{ids}]}}]}}').encode()


def test_batch_over_the_limit_is_a_413_naming_it(served: InferenceServer, client: requests.Session,
                                                 stats: RequestStats) -> None:
    url = f"{served.url}/v2/models/{NAME}/infer"
    ok = client.post(url, data=_zeros_body(64))  # no manifest: the default limit of 64 rows
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [64, 3]
    for rows in (65, 10_000):  # a small body (refused after parsing) and a large one (refused from its shapes)
        r = client.post(url, data=_zeros_body(rows))
        assert r.status_code == 413, r.text
        assert r.json() == {"error": f"input 'x' has a batch of {rows} rows; model 'tiny' takes at most 64 rows per "
                                     "request (max_batch): split the request"}
    assert client.get(f"{served.url}/v2/health/ready").status_code == 200
    snap = stats.snapshot()
    assert (snap["ok"], snap["rejected"], snap["errors"]) == (1, 2, 0)


def test_config_max_batch_caps_the_models_limit(models: tuple[LoadedModel, LoadedModel],
                                                client: requests.Session) -> None:
    stats = RequestStats()
    holder = ModelHolder(models[0], stats=stats, max_batch=8)
    with InferenceServer(holder, stats, "127.0.0.1", 0, timeout=TIMEOUT_S) as server:
        url = f"{server.url}/v2/models/{NAME}/infer"
        assert client.post(url, data=_zeros_body(8)).status_code == 200
        r = client.post(url, data=_zeros_body(9))
        assert r.status_code == 413 and "at most 8 rows" in r.json()["error"]
    # over MQTT the same refusal is the error answer
    doc = json.loads(answer_mqtt_request(holder, stats, _zeros_body(9)))
    assert doc["status"] == 413 and "at most 8 rows" in doc["error"]
    assert holder.batch_limit(models[0]) == 8
    assert ModelHolder(models[0], max_batch=1000).batch_limit(models[0]) == 64  # the config only lowers it
