"""On-device accuracy end to end: one real agent process serving a real digits bundle, a real mosquitto, the figures
read from the agent's own telemetry messages and checked against the same figures computed offline.

The deployment (signed by `packager publish --shadow`) serves digits v1 and names a deliberately different model
(trained for one epoch on another seed) as digits v2 in shadow. The agent sends telemetry every 0.5 s, shadows every
request (shadow_sample 1.0, shadow_cpu_budget 1.0) and judges drift over a window of 300 rows from 100 rows on.
Each test reads its figures as differences from the telemetry before it, so the tests do not depend on each other.
"""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.runtime import ModelSession, open_session
from examples.digits.train import train_digits
from examples.local_broker import Mosquitto
from packager.build import BuildOptions, Progress, build
from tests.e2e.test_daemon import BIN, GROUP, TIMEOUT, Device, _env, infer_body, output_array

pytestmark = pytest.mark.slow

DRIFT_WINDOW, DRIFT_MIN = 300, 100


@dataclass(frozen=True)
class Built:
    serving: Path  # digits v1
    shadow: Path  # digits v2: another model
    x: np.ndarray  # the evaluation inputs, (n, 1, 8, 8) float32
    y: np.ndarray  # their labels
    tmp: Path


def _session(bundle: Path, dest: Path) -> ModelSession:
    manifest = verify_bundle(bundle, dest=dest).manifest
    art = json.loads((dest / "manifest.json").read_text())["artifacts"][0]
    assert manifest.artifacts[0].format == "onnx"
    return open_session(dest / art["file"], "onnx", input_names=[t["name"] for t in art["inputs"]],
                        output_names=[t["name"] for t in art["outputs"]])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("accuracy-bundles")
    bundles = []
    for version, epochs, seed in ((1, 2, 0), (2, 1, 7)):
        paths = train_digits(tmp / f"digits-{version}", epochs=epochs, seed=seed)
        opts = BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                            out_dir=tmp / f"out-{version}", name="digits", version=version, formats=("onnx",),
                            latency_runs=20)
        bundles.append(build(opts, Progress(0, enabled=False)).bundle)
    with np.load(paths["eval"], allow_pickle=False) as z:  # seed 7's split: inputs the v1 model never trained on
        x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
    return Built(bundles[0], bundles[1], x, y, tmp)


class Telemetry:
    """Every telemetry message of one device, in arrival order."""

    def __init__(self, dev: Device) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._sub = dev.mqtt.subscribe_stream([dev.topics.device(dev.id, "telemetry")])
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for msg in self._sub:
            with self._lock:
                self.messages.append(json.loads(msg.payload))

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return self.messages[-1] if self.messages else None

    def wait(self, dev: Device, pred: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The first message from now on (built after this call) that satisfies `pred`."""
        with self._lock:
            start = len(self.messages)
        box: list[dict[str, Any]] = []

        def found() -> bool:
            with self._lock:
                hits = [m for m in self.messages[start:] if pred(m)]
            box.extend(hits[:1])
            return bool(hits)

        dev.wait(found, f"telemetry with {what}", TIMEOUT)
        return box[0]

    def settled(self, dev: Device) -> dict[str, Any]:
        """A message built after everything sent so far was taken into account (two intervals on)."""
        first = self.wait(dev, lambda m: True, "any message")
        return self.wait(dev, lambda m: m["seq"] > first["seq"], "a later message")


@dataclass
class Agent:
    dev: Device
    telemetry: Telemetry
    serving: ModelSession
    shadow: ModelSession


@pytest.fixture(scope="module")
def agent(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory, built: Built) -> Iterator[Agent]:
    dev = Device(tmp_path_factory.mktemp("accuracy-device"), mosquitto)
    with dev.config.open("a") as f:
        f.write(f"[telemetry]\ninterval_s = 0.5\nshadow_sample = 1.0\nshadow_cpu_budget = 1.0\n"
                f"drift_window = {DRIFT_WINDOW}\ndrift_min_samples = {DRIFT_MIN}\nparity_interval_s = 3600\n")
    telemetry = Telemetry(dev)
    r = subprocess.run([str(BIN / "packager"), "publish", str(built.serving), "--shadow", str(built.shadow),
                        "--repo", str(dev.repo), "--broker", mosquitto.url, "--fleet", dev.fleet, "--group", GROUP],
                       cwd=dev.tmp, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert r.returncode == 0, r.stderr
    dev.start()
    try:
        dev.commit_with_requests(built.x, 1, first=True)
        telemetry.wait(dev, lambda m: m.get("shadow_version") == 2 and m["version"] == 1, "the shadow running")
        yield Agent(dev, telemetry, _session(built.serving, built.tmp / "v1"), _session(built.shadow, built.tmp / "v2"))
    finally:
        dev.close()


def _infer(dev: Device, x: np.ndarray, request_id: str | None = None) -> dict[str, Any]:
    conn = dev.http()
    try:
        conn.request("POST", "/v2/models/digits/infer", body=infer_body(x, request_id),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        doc: dict[str, Any] = json.loads(response.read())
        assert response.status == 200, doc
        return doc
    finally:
        conn.close()


def _post_feedback(dev: Device, request_id: str, label: int) -> tuple[int, dict[str, Any]]:
    conn = dev.http()
    try:
        conn.request("POST", "/v2/models/digits/feedback", body=json.dumps({"id": request_id, "label": label}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _mqtt_feedback(dev: Device, labels: dict[str, int]) -> list[dict[str, Any]]:
    """Labels on devices/<id>/feedback, each asking for an answer on a response topic; the answers, in order."""
    reply = dev.topics.device(dev.id, f"infer/response/{uuid.uuid4().hex}")
    sent = {uuid.uuid4().bytes: rid for rid in labels}
    answers: dict[bytes, dict[str, Any]] = {}
    with dev.mqtt.subscribe_stream([reply]) as replies:
        for corr, rid in sent.items():
            dev.mqtt.publish(dev.topics.device(dev.id, "feedback"), json.dumps({"id": rid, "label": labels[rid]})
                             .encode(), retain=False, response_topic=reply, correlation_data=corr)
        while len(answers) < len(sent):
            msg = replies.get(timeout=10)
            assert msg is not None, f"only {len(answers)} of {len(sent)} MQTT feedback answers arrived"
            answers[msg.correlation_data] = json.loads(msg.payload)
    return [answers[corr] for corr in sent]


def test_feedback_accuracy_equals_the_offline_accuracy(agent: Agent, built: Built) -> None:
    dev, telemetry = agent.dev, agent.telemetry
    before = telemetry.settled(dev)
    n = 60
    rng = np.random.default_rng(1)
    rows = rng.choice(len(built.x), n, replace=False)
    predicted: dict[str, int] = {}
    for i, row in enumerate(rows):
        rid = f"fb-{uuid.uuid4().hex[:8]}-{i}"
        doc = _infer(dev, built.x[row][None], rid)
        assert doc["id"] == rid
        predicted[rid] = int(output_array(doc).argmax(1)[0])
    # the true labels, and a third of them deliberately wrong (the next class): accuracy well away from 1
    labels = {rid: int(built.y[row]) if i % 3 else (int(built.y[row]) + 1) % 10
              for i, (rid, row) in enumerate(zip(predicted, rows, strict=True))}
    ids = list(predicted)
    over_http, over_mqtt = ids[: n // 2], ids[n // 2:]
    for rid in over_http:
        assert _post_feedback(dev, rid, labels[rid]) == (200, {"id": rid, "result": "accepted"})
    answers = _mqtt_feedback(dev, {rid: labels[rid] for rid in over_mqtt})
    assert [a.get("result") for a in answers] == ["accepted"] * len(over_mqtt), answers
    # an id the agent never gave is counted, not an error, and changes no accuracy figure
    assert _post_feedback(dev, "never-answered", 3)[1]["result"] == "unknown"

    base_total, base_accuracy = before["feedback_total"], before["accuracy"] or 0.0
    after = telemetry.wait(dev, lambda m: m["feedback_total"] == base_total + n
                           and m["feedback_unknown_total"] == before["feedback_unknown_total"] + 1,
                           f"{n} more labels and one unknown id")
    correct = sum(predicted[rid] == labels[rid] for rid in ids)
    assert 0 < correct < n
    offline_correct = round(base_accuracy * base_total) + correct
    assert after["accuracy"] == pytest.approx(offline_correct / (base_total + n), abs=1e-12)
    assert after["accuracy_low"] < after["accuracy"] < after["accuracy_high"]


def test_shadow_agreement_equals_the_offline_agreement(agent: Agent, built: Built) -> None:
    dev, telemetry = agent.dev, agent.telemetry
    before = telemetry.settled(dev)
    assert before["shadow_agreement_kind"] == "top1" and before["shadow_cpu_budget"] == 1.0
    x = built.x[:200]

    def handled(m: dict[str, Any]) -> int:  # requests the shadow compared, skipped or failed on
        return int(m["shadow_samples"] + m["shadow_skipped_total"] + m["shadow_errors_total"])

    # batches of 20 rows, each sent once the shadow has handled the previous one: a busy shadow skips requests
    # (by design), and this test is about the figures of the ones it compares, not about the machine's load
    after = before
    for i in range(0, len(x), 20):
        _infer(dev, x[i:i + 20])
        done = handled(after) + 1
        after = telemetry.wait(dev, lambda m, done=done: handled(m) >= done, f"the shadow handling rows {i}..")
    assert after["shadow_skipped_total"] == before["shadow_skipped_total"], "the shadow skipped requests"
    assert after["shadow_errors_total"] == 0
    assert after["shadow_rows"] - before["shadow_rows"] == len(x)
    served = agent.serving.run({"x": x})[0].argmax(1)
    shadowed = agent.shadow.run({"x": x})[0].argmax(1)
    agreeing = int(np.sum(served == shadowed))
    assert agreeing < len(x), "the shadow model should disagree somewhere: it is another model"
    base_rows = before["shadow_rows"]
    base_agreeing = round((before["shadow_agreement"] or 0.0) * base_rows)
    assert after["shadow_agreement"] == pytest.approx((base_agreeing + agreeing) / (base_rows + len(x)), abs=1e-12)
    assert after["shadow_latency_ms_p50"] is not None and after["shadow_cpu_seconds_total"] > 0


def test_drift_stays_ok_in_distribution_and_alarms_on_shifted_inputs(agent: Agent, built: Built) -> None:
    dev, telemetry = agent.dev, agent.telemetry
    x = built.x
    assert len(x) >= DRIFT_WINDOW
    for i in range(0, DRIFT_WINDOW + 40, 10):  # more than a window of the evaluation inputs themselves
        _infer(dev, x[i % len(x):i % len(x) + 10])
    calm = telemetry.settled(dev)
    assert calm["drift_samples"] == DRIFT_WINDOW and sum(calm["drift_bin_counts"]) == DRIFT_WINDOW
    assert calm["drift_status"] == "ok" and calm["drift_psi"] < 0.1, calm

    rng = np.random.default_rng(2)
    noise = rng.uniform(float(x.min()), float(x.max()), size=(DRIFT_WINDOW, *x.shape[1:])).astype(np.float32)
    for i in range(0, len(noise), 10):
        _infer(dev, noise[i:i + 10])
    shifted = telemetry.settled(dev)
    assert shifted["drift_status"] == "alarm" and shifted["drift_psi"] >= 0.25, shifted


def test_fleet_status_lists_the_device_with_its_figures(agent: Agent, mosquitto: Mosquitto) -> None:
    dev = agent.dev
    _infer(dev, np.zeros((1, 1, 8, 8), np.float32))
    latest = agent.telemetry.settled(dev)
    r = subprocess.run([str(BIN / "packager"), "fleet", "status", "--broker", mosquitto.url, "--fleet", dev.fleet,
                        "--json", "--wait", "10"], cwd=dev.tmp, env=_env(), capture_output=True, text=True,
                       timeout=TIMEOUT, check=False)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["devices"]
    assert [row["device_id"] for row in rows] == [dev.id]
    row = rows[0]
    assert row["online"] is True and row["group"] == GROUP
    assert (row["name"], row["version"], row["state"]) == ("digits", 1, "idle")
    assert row["rss_bytes"] > 0 and row["cpu_percent"] is not None and row["error_rate"] == 0.0
    assert row["accuracy"] is not None and row["latency_ms_p95"] is not None and row["drift_psi"] is not None
    assert row["seq_gaps"] == 0
    # figures that only grow or stay: the row is the device's latest telemetry, not an older one
    assert row["accuracy"] == latest["accuracy"]
