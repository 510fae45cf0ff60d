"""The telemetry hub (agent/telemetry/hub.py) fed fake requests through the serving observer, and the publisher
(agent/telemetry/publisher.py) flushing a real disk queue through a fake client: order, the acknowledged prefix
only, nothing lost when the connection drops mid-batch."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import TensorSpec
from agent.config import TelemetrySection
from agent.errors import ConnectionLost, TransportError
from agent.serve.holder import LoadedModel, RequestStats
from agent.telemetry import publisher as publisher_module
from agent.telemetry.hub import Telemetry
from agent.telemetry.publisher import Publisher
from agent.telemetry.queue import DiskQueue
from agent.telemetry.resources import Resources, read_temp_celsius, read_throttled, soc_zones


class FakeSession:
    format = "onnx"
    inputs = (TensorSpec("x", (-1, 4), "float32"),)
    outputs = (TensorSpec("y", (-1, 3), "float32"),)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.zeros((len(feeds["x"]), 3), dtype=np.float32)]


def _model(version: int) -> LoadedModel:
    return LoadedModel("m", version, "onnx", FakeSession())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _reference(release: Path) -> None:
    """A drift section: confidences of a 3-class softmax mostly above 0.5."""
    release.mkdir(parents=True)
    section = {"schema": 1, "statistic": "top1_confidence", "edges": [0.5, 0.7, 0.9], "counts": [10, 30, 30, 30]}
    (release / "reference.json").write_text(json.dumps({"drift": section}))


@pytest.fixture
def hub(tmp_path: Path) -> tuple[Telemetry, dict[str, Any], Clock]:
    serving: dict[str, Any] = {"model": None}
    clock = Clock()
    releases = {1: tmp_path / "r1", 2: tmp_path / "r2"}
    _reference(releases[1])
    _reference(releases[2])
    cfg = TelemetrySection(drift_min_samples=10, drift_window=100, parity_interval_s=3600.0)
    t = Telemetry(cfg, tmp_path, serving=lambda: serving["model"],
                  release_of=lambda m: releases.get(m.version), clock=clock)
    return t, serving, clock


def test_figures_from_requests_through_the_observer(hub: tuple[Telemetry, dict[str, Any], Clock]) -> None:
    t, serving, clock = hub
    m1 = _model(1)
    serving["model"] = m1
    stats = RequestStats(observers=[t])
    confident = np.array([[0.0, 0.0, 9.0]], dtype=np.float32)  # top-1 confidence ~1.0: the last bin
    for i in range(20):
        stats.record_answer(f"r{i}", m1, {"x": np.zeros((1, 4), np.float32)}, {"y": confident}, ms=3.0)
    stats.record_error(model=m1, ms=1.0)
    stats.record_rejected(model=m1, ms=None)
    first = t.figures(clock())
    assert (first["name"], first["version"]) == ("m", 1)
    assert (first["requests_total"], first["errors_total"], first["rejected_total"]) == (22, 1, 1)
    assert first["error_rate"] == pytest.approx(1 / 21)
    assert sum(first["latency_ms_buckets"]) == 20 and 2.0 < first["latency_ms_p95"] <= 5.0
    assert first["drift_samples"] == 20 and first["drift_bin_counts"] == [0, 0, 0, 20]
    assert first["drift_status"] == "alarm"  # every live row in a bin holding 30% of the reference
    # labelled feedback: the prediction is class 2
    assert t.feedback("m", "r0", 2) == "accepted"
    assert t.feedback("m", "r1", 0) == "accepted"
    assert t.feedback("m", "r0", 2) == "duplicate"
    assert t.feedback("m", "nope", 1) == "unknown"
    with pytest.raises(ValueError):
        t.feedback("m", "r2", "cat")
    f = t.figures(clock())
    assert (f["accuracy"], f["feedback_total"], f["feedback_unknown_total"]) == (0.5, 2, 1)


def test_a_new_serving_bundle_gets_its_own_figures_and_drift(hub: tuple[Telemetry, dict[str, Any], Clock]) -> None:
    t, serving, clock = hub
    m1, m2 = _model(1), _model(2)
    serving["model"] = m1
    out = {"y": np.array([[0.0, 0.0, 9.0]], dtype=np.float32)}
    for i in range(15):
        t.answered(f"a{i}", m1, {}, out, 2.0)
    serving["model"] = m2
    t.answered("b0", m2, {}, out, 2.0)
    f = t.figures(clock())
    assert (f["version"], f["requests_total"], f["drift_samples"]) == (2, 1, 1)
    assert f["drift_status"] == "unknown"  # below min_samples: no verdict
    serving["model"] = None
    f = t.figures(clock())
    assert f["name"] is None and f["drift_status"] == "unknown" and f["parity_ok"] is None


def test_metrics_text_is_prometheus_with_a_latency_histogram(hub: tuple[Telemetry, dict[str, Any], Clock]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    t, serving, clock = hub
    m1 = _model(1)
    serving["model"] = m1
    for ms in (0.4, 3.0, 7.0):
        t.answered("x", m1, {}, {"y": np.zeros((1, 3), np.float32)}, ms)
    t.failed(m1, "error", 1.0)
    t.message_body(clock())  # a resources sample for /metrics
    families = {f.name: f for f in text_string_to_metric_families(t.metrics_text().decode())}
    latency = families["edgeship_inference_latency_seconds"]
    buckets = {s.labels["le"]: s.value for s in latency.samples if s.name.endswith("_bucket")}
    assert buckets["0.0005"] == 1 and buckets["0.005"] == 2 and buckets["0.01"] == 3 and buckets["+Inf"] == 3
    requests = families["edgeship_inference_requests"].samples[0]
    assert requests.value == 4 and requests.labels == {"name": "m", "version": "1"}
    assert families["edgeship_rss_bytes"].samples[0].value > 0
    assert "edgeship_drift_status" in families
    # a scrape does not move the publisher's throughput window: 1 request over the 20 s since the last message
    t.answered("y", m1, {}, {"y": np.zeros((1, 3), np.float32)}, 1.0)
    clock.now += 10
    t.metrics_text()
    clock.now += 10
    assert t.figures(clock())["throughput_rps"] == pytest.approx(1 / 20)


def test_resources_from_fake_sysfs(tmp_path: Path) -> None:
    thermal = tmp_path / "thermal"
    for i, (kind, milli) in enumerate([("cpu-thermal", "51234"), ("PMIC-Die", "100000"), ("GPU-therm", "47000")]):
        zone = thermal / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    zones = soc_zones(thermal)
    assert read_temp_celsius(zones) == pytest.approx(51.234)  # the hottest SoC zone; the PMIC's 100 C left out
    (tmp_path / "throttled").write_text("0x50005\n")
    assert read_throttled(tmp_path / "throttled") == 0x50005
    sample = Resources(tmp_path, thermal_root=tmp_path / "none", throttled_path=tmp_path / "absent").sample()
    assert sample["temp_celsius"] is None and sample["throttled_flags"] is None  # absent is null, never 0
    assert sample["rss_bytes"] > 0 and sample["disk_free_bytes"] > 0 and sample["mem_available_bytes"] > 0
    pi = Resources(tmp_path, thermal_root=thermal, throttled_path=tmp_path / "throttled").sample()
    assert (pi["under_voltage_now"], pi["throttled_now"], pi["temp_celsius"]) == (True, True, 51.234)


# --- the publisher over a real queue --------------------------------------------------------------------------


class FakeTopics:
    def device(self, device_id: str, leaf: str) -> str:
        return f"p/devices/{device_id}/{leaf}"


class FakeHandle:
    def __init__(self, client: FakeClient, topic: str, payload: bytes, fail: bool) -> None:
        self.client, self.topic, self.payload, self.fail = client, topic, payload, fail

    @property
    def done(self) -> bool:
        return not self.fail

    def wait(self, timeout: float = 30.0) -> None:
        if self.fail:
            raise ConnectionLost("lost")
        self.client.acked.append((self.topic, json.loads(self.payload)))



class FakeClient:
    """Acknowledges publishes until `fail_after` were sent; then the connection 'drops'."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.topics = FakeTopics()
        self.fail_after = fail_after
        self.sent = 0
        self.acked: list[tuple[str, dict[str, Any]]] = []
        self.is_connected = True

    def publish(self, topic: str, payload: bytes, retain: bool = True, qos: int = 1, wait: bool = True,
                timeout: float = 30.0) -> FakeHandle:
        assert (retain, qos, wait) == (False, 1, False)
        if not self.is_connected:
            raise TransportError("not connected")
        self.sent += 1
        fail = self.fail_after is not None and self.sent > self.fail_after
        if fail:
            self.is_connected = False
        return FakeHandle(self, topic, payload, fail)


def test_flush_in_order_removing_only_what_was_acknowledged(tmp_path: Path) -> None:
    q = DiskQueue(tmp_path / "t.db", max_messages=10_000, max_bytes=10_000_000)
    clock = Clock()
    pub = Publisher(q, "d1", build=lambda now: {"name": "m", "version": 1, "x": now}, interval_s=1.0, clock=clock)
    for i in range(300):
        clock.now = 2000.0 + i
        if i % 50 == 0:
            pub.event({"device": "d1", "from": "idle", "to": "check", "bundle": {"name": "m", "version": 1}})
        pub.telemetry_now()
    assert pub.flush() == 0  # no client yet: everything stays
    flaky = FakeClient(fail_after=100)
    pub.attach(flaky)
    assert pub.flush() == 100
    assert len(q) == 306 - 100
    pub.attach(FakeClient())  # the reconnect
    good = pub.client
    assert isinstance(good, FakeClient)
    assert pub.flush() == 206 and len(q) == 0
    delivered = flaky.acked + good.acked
    telemetry = [d for topic, d in delivered if topic.endswith("/telemetry")]
    events = [d for topic, d in delivered if topic.endswith("/events")]
    assert [d["seq"] for d in telemetry] == list(range(1, 301))
    assert [d["seq"] for d in events] == list(range(1, 7))
    assert all(d["schema"] == 1 and d["device"] == "d1" and d["name"] == "m" for _, d in delivered)
    assert telemetry[0]["x"] == 2000.0 and telemetry[0]["ts"] == 2000.0
    assert telemetry[-1]["queue_messages"] == 305  # the queue's own figures travel with each message


class SilentHandle:
    """A publish whose PUBACK never comes (the broker went away without the client noticing yet)."""

    done = False

    def wait(self, timeout: float = 30.0) -> None:
        time.sleep(min(timeout, 20.0))  # as paho's wait_for_publish: the whole timeout (capped for the test)
        raise TransportError(f"no PUBACK within {timeout:g}s")


class SilentClient(FakeClient):
    def publish(self, topic: str, payload: bytes, retain: bool = True, qos: int = 1, wait: bool = True,
                timeout: float = 30.0) -> SilentHandle:  # type: ignore[override]
        self.sent += 1
        return SilentHandle()


def test_stop_does_not_wait_out_missing_pubacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop while the flusher waits for PUBACKs that never come returns at once (systemd's TimeoutStopSec would
    SIGKILL an agent that waited them out, and a SIGKILL counts as a crash); the messages stay queued."""
    monkeypatch.setattr(publisher_module, "PUBACK_TIMEOUT_S", 3600.0)
    q = DiskQueue(tmp_path / "t.db", max_messages=10_000, max_bytes=10_000_000)
    pub = Publisher(q, "d1", build=lambda now: {"name": "m", "version": 1}, interval_s=3600.0)
    for _ in range(5):
        pub.telemetry_now()
    client = SilentClient()
    pub.attach(client)
    pub.start()
    deadline = time.monotonic() + 30
    while client.sent < 5 and time.monotonic() < deadline:  # the flusher is now waiting for PUBACKs
        time.sleep(0.01)
    assert client.sent >= 5
    started = time.monotonic()
    pub.stop(flush_s=0.5)
    assert time.monotonic() - started < 10  # returns, rather than waiting out a 20 s PUBACK wait
    assert len(q) >= 5  # nothing unacknowledged was removed
