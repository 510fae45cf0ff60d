"""End to end: the `edge-agent run` daemon deploying real digits bundles that `packager publish` signs and pushes
to a real broker.

The daemons run as real processes (the venv's console scripts, each device with its own state directory, HTTP
port, TUF repository and topic prefix); the Python APIs are used only to build and tamper with bundles, to read the
persisted state while polling (what `edge-agent status` prints, without a process per poll) and to play MQTT and
HTTP clients. Every wait is bounded and polls a condition; nothing relies on a fixed sleep.

The module's first device goes through one fleet's history in order: v1 commits (1), v2 replaces it under load
(2), a parity-broken v3 (3) and a too-slow v4 (4) are rolled back, then it is stopped cleanly and killed (7).
Crash recovery (5), the crash-loop rollback (6), clean stops that do not count as crashes, a stop request during
probation and a broker that is down when the agent starts each get a device of their own.

The module's device (first deployment, swap under load, both rollbacks, SIGTERM and the last will) and the SIGKILL
test run on every broker kind (tests/conftest.py `broker`: Mosquitto MQTT 5 and 3.1.1, RabbitMQ, NATS); the other
devices use Mosquitto.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import sha256_file, verify_bundle, write_bundle
from agent.deploy.machine import DeployState, State
from agent.deploy.store import StateStore
from agent.runtime import open_session
from agent.transport.mqtt import MqttClient
from examples.brokers import Broker
from examples.digits.train import train_digits
from examples.local_broker import Mosquitto, free_port
from packager import tuf_repo
from packager.build import BuildOptions, Progress, build
from packager.publish import CHUNK_SIZE, topics_for
from tests.conftest import chunk_written

pytestmark = pytest.mark.slow

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
GROUP = "lab"
TIMEOUT = 60.0
BIG_PADDING = 24 << 20  # a member that makes the bundle ~190 chunks: a download long enough to interrupt
PROBATION_REQUESTS = 30  # devices with a long probation window commit after this many requests instead


# --- real bundles ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundles:
    v1: Path
    v2: Path
    v3_broken: Path  # v2's model, golden outputs shuffled: fails the parity check at STAGE
    v4_slow: Path  # built with a latency budget of 0.0001 ms: fails probation's p95 check under load
    v3_big: Path  # v2's model plus a 24 MiB padding member, published to its own fleet
    x: np.ndarray  # evaluation inputs, (n, 1, 8, 8) float32
    reference: Path  # v1 unpacked: its ONNX artifact, run directly for comparison


def _rebundle(src: Path, out: Path, version: int, *, shuffle_golden: bool = False, padding: int = 0) -> Path:
    """`src` unpacked and written again as `version`, optionally with its golden outputs shuffled (rows rolled by
    one: the packager's expected classes no longer match the model's) or an extra member of `padding` bytes."""
    work = out.parent / f"{out.name}.members"
    manifest = verify_bundle(src, dest=work).manifest
    members = {name: work / name for name in manifest.files}
    if shuffle_golden:
        golden_path = work / "golden.npz"
        with np.load(golden_path, allow_pickle=False) as z:
            golden = {k: z[k] for k in z.files}
        expected = golden["onnx.output.0"]
        rolled = np.roll(expected, 1, axis=0)
        assert np.mean(rolled.argmax(1) == expected.argmax(1)) < 0.5  # far below the 0.97 agreement required
        golden["onnx.output.0"] = rolled
        np.savez(golden_path, allow_pickle=False, **golden)
    if padding:
        members["padding.bin"] = work / "padding.bin"
        members["padding.bin"].write_bytes(os.urandom(padding))
    write_bundle(out, replace(manifest, version=version), members)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """Real digits bundles (2 epochs, ONNX only: ~10 s for all of them)."""
    tmp = tmp_path_factory.mktemp("daemon-bundles")
    paths = train_digits(tmp / "digits", epochs=2)

    def make(version: int, **options: Any) -> Path:
        opts = BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                            out_dir=tmp / "out", name="digits", version=version, formats=("onnx",),
                            latency_runs=20, **options)
        return build(opts, Progress(0, enabled=False)).bundle

    v1, v2 = make(1), make(2)
    v4 = make(4, latency_budget_ms=0.0001)
    (tmp / "tampered").mkdir()
    (tmp / "big").mkdir()
    v3 = _rebundle(v2, tmp / "tampered" / "digits-3.bundle", 3, shuffle_golden=True)
    big = _rebundle(v2, tmp / "big" / "digits-3.bundle", 3, padding=BIG_PADDING)
    verify_bundle(v1, dest=tmp / "v1-unpacked")
    with np.load(paths["eval"], allow_pickle=False) as z:
        x = z["x"][:16].astype(np.float32)
    return Bundles(v1, v2, v3, v4, big, x, tmp / "v1-unpacked")


# --- HTTP and MQTT clients ------------------------------------------------------------------------------------


def infer_body(x: np.ndarray, request_id: str | None = None) -> bytes:
    doc: dict[str, Any] = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}
    if request_id is not None:
        doc["id"] = request_id
    return json.dumps(doc).encode()


def post_infer(conn: http.client.HTTPConnection, x: np.ndarray) -> tuple[int, dict[str, Any]]:
    conn.request("POST", "/v2/models/digits/infer", body=infer_body(x), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def output_array(doc: dict[str, Any]) -> np.ndarray:
    out = doc["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


class EventLog:
    """Every message on the device's `events` topic, in arrival order (subscribed before the agent runs)."""

    def __init__(self, client: MqttClient, topic: str) -> None:
        self.items: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._sub = client.subscribe_stream([topic])
        threading.Thread(target=self._pump, name="events", daemon=True).start()

    def _pump(self) -> None:
        for msg in self._sub:
            with self._cond:
                self.items.append(json.loads(msg.payload))
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.items)

    def since(self, start: int) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.items[start:])

    def wait(self, pred: Callable[[dict[str, Any]], bool], what: str, start: int = 0, count: int = 1,
             timeout: float = TIMEOUT) -> dict[str, Any]:
        """The `count`th event since index `start` matching `pred`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.items[start:] if pred(e)]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"timed out after {timeout:g}s waiting for the event: {what}; events since then:\n"
                                + "\n".join(map(describe, self.items[start:])))
                self._cond.wait(remaining)


def describe(e: dict[str, Any]) -> str:
    b = e.get("bundle") or {}
    return f"{e['from']} -> {e['to']} ({e['event']}: {e['reason']!r}) v{b.get('version')}"


def is_event(*, frm: str | None = None, to: str | None = None, event: str | None = None, reason: str | None = None,
             version: int | None = None) -> Callable[[dict[str, Any]], bool]:
    def pred(e: dict[str, Any]) -> bool:
        return ((frm is None or e["from"] == frm) and (to is None or e["to"] == to)
                and (event is None or e["event"] == event) and (reason is None or e["reason"] == reason)
                and (version is None or (e["bundle"] or {}).get("version") == version))
    return pred


class Load:
    """Back-to-back HTTP inference requests on one keep-alive connection, every outcome recorded as
    (status, model_version) or (None, the connection error)."""

    def __init__(self, port: int, x: np.ndarray) -> None:
        self.port, self.x = port, x
        self.results: list[tuple[int | None, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        i = 0
        while not self._stop.is_set():
            row = self.x[i % len(self.x)][None]
            i += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                status, doc = post_infer(conn, row)
                self.results.append((status, doc.get("model_version") or doc.get("error", "?")))
            except (OSError, http.client.HTTPException) as e:
                self.results.append((None, repr(e)))
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.01)
        if conn is not None:
            conn.close()

    def wait_count(self, n: int, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < n:
            assert self._thread.is_alive(), "the load thread died"
            assert time.monotonic() < deadline, f"only {len(self.results)} of {n} requests answered in {timeout:g}s"
            time.sleep(0.01)

    def more(self, n: int) -> None:
        self.wait_count(len(self.results) + n)

    def failures(self) -> list[tuple[int | None, str]]:
        return [r for r in self.results if r[0] != 200]

    def versions(self) -> list[int]:
        return [int(v) for status, v in self.results if status == 200]

    def __enter__(self) -> Load:
        self._thread.start()
        self.wait_count(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def runs(values: list[Any]) -> list[Any]:
    """[2, 2, 4, 4, 2] -> [2, 4, 2]"""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


class Prober:
    """Alternating GET /v2/health/ready and POST infer, reconnecting after errors; every outcome timestamped as
    (monotonic time, status or None for a connection error, model_version or error)."""

    def __init__(self, port: int, x: np.ndarray) -> None:
        self.port, self.x = port, x
        self.results: list[tuple[float, int | None, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if i % 2:
                    conn.request("GET", "/v2/health/ready")
                    response = conn.getresponse()
                    status, what = response.status, response.read().decode()
                else:
                    status, doc = post_infer(conn, self.x[i % len(self.x)][None])
                    what = doc.get("model_version") or doc.get("error", "?")
                self.results.append((time.monotonic(), status, what))
            except (OSError, http.client.HTTPException) as e:
                self.results.append((time.monotonic(), None, repr(e)))
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.02)
            else:
                self._stop.wait(0.005)
        if conn is not None:
            conn.close()

    def violations(self, outages: list[tuple[float, float]]) -> list[tuple[float, int | None, str]]:
        """Outcomes that are not a 200, and connection errors outside an outage. An outage runs from a kill until
        the first answer after the restart that followed it (the restarted agent listens only once its model is
        loaded). Answers between a kill and its restart are not the end of it: the killed agent may have sent
        them just before it died, and the prober timestamps them only once it has read them."""
        bad = []
        for t, status, what in self.results:
            if status is not None:
                if status != 200:
                    bad.append((t, status, what))
                continue
            in_outage = any(killed <= t and not self._answered_between(restarted, t) for killed, restarted in outages)
            if not in_outage:
                bad.append((t, status, what))
        return bad

    def _answered_between(self, start: float, end: float) -> bool:
        return any(start < t < end and status is not None for t, status, _ in self.results)

    def infer_versions(self) -> list[int]:
        return [int(what) for _, status, what in self.results if status == 200 and what.isdigit()]

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# --- one device -----------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # only the config file counts; the packager children keep the key passphrase tests/conftest.py sets
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_") or k == "EDGESHIP_KEY_PASSPHRASE"}


class Device:
    """An agent's config, state directory and HTTP port, on a fleet of its own (TUF repository, topic prefix);
    `start()` runs `edge-agent run` (logging to agent.log), `kill()` / `terminate()` stop it."""

    def __init__(self, tmp: Path, broker: Mosquitto | Broker, **deploy: float) -> None:
        self.tmp, self.broker = tmp, broker
        self.fleet = f"d{uuid.uuid4().hex[:10]}"
        self.id = f"dev-{self.fleet}"
        self.topics = topics_for(self.fleet)
        self.repo = tmp / "repo"
        tuf_repo.init_repo(self.repo)
        (tmp / "provisioned-root.json").write_bytes(tuf_repo.provisioning_root(self.repo).read_bytes())
        self.port = free_port()
        self.state_dir = tmp / "state"
        self.config = tmp / "agent.toml"
        self.log = tmp / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        settings = {"poll_interval_s": 1, "probation_s": 2, **deploy}
        self.config.write_text(
            f'[agent]\ndevice_id = "{self.id}"\nstate_dir = "{self.state_dir}"\nfleet = "{self.fleet}"\n'
            f'group = "{GROUP}"\n[mqtt]\nurl = "{broker.url}"\nconnect_timeout_s = 5.0\n'
            f'[trust]\nroot = "{tmp / "provisioned-root.json"}"\n[serve]\nhttp = "127.0.0.1:{self.port}"\n'
            "[limits]\nchunk_timeout_s = 20.0\n[deploy]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.mqtt = MqttClient(broker.url, f"tester-{uuid.uuid4().hex[:8]}", prefix=self.topics)
        self.mqtt.connect(timeout=10)
        self.events = EventLog(self.mqtt, self.topics.device(self.id, "events"))
        self.states = EventLog(self.mqtt, self.topics.device(self.id, "state"))  # every retained state message

    # processes

    def start(self) -> float:
        """Starts the agent; returns when (monotonic)."""
        assert self.proc is None or self.proc.poll() is not None, "the agent is already running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(self.config)],
                                         cwd=self.tmp, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        return time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL; returns when it was sent (monotonic)."""
        assert self.proc is not None and self.running, "the agent is not running"
        at = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL
        return at

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None and self.running, "the agent is not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the agent did not exit within {timeout:g}s of SIGTERM\n{self.log_tail()}")

    def close(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.mqtt.close()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "agent log (tail):\n" + "\n".join(text.splitlines()[-lines:])

    # the fleet side

    def publish(self, bundle: Path) -> None:
        r = subprocess.run([str(BIN / "packager"), "publish", str(bundle), "--repo", str(self.repo), "--broker",
                            self.broker.url, "--fleet", self.fleet, "--group", GROUP],
                           cwd=self.tmp, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert r.returncode == 0, f"packager publish failed ({r.returncode}):\n{r.stderr}"

    def retained_state(self) -> dict[str, Any] | None:
        topic = self.topics.device(self.id, "state")
        data = self.mqtt.get_retained([topic], timeout=10).get(topic)
        return None if data is None else json.loads(data)

    def wait_retained(self, pred: Callable[[dict[str, Any]], bool], what: str,
                      timeout: float = TIMEOUT) -> dict[str, Any]:
        box: list[dict[str, Any]] = []

        def check() -> bool:
            state = self.retained_state()
            if state is not None and pred(state):
                box.append(state)
                return True
            return False

        self.wait(check, what, timeout, need_running=False)
        return box[0]

    # the device side

    def state(self) -> DeployState:
        return StateStore.in_dir(self.state_dir).load()

    def current_version(self) -> int | None:
        current = self.state().current
        return None if current is None else current.version

    def status(self) -> dict[str, Any]:
        """`edge-agent status --json`. A periodic check (every second here) persists CHECK for a moment while it
        applies its outcome; a status read that lands in it is read again, so tests see where the agent settled."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            r = subprocess.run([str(BIN / "edge-agent"), "status", "--config", str(self.config), "--json"],
                               cwd=self.tmp, env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
                               check=False)
            assert r.returncode == 0, r.stderr
            st: dict[str, Any] = json.loads(r.stdout)
            if st["state"] != "check" or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def wait(self, pred: Callable[[], bool], what: str, timeout: float = TIMEOUT, need_running: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if need_running and not self.running:
                pytest.fail(f"the agent exited ({self.proc and self.proc.returncode}) before {what}\n"
                            f"{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{self.log_tail()}")
            time.sleep(0.02)

    def wait_state(self, pred: Callable[[DeployState], bool], what: str, timeout: float = TIMEOUT) -> DeployState:
        box: list[DeployState] = []

        def check() -> bool:
            ds = self.state()
            if pred(ds):
                box.append(ds)
                return True
            return False

        self.wait(check, what, timeout)
        return box[0]

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        conn = self.http()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def infer(self, x: np.ndarray) -> tuple[int, dict[str, Any]]:
        conn = self.http()
        try:
            return post_infer(conn, x)
        finally:
            conn.close()

    def mqtt_infer(self, inputs: list[np.ndarray]) -> list[dict[str, Any]]:
        """One MQTT inference request per input (ids req-0, req-1, ...), each with the same response topic and its
        own correlation data; the answers in request order, matched by correlation data. Over MQTT 3.1.1 (no
        response topic, no correlation data) the agent answers on its own `infer/response`, matched by OIP id."""
        if self.mqtt.protocol == "3.1.1":
            return self._mqtt_infer_311(inputs)
        # inside the fleet's namespace the agent answers only under its own infer/response (agent/serve/mqtt.py)
        reply_topic = self.topics.device(self.id, f"infer/response/{uuid.uuid4().hex}")
        request_topic = self.topics.device(self.id, "infer/request")
        sent = {uuid.uuid4().bytes: i for i in range(len(inputs))}
        answers: dict[bytes, dict[str, Any]] = {}
        with self.mqtt.subscribe_stream([reply_topic]) as replies:
            for corr, i in sent.items():
                self.mqtt.publish(request_topic, infer_body(inputs[i], f"req-{i}"), retain=False,
                                  response_topic=reply_topic, correlation_data=corr)
            while len(answers) < len(sent):
                msg = replies.get(timeout=10)
                assert msg is not None, f"only {len(answers)} of {len(sent)} MQTT inference answers arrived"
                assert msg.correlation_data in sent, msg
                answers[msg.correlation_data] = json.loads(msg.payload)
        return [answers[corr] for corr in sent]

    def _mqtt_infer_311(self, inputs: list[np.ndarray]) -> list[dict[str, Any]]:
        reply_topic = self.topics.device(self.id, "infer/response")
        request_topic = self.topics.device(self.id, "infer/request")
        ids = [f"req-{i}" for i in range(len(inputs))]
        answers: dict[str, dict[str, Any]] = {}
        with self.mqtt.subscribe_stream([reply_topic]) as replies:
            for i, request_id in enumerate(ids):
                self.mqtt.publish(request_topic, infer_body(inputs[i], request_id), retain=False)
            while len(answers) < len(ids):
                msg = replies.get(timeout=10)
                assert msg is not None, f"only {len(answers)} of {len(ids)} MQTT inference answers arrived"
                doc = json.loads(msg.payload)
                assert doc.get("id") in ids, doc
                answers[doc["id"]] = doc
        return [answers[i] for i in ids]

    def wait_ready(self, timeout: float = TIMEOUT, path: str = "/v2/health/ready") -> None:
        def ready() -> bool:
            try:
                return self.get(path)[0] == 200
            except OSError:
                return False

        self.wait(ready, f"HTTP {path}", timeout)

    def commit_with_requests(self, x: np.ndarray, version: int, first: bool = False,
                             timeout: float = TIMEOUT) -> None:
        """Send inference requests until `version` is committed (probation ends after `probation_requests`);
        every answer is a 200, except 503s before the very first model (`first`)."""
        self.wait_ready(path="/v2/health/live")
        deadline = time.monotonic() + timeout
        conn = self.http()
        i = 0
        try:
            while True:
                ds = self.state()
                if ds.state is State.IDLE and ds.current is not None and ds.current.version == version:
                    return
                assert ds.state is not State.ROLLBACK, ds
                assert self.running, f"the agent exited before v{version} committed\n{self.log_tail()}"
                assert time.monotonic() < deadline, f"v{version} did not commit in {timeout:g}s\n{self.log_tail()}"
                i += 1
                status, doc = post_infer(conn, x[i % len(x)][None])
                assert status == 200 or (first and status == 503), (status, doc)
                time.sleep(0.01)
        finally:
            conn.close()


@pytest.fixture(scope="module")
def device(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    """The module's device (one per broker kind): probation 2 s, a check every second (plus the notify poke)."""
    dev = Device(tmp_path_factory.mktemp("device"), broker)
    dev.start()
    yield dev
    dev.close()


@pytest.fixture
def own_device(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(**deploy: float) -> Device:
        dev = Device(tmp_path, mosquitto, **deploy)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.close()


@pytest.fixture
def any_own_device(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., Device]]:
    """`own_device` on each broker kind."""
    made: list[Device] = []

    def make(**deploy: float) -> Device:
        dev = Device(tmp_path, broker, **deploy)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.close()


# --- 1: the first deployment ----------------------------------------------------------------------------------

V1_TRANSITIONS = [
    ("check", "download", "update_available"),
    ("download", "verify", "ok"),
    ("verify", "stage", "ok"),
    ("stage", "activate", "ok"),
    ("activate", "probation", "ok"),
    ("probation", "commit", "passed"),
    ("commit", "idle", "ok"),
]


def test_first_deployment_commits_and_serves(device: Device, bundles: Bundles) -> None:
    mark = device.events.mark()
    states_mark = device.states.mark()
    device.publish(bundles.v1)
    device.events.wait(is_event(frm="commit", to="idle", version=1), "v1 committed", mark)

    st = device.status()
    assert st == {"name": "digits", "version": 1, "format": "onnx", "state": "idle", "previous": [],
                  "last_event": st["last_event"], "rejected": {}, "restarts": 0, "max_restarts": 3,
                  "clean_stop": False, "group": GROUP, "no_deployment": False, "unusable_runtimes": []}

    # the retained state followed every step of the deployment, each message with its time
    device.states.wait(lambda s: s.get("state") == "idle" and s.get("bundle") is not None, "the retained idle v1",
                       states_mark)
    seen = device.states.since(states_mark)
    path = runs([s["state"] for s in seen])
    steps = ["download", "verify", "stage", "activate", "probation", "commit", "idle"]
    assert path[path.index("download"):] == steps, path
    by_state = {s["state"]: s for s in seen}
    v1 = {"name": "digits", "version": 1}
    for step in steps[:-1]:
        msg = by_state[step]
        assert msg["status"] == "online" and msg["at"] > 0 and msg["since"] > 0, msg
        assert msg["bundle"] is None and {k: msg["candidate"][k] for k in v1} == v1, msg
    assert by_state["probation"]["serving"] == dict(v1, format="onnx")
    assert by_state["idle"]["bundle"] == dict(v1, format="onnx") and by_state["idle"]["candidate"] is None
    assert [s["at"] for s in seen] == sorted(s["at"] for s in seen)
    assert st["last_event"]["event"] in ("ok", "no_update")

    # HTTP: ready, and the same answers as the artifact run directly
    assert device.get("/v2/health/ready") == (200, {"ready": True})
    art = json.loads((bundles.reference / "manifest.json").read_text())["artifacts"][0]
    session = open_session(bundles.reference / art["file"], "onnx", input_names=[t["name"] for t in art["inputs"]],
                           output_names=[t["name"] for t in art["outputs"]])
    x = bundles.x[:5]
    expected = session.run({"x": x})[0]
    status, doc = device.infer(x)
    assert status == 200, doc
    assert (doc["model_name"], doc["model_version"]) == ("digits", "1")
    np.testing.assert_allclose(output_array(doc), expected, rtol=1e-5, atol=1e-6)

    # MQTT: requests with a response topic and correlation data, answered there with the same correlation data
    for i, answer in enumerate(device.mqtt_infer([bundles.x[i:i + 2] for i in range(3)])):
        assert (answer["id"], answer["model_name"], answer["model_version"]) == (f"req-{i}", "digits", "1")
        np.testing.assert_allclose(output_array(answer), expected[i:i + 2], rtol=1e-5, atol=1e-6)

    # the retained birth names the committed bundle
    served = {"name": "digits", "version": 1, "format": "onnx"}
    birth = device.wait_retained(lambda s: s.get("bundle") == served, "the retained state naming v1")
    assert birth["status"] == "online" and birth["device"] == device.id and birth["serving"] == served
    assert birth["state"] == "idle" and birth["group"] == GROUP

    # the events: every transition of the deployment, then checks that find nothing new
    events = device.events.since(mark)
    first = next(i for i, e in enumerate(events) if e["event"] == "update_available")
    deployment = events[first:first + len(V1_TRANSITIONS)]
    assert [(e["from"], e["to"], e["event"]) for e in deployment] == V1_TRANSITIONS, list(map(describe, events))
    sha = sha256_file(bundles.v1)
    for e in deployment:
        assert set(e) >= {"device", "from", "to", "event", "reason", "at", "bundle"}, e
        assert e["device"] == device.id and e["reason"] == "" and e["at"] > 0
        assert (e["bundle"]["name"], e["bundle"]["version"], e["bundle"]["sha256"]) == ("digits", 1, sha)
    staged = deployment[3]["staging"]
    assert staged["format"] == "onnx" and staged["parity"]["passed"] and "onnx" in staged["timings"]
    assert [e["at"] for e in deployment] == sorted(e["at"] for e in deployment)
    later = device.events.wait(is_event(frm="check", to="idle"), "a later check", mark + first + len(deployment))
    assert (later["event"], later["reason"]) == ("no_update", "current")
    # the later check read the deployment document again and kept no partial file of it (nor of the bundle)
    assert sorted((device.state_dir / "chunks").iterdir()) == []


def test_mistyped_group_warns_once_and_shows_in_state_and_status(own_device: Callable[..., Device],
                                                                  bundles: Bundles) -> None:
    """The fleet has a deployment for `lab`; this device follows `lbb`. Every check finds nothing signed for it:
    one WARNING in the log (not one per poll), and both the retained state and `edge-agent status` say so."""
    dev = own_device()
    dev.config.write_text(dev.config.read_text().replace(f'group = "{GROUP}"', 'group = "lbb"'))
    dev.publish(bundles.v1)
    mark = dev.events.mark()
    dev.start()
    state = dev.wait_retained(lambda s: s.get("no_deployment") is True, "the retained state saying no deployment")
    assert (state["group"], state["state"], state["bundle"]) == ("lbb", "idle", None)
    dev.events.wait(is_event(frm="check", to="idle", reason="no_deployment"), "three checks", mark, count=3)
    st = dev.status()
    assert (st["group"], st["no_deployment"], st["version"]) == ("lbb", True, None), st
    text = subprocess.run([str(BIN / "edge-agent"), "status", "--config", str(dev.config)], cwd=dev.tmp,
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
    assert "no deployment is signed for group 'lbb'" in text, text
    warnings = [line for line in dev.log.read_text().splitlines()
                if line.startswith("WARNING") and "no deployment is signed for group 'lbb'" in line]
    assert len(warnings) == 1, dev.log_tail()


# --- 2: an update under load ----------------------------------------------------------------------------------


def test_update_under_load_fails_no_request(device: Device, bundles: Bundles) -> None:
    assert device.current_version() == 1
    mark = device.events.mark()
    with Load(device.port, bundles.x) as load:
        device.publish(bundles.v2)
        device.events.wait(is_event(frm="commit", to="idle", version=2), "v2 committed", mark)
        load.more(20)
    assert load.failures() == []
    assert runs(load.versions()) == [1, 2]  # v1's answers, then v2's, never back
    st = device.status()
    assert (st["name"], st["version"], st["state"]) == ("digits", 2, "idle")
    assert st["previous"] == [{"name": "digits", "version": 1}]


# --- 3, 4: bad updates roll back ------------------------------------------------------------------------------


def test_parity_broken_update_is_rolled_back(device: Device, bundles: Bundles) -> None:
    assert device.current_version() == 2
    mark = device.events.mark()
    sha3 = sha256_file(bundles.v3_broken)
    with Load(device.port, bundles.x) as load:
        device.publish(bundles.v3_broken)
        failed = device.events.wait(is_event(to="rollback", version=3), "v3 rolled back", mark)
        done = device.events.wait(is_event(frm="rollback", to="idle"), "the rollback finished", mark)
        load.more(10)
    assert (failed["from"], failed["event"], failed["reason"]) == ("stage", "failed", "parity")
    assert failed["bundle"]["sha256"] == sha3
    assert done["bundle"]["version"] == 2
    assert load.failures() == [] and set(load.versions()) == {2}  # v3 never served

    st = device.status()
    assert (st["version"], st["state"]) == (2, "idle")
    assert st["rejected"].get(sha3) == "parity"
    status, doc = device.infer(bundles.x[:1])
    assert status == 200 and doc["model_version"] == "2"
    assert not list((device.state_dir / "releases").glob("digits-3-*"))  # the rejected release is deleted
    assert not (device.state_dir / "bundles" / "digits-3.bundle").exists()

    # the next polls see v3 again and leave it alone
    after = device.events.mark()
    device.events.wait(is_event(frm="check", to="idle", reason="rejected: parity"), "two more checks", after, count=2)
    assert [describe(e) for e in device.events.since(after) if e["event"] != "no_update"] == []
    assert device.state().state in (State.IDLE, State.CHECK)


def test_too_slow_update_is_rolled_back(device: Device, bundles: Bundles) -> None:
    assert device.current_version() == 2
    mark = device.events.mark()
    sha4 = sha256_file(bundles.v4_slow)
    with Load(device.port, bundles.x) as load:  # >= min_requests_for_rate (20) answered during probation
        device.publish(bundles.v4_slow)
        failed = device.events.wait(is_event(to="rollback", version=4), "v4 rolled back", mark)
        device.events.wait(is_event(frm="rollback", to="idle"), "the rollback finished", mark)
        load.more(10)
    assert (failed["from"], failed["event"], failed["reason"]) == ("probation", "failed", "latency")
    assert load.failures() == []
    assert runs(load.versions()) == [2, 4, 2]
    assert load.versions().count(4) >= 20

    st = device.status()
    assert (st["version"], st["state"]) == (2, "idle")
    assert st["rejected"].get(sha4) == "latency"
    status, doc = device.infer(bundles.x[:1])
    assert status == 200 and doc["model_version"] == "2"


# --- 5: killed mid-deployment ---------------------------------------------------------------------------------


def v2_in_probation(own_device: Callable[..., Device], bundles: Bundles, **deploy: float) -> tuple[Device, int]:
    """A device that committed v1 and has v2 in probation, and the event mark taken before v2 was published.
    Probation is long (30 s) but ends after PROBATION_REQUESTS requests: the test decides when it ends."""
    dev = own_device(probation_s=30, probation_requests=PROBATION_REQUESTS, **deploy)
    dev.start()
    dev.publish(bundles.v1)
    dev.commit_with_requests(bundles.x, 1, first=True)
    mark = dev.events.mark()
    dev.publish(bundles.v2)
    dev.wait_state(lambda ds: ds.state is State.PROBATION, "v2 in probation")
    return dev, mark


def test_killed_agent_resumes_and_converges(any_own_device: Callable[..., Device], bundles: Bundles) -> None:
    # SIGKILL in PROBATION: the restarted agent serves the candidate at once and continues its probation
    dev, _ = v2_in_probation(any_own_device, bundles, max_restarts=10)
    dev.kill()
    assert dev.state().state is State.PROBATION
    mark = dev.events.mark()
    dev.start()
    dev.wait_ready()
    status, doc = dev.infer(bundles.x[:1])
    assert status == 200 and doc["model_version"] == "2"
    st = dev.status()
    assert (st["version"], st["state"]) == (2, "probation")
    assert (st["last_event"]["event"], st["last_event"]["reason"]) == ("restarted", "restart 1 of 10")
    dev.events.wait(is_event(frm="probation", to="probation", event="restarted", version=2), "the restart event",
                    mark)
    dev.commit_with_requests(bundles.x, 2)
    st = dev.status()
    assert (st["version"], st["state"], st["previous"]) == (2, "idle", [{"name": "digits", "version": 1}])

    # SIGKILL in DOWNLOAD (10% of a big bundle's chunks on disk), then as VERIFY and STAGE begin
    sha = sha256_file(bundles.v3_big)
    total = math.ceil(bundles.v3_big.stat().st_size / CHUNK_SIZE)
    kills: list[float] = []
    restarts: list[float] = []
    landed: list[State] = []
    with Prober(dev.port, bundles.x) as probe:
        dev.publish(bundles.v3_big)
        dev.wait(lambda: chunk_written(dev.state_dir, sha, total // 10), "10% of the chunks")
        kills.append(dev.kill())
        landed.append(dev.state().state)
        for step in ("verify", "stage"):
            mark = dev.events.mark()
            restarts.append(dev.start())
            dev.events.wait(is_event(to=step, version=3), f"{step} of v3", mark)
            kills.append(dev.kill())
            landed.append(dev.state().state)
        restarts.append(dev.start())
        dev.wait_state(lambda ds: ds.state is State.IDLE and ds.current is not None and ds.current.version == 3,
                       "v3 committed after three kills")  # the prober's requests end its probation
        dev.wait(lambda: probe.infer_versions()[-1:] == [3], "an answer from v3")
    assert landed[0] is State.DOWNLOAD, landed
    assert landed[1] in (State.VERIFY, State.STAGE), landed
    assert landed[2] in (State.STAGE, State.ACTIVATE, State.PROBATION), landed
    assert probe.violations(list(zip(kills, restarts, strict=True))) == []
    assert runs(probe.infer_versions()) == [2, 3]
    st = dev.status()
    assert (st["version"], st["state"]) == (3, "idle")
    assert st["previous"] == [{"name": "digits", "version": 2}, {"name": "digits", "version": 1}]
    assert st["rejected"] == {}
    assert sha256_file(dev.state_dir / "bundles" / "digits-3.bundle") == sha


# --- 6: a crash loop ------------------------------------------------------------------------------------------


def test_crash_loop_rolls_back(own_device: Callable[..., Device], bundles: Bundles) -> None:
    dev, mark = v2_in_probation(own_device, bundles, max_restarts=3)
    for restart in (1, 2, 3):
        dev.wait_ready()
        status, doc = dev.infer(bundles.x[:1])
        assert status == 200 and doc["model_version"] == "2"  # the candidate serves, in probation
        assert dev.state().state is State.PROBATION
        dev.kill()
        dev.start()
        if restart < 3:
            dev.events.wait(is_event(event="restarted", reason=f"restart {restart} of 3"), f"restart {restart}",
                            mark)
    failed = dev.events.wait(is_event(to="rollback", version=2), "the crash-loop rollback", mark)
    assert (failed["from"], failed["event"], failed["reason"]) == ("probation", "crash_loop", "crash_loop")
    dev.events.wait(is_event(frm="rollback", to="idle"), "the rollback finished", mark)
    dev.wait_ready()
    status, doc = dev.infer(bundles.x[:1])
    assert status == 200 and doc["model_version"] == "1"
    st = dev.status()
    assert (st["version"], st["state"]) == (1, "idle")
    assert st["rejected"] == {sha256_file(bundles.v2): "crash_loop"}
    after = dev.events.mark()
    dev.events.wait(is_event(frm="check", to="idle", reason="rejected: crash_loop"), "a later check", after)


def test_clean_stops_do_not_count_but_kills_do(own_device: Callable[..., Device], bundles: Bundles) -> None:
    """systemd stopping the agent (SIGTERM: a reboot, `systemctl restart`) in probation is not a crash: more clean
    stops than max_restarts leave the candidate serving in probation, uncounted; SIGKILLs still count and roll it
    back, and a clean stop between them neither counts nor resets the count."""
    dev, mark = v2_in_probation(own_device, bundles, max_restarts=2)

    def clean_restart(restarts: int) -> None:
        """SIGTERM, check what status says while stopped, start again and see it resume without counting."""
        assert dev.terminate() == 0
        st = dev.status()
        assert (st["state"], st["version"], st["restarts"], st["clean_stop"]) == ("probation", 2, restarts, True), st
        resumed = dev.events.mark()
        dev.start()
        dev.events.wait(is_event(frm="probation", to="probation", event="restarted", reason="clean_stop",
                                 version=2), "the resume after a clean stop", resumed)
        dev.wait_ready()
        status, doc = dev.infer(bundles.x[:1])
        assert status == 200 and doc["model_version"] == "2"  # the candidate serves, still in probation
        st = dev.status()
        assert (st["state"], st["restarts"], st["clean_stop"]) == ("probation", restarts, False), st

    for _ in range(3):  # one more than max_restarts allows crashes
        clean_restart(0)
    assert [describe(e) for e in dev.events.since(mark) if e["to"] == "rollback"] == []

    dev.kill()  # a crash counts ...
    st = dev.status()
    assert (st["state"], st["restarts"], st["clean_stop"]) == ("probation", 0, False), st
    dev.start()
    dev.events.wait(is_event(event="restarted", reason="restart 1 of 2", version=2), "the counted restart", mark)
    dev.wait_ready()
    assert dev.status()["restarts"] == 1
    clean_restart(1)  # ... a clean stop after it leaves the count alone ...
    dev.kill()  # ... and the next crash is the crash loop
    dev.start()
    failed = dev.events.wait(is_event(to="rollback", version=2), "the crash-loop rollback", mark)
    assert (failed["from"], failed["event"], failed["reason"]) == ("probation", "crash_loop", "crash_loop")
    dev.events.wait(is_event(frm="rollback", to="idle"), "the rollback finished", mark)
    dev.wait_ready()
    status, doc = dev.infer(bundles.x[:1])
    assert status == 200 and doc["model_version"] == "1"
    st = dev.status()
    assert (st["version"], st["restarts"], st["clean_stop"]) == (1, 0, False), st
    assert st["rejected"] == {sha256_file(bundles.v2): "crash_loop"}


# --- 7: online, offline, last will ----------------------------------------------------------------------------


def test_offline_on_sigterm_and_last_will_on_sigkill(device: Device) -> None:
    if not device.running:
        device.start()
    online = device.wait_retained(lambda s: s["status"] == "online", "online")
    served = online["bundle"]

    assert device.terminate() == 0
    offline = device.wait_retained(lambda s: s["status"] == "offline", "offline after SIGTERM")
    # the agent's own goodbye (the last will carries only status and device)
    # (a SIGTERM can land during a periodic check: the agent stops between steps and says so)
    assert offline["device"] == device.id and offline["bundle"] == served, offline
    assert offline["state"] in ("idle", "check"), offline
    assert offline["serving"] == served

    device.start()
    device.wait_retained(lambda s: s["status"] == "online", "online again")
    device.kill()
    will = device.wait_retained(lambda s: s["status"] == "offline", "the last will after SIGKILL")
    assert will == {"status": "offline", "device": device.id}



def test_sigterm_in_probation_says_offline_and_resumes(own_device: Callable[..., Device], bundles: Bundles) -> None:
    """A stop request interrupts probation: the agent still says goodbye itself, and probation resumes after."""
    dev, _ = v2_in_probation(own_device, bundles)
    dev.wait_retained(lambda s: s["status"] == "online", "online")

    assert dev.terminate() == 0
    offline = dev.wait_retained(lambda s: s["status"] == "offline", "offline after SIGTERM")
    assert offline.get("state") == "probation", offline  # the agent's goodbye, not the last will
    assert offline["serving"] == {"name": "digits", "version": 2, "format": "onnx"}
    assert dev.state().state is State.PROBATION

    dev.start()
    dev.wait_ready()
    status, doc = dev.infer(bundles.x[:1])
    assert status == 200 and doc["model_version"] == "2"
    dev.commit_with_requests(bundles.x, 2)


# --- the broker is down when the agent starts -----------------------------------------------------------------


def test_agent_started_without_broker_connects_later(mosquitto_factory: Callable[..., Mosquitto],
                                                     tmp_path: Path, bundles: Bundles) -> None:
    broker = mosquitto_factory(persistent=True)  # the published metadata and bundles survive its restart
    dev = Device(tmp_path, broker)
    try:
        dev.start()
        dev.publish(bundles.v1)
        dev.wait_state(lambda ds: ds.state is State.IDLE and ds.current is not None, "v1 committed")
        assert dev.terminate() == 0
        dev.publish(bundles.v2)
        broker.stop()

        dev.start()  # serves v1 from its state directory without the broker ...
        dev.wait_ready()
        status, doc = dev.infer(bundles.x[:1])
        assert status == 200 and doc["model_version"] == "1"
        broker.start()  # ... connects once it is back, says so, and deploys v2
        dev.wait_state(lambda ds: ds.state is State.IDLE and ds.current is not None and ds.current.version == 2,
                       "v2 committed after the broker came back")
        dev.wait_retained(lambda s: s["status"] == "online" and (s.get("bundle") or {}).get("version") == 2,
                          "online with v2")
        status, doc = dev.infer(bundles.x[:1])
        assert status == 200 and doc["model_version"] == "2"
        dev.mqtt.wait_connected(timeout=TIMEOUT)  # the tester's own client reconnects too
        [answer] = dev.mqtt_infer([bundles.x[:1]])  # it also answers over MQTT
        assert answer["model_version"] == "2", answer
    finally:
        dev.close()
