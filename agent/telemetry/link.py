"""The deployment's `Link` (agent/deploy/driver.py) for the daemon: events through the telemetry queue, the retained
state straight to the broker.

- `event(payload)`: queued by the `Publisher` (its own per-device seq, kept on disk through outages and restarts,
  sent in order once connected);
- `state(payload)`: the retained `devices/<id>/state`, a latest value rather than a log: published directly when
  connected, and set as the client's birth message so every reconnect republishes the newest one. A state published
  before the first connection is kept (only the newest) and sent once the client is attached.
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
    def __init__(self, device_id: str, publisher: Publisher) -> None:
        self.device_id = device_id
        self.publisher = publisher
        self.client: MqttClient | None = None
        self._pending: dict[str, Any] | None = None  # the newest state from before the first connection
        self._lock = threading.Lock()

    def attach(self, client: MqttClient) -> None:
        with self._lock:
            self.client = client
            pending, self._pending = self._pending, None
        if pending is not None:
            self._publish_state(client, pending)
        self.publisher.attach(client)

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

    def _publish_state(self, client: MqttClient, payload: dict[str, Any]) -> None:
        if not client.is_connected:
            return  # the birth message carries it after the reconnect
        try:
            client.publish(client.topics.device(self.device_id, "state"), json.dumps(payload).encode(), retain=True,
                           qos=1, wait=False)
        except EdgeshipError as e:
            log.warning("could not publish the state: %s", e)
