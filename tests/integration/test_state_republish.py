"""The agent's retained state reaches a `devices/+/state` watcher on every broker kind, also one that subscribed
after the state was sent: RabbitMQ 3.10 gives retained messages to exact subscriptions only, so there the periodic
republish (`[telemetry] state_interval_s`) is what shows the device; a republish never overtakes a newer state, and
it ends when the publisher stops. A real broker of each kind (tests/conftest.py `broker`), a real MqttClient."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.telemetry.link import MqttLink
from agent.telemetry.publisher import Publisher
from agent.telemetry.queue import DiskQueue
from agent.transport.mqtt import Message, MqttClient, Subscription
from examples.brokers import Broker

REPUBLISH_S = 0.3


def _states(sub: Subscription, seconds: float) -> list[Message]:
    got: list[Message] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        msg = sub.get(timeout=left)
        if msg is not None:
            got.append(msg)
    return got


def test_a_late_wildcard_watcher_sees_the_state_and_republishing_keeps_the_newest(
        broker: Broker, fleet_name: str, tmp_path: Path) -> None:
    prefix = f"edgeship/{fleet_name}/"
    queue = DiskQueue(tmp_path / "t.db", max_messages=1000, max_bytes=1 << 20)
    publisher = Publisher(queue, "dev1", build=lambda now: {}, interval_s=3600.0)
    link = MqttLink("dev1", publisher, republish_s=REPUBLISH_S)
    device = MqttClient(broker.url, "dev1", prefix=prefix).connect()
    watcher = MqttClient(broker.url, "watcher", prefix=prefix).connect()
    try:
        link.attach(device)
        link.state({"device": "dev1", "state": "idle", "n": 1}, online=True)
        time.sleep(0.5)  # the state is on the broker before the watcher subscribes
        sub = watcher.subscribe_stream([f"{prefix}devices/+/state"])
        first = _states(sub, 3.0)
        assert first, f"no state reached a late devices/+/state watcher on {broker.url}"
        assert {json.loads(m.payload)["n"] for m in first} == {1}
        assert any(not m.retain for m in first), "the state was never republished"

        link.state({"device": "dev1", "state": "serving", "n": 2}, online=True)
        later = _states(sub, 2.0)
        assert later and json.loads(later[-1].payload)["n"] == 2  # a republish never lands after a newer state
        assert {json.loads(m.payload)["n"] for m in later} == {2}

        publisher.stop(flush_s=0.1)
        time.sleep(REPUBLISH_S * 2)
        _states(sub, 0.1)  # whatever was in flight when it stopped
        assert _states(sub, REPUBLISH_S * 4) == []  # republishing ended with the publisher
    finally:
        watcher.close()
        device.close()
        queue.close()
