"""The deployment's `Link` (agent/deploy/driver.py) for the daemon: events through the telemetry queue, the retained
state straight to the broker.

- `event(payload)`: queued by the `Publisher` (its own per-device seq, kept on disk through outages and restarts,
  sent in order once connected);
- `state(payload)`: the retained `devices/<id>/state`, a latest value rather than a log: published directly when
  connected, and set as the client's birth message so every reconnect republishes the newest one. A state published
  before the first connection is kept (only the newest) and sent once the client is attached. Every
  `republish_s` the newest state goes out again unchanged: a broker that gives retained messages to exact
  subscriptions only (RabbitMQ 3.10) never shows it to a `devices/+/state` watcher that subscribed after it was
  sent, but a live message reaches every matching subscription (docs/scaling.md).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from agent.errors import EdgeshipError
from agent.telemetry.publisher import Publisher

if TYPE_CHECKING:
    from agent.transport.mqtt import MqttClient

log = logging.getLogger(__name__)


class MqttLink:
    def __init__(self, device_id: str, publisher: Publisher, republish_s: float = 0.0) -> None:
        self.device_id = device_id
        self.publisher = publisher
        self.republish_s = republish_s
        self.client: MqttClient | None = None
        self._pending: dict[str, Any] | None = None  # the newest state from before the first connection
        self._last: dict[str, Any] | None = None  # the newest state sent (or due on the next connection)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # a republish never lands after a newer state

    def attach(self, client: MqttClient) -> None:
        with self._lock:
            self.client = client
            pending, self._pending = self._pending, None
        if pending is not None:
            self._publish_state(client, pending)
        self.publisher.attach(client)
        if self.republish_s > 0:
            threading.Thread(target=self._republish_loop, args=(client,), name="state-republish", daemon=True).start()

    def _republish_loop(self, client: MqttClient) -> None:
        while not self.publisher.wait_stopped(self.republish_s):
            self._publish_state(client, None)

    def event(self, payload: dict[str, Any]) -> None:
        self.publisher.event(payload)

    def state(self, payload: dict[str, Any], *, online: bool) -> None:
        from agent.transport.mqtt import Will

        with self._lock:
            client = self.client
            if client is None:  # start() announces before connecting: send the newest once attached
                self._pending = payload
                return
        if online:
            client.birth = Will(client.topics.device(self.device_id, "state"), json.dumps(payload).encode(),
                                retain=True, qos=1)
        self._publish_state(client, payload)

    def _publish_state(self, client: MqttClient, payload: dict[str, Any] | None) -> None:
        """Publish `payload`, or (None) the newest state again."""
        with self._send_lock:
            if payload is None:
                payload = self._last
                if payload is None:
                    return
            self._last = payload
            if not client.is_connected:
                return  # the birth message carries it after the reconnect
            try:
                client.publish(client.topics.device(self.device_id, "state"), json.dumps(payload).encode(),
                               retain=True, qos=1, wait=False)
            except EdgeshipError as e:
                log.warning("could not publish the state: %s", e)
