"""Telemetry and events through the disk queue to the broker: store, then forward.

Two threads:
- `telemetry`: every `interval_s` builds one message (envelope, resources, the hub's figures, the queue's own
  counters) and puts it on the queue (docs/telemetry.md: every field);
- `telemetry-flush`: whenever the client is connected, sends the queue in order, a batch at a time, each with QoS 1
  (`devices/<id>/telemetry` or `.../events`, never retained), waits for the PUBACKs and only then removes the
  acknowledged prefix. A connection lost mid-batch leaves the rest queued: it is sent again after the reconnect, so
  delivery is at least once and a consumer de-duplicates by (device, seq) per topic.

Events (the deployment's transitions, from the daemon's Link) go through the same queue with their own sequence:
they survive outages and restarts. The retained `state` is not queued: it is a latest value, published directly.
This module imports no transport: the client is any object with `publish`/`is_connected`/`topics` (MqttClient).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.errors import TransportError
from agent.telemetry.queue import EVENT, TELEMETRY, DiskQueue

log = logging.getLogger(__name__)

SCHEMA = 1
# Messages published (wait=False) before their PUBACKs are awaited; paho keeps max_inflight of them on the wire and
# sends the rest as PUBACKs come back. Each batch ends in a pause (the last PUBACKs, then a removal and a peek), so
# larger batches flush faster: 256 measured ~4,800/s, 1,000 ~6,000/s on the loaded 2-core benchmark VM.
FLUSH_BATCH = 1000
PUBACK_TIMEOUT_S = 10.0
PUBACK_SLICE_S = 0.2  # PUBACKs are awaited in slices, so a lost connection or a stop ends the wait at once
IDLE_POLL_S = 0.5  # how often the flusher looks at the connection when nothing woke it


class _Handle(Protocol):
    @property
    def done(self) -> bool: ...

    def wait(self, timeout: float = ...) -> None: ...


class _Topics(Protocol):
    def device(self, device_id: str, leaf: str) -> str: ...


class Client(Protocol):
    """What the publisher needs of agent.transport.mqtt.MqttClient."""

    topics: Any

    @property
    def is_connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, retain: bool = ..., qos: int = ..., wait: bool = ...,
                timeout: float = ...) -> Any: ...


class Publisher:
    def __init__(self, queue: DiskQueue, device_id: str, *, build: Callable[[float], dict[str, Any]],
                 interval_s: float, clock: Callable[[], float] = time.time) -> None:
        """`build(now)`: the message's body without the envelope (name, version, figures, resources)."""
        self.queue = queue
        self.device_id = device_id
        self.build = build
        self.interval_s = interval_s
        self.clock = clock
        self.client: Client | None = None
        self.sent_total = 0  # messages acknowledged by the broker since start
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._flush_lock = threading.Lock()
        # the device's rollout membership as the latest deployment event told it (agent/deploy/rollout.py)
        self.rollout: dict[str, Any] = {"rollout_id": None, "rollout_wave": None}

    # --- inputs --------------------------------------------------------------------------------------------

    def telemetry_now(self) -> int | None:
        """Build and queue one telemetry message; its seq, or None when the queue refused it."""
        now = self.clock()
        body = self.build(now)
        payload: dict[str, Any] = {"schema": SCHEMA, "device": self.device_id, "name": body.pop("name", None),
                                   "version": body.pop("version", None), "ts": now, **self.rollout, **body,
                                   "telemetry_dropped_total": self.queue.telemetry_dropped_total,
                                   "events_dropped_total": self.queue.events_dropped_total,
                                   "queue_messages": len(self.queue), "queue_bytes": self.queue.bytes}
        seq = self._put(TELEMETRY, "telemetry", payload)
        self._wake.set()
        return seq

    def event(self, payload: dict[str, Any]) -> int | None:
        """Queue one deployment event (agent/deploy/driver.py's event_payload) with the envelope added."""
        bundle = payload.get("bundle") or {}
        if "rollout_id" in payload:
            self.rollout = {"rollout_id": payload.get("rollout_id"), "rollout_wave": payload.get("rollout_wave")}
        envelope = {"schema": SCHEMA, "device": self.device_id, "name": bundle.get("name"),
                    "version": bundle.get("version"), "ts": self.clock()}
        seq = self._put(EVENT, "events", {**envelope, **payload})
        self._wake.set()
        return seq

    def _put(self, kind: int, leaf: str, payload: dict[str, Any]) -> int | None:
        try:
            return self.queue.put(kind, leaf, payload)
        except OSError as e:  # a full disk must not stop serving or deploying
            log.warning("could not queue %s: %s", leaf, e)
            return None

    # --- the broker ----------------------------------------------------------------------------------------

    def attach(self, client: Client) -> None:
        self.client = client
        self._wake.set()

    def flush(self, deadline: float | None = None) -> int:
        """Send what is queued, in order, while connected (until `deadline`, monotonic); how many were
        acknowledged. Stops at the first failure: the rest stays queued."""
        client = self.client
        sent = 0
        with self._flush_lock:
            while client is not None and client.is_connected:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                batch = self.queue.peek(FLUSH_BATCH)
                if not batch:
                    break
                acked = self._send(client, batch, deadline)
                if acked:
                    self.queue.remove_through(batch[acked - 1].id)
                    sent += acked
                    self.sent_total += acked
                if acked < len(batch):
                    break
        return sent

    def _send(self, client: Client, batch: list[Any], deadline: float | None = None) -> int:
        """Publish `batch` in order, then wait for each PUBACK in order; the length of the acknowledged prefix.
        The wait ends early (the rest stays queued, to be sent again) when the connection drops, at `deadline`, or
        when a stop is asked for while the background flusher waits: paho would not wake a wait on a dead
        connection, and a stop must not outlast systemd's TimeoutStopSec (a SIGKILL there counts as a crash)."""
        handles: list[Any] = []
        topics: dict[str, str] = {}  # per leaf: two topics for a whole batch
        try:
            for item in batch:
                topic = topics.get(item.leaf)
                if topic is None:
                    topic = topics[item.leaf] = client.topics.device(self.device_id, item.leaf)
                handles.append(client.publish(topic, item.payload, retain=False, qos=1, wait=False))
        except TransportError as e:
            log.debug("telemetry flush stopped publishing: %s", e)
        acked = 0
        for handle in handles:
            if not self._await(client, handle, deadline):
                break
            acked += 1
        return acked

    def _await(self, client: Client, handle: _Handle, deadline: float | None) -> bool:
        give_up = time.monotonic() + PUBACK_TIMEOUT_S
        if deadline is not None:
            give_up = min(give_up, deadline)
        while True:
            try:
                handle.wait(PUBACK_SLICE_S)
                return True
            except TransportError as e:
                if (handle.done  # answered, but refused by the broker: stays queued, as any failure
                        or time.monotonic() >= give_up or not client.is_connected
                        or (deadline is None and self._stopping.is_set())):
                    log.debug("telemetry flush stopped waiting: %s", e)
                    return False

    # --- threads -------------------------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._tick_loop, "telemetry"), (self._flush_loop, "telemetry-flush")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait_stopped(self, timeout: float) -> bool:
        """Wait up to `timeout` s; True once `stop()` was called."""
        return self._stopping.wait(timeout)

    def stop(self, flush_s: float = 2.0) -> None:
        """Stop both threads; send what the broker takes within `flush_s` (the rest stays on disk)."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=1.0 + PUBACK_SLICE_S)  # both notice the stop within a slice
        try:
            self.flush(deadline=time.monotonic() + flush_s)
        except OSError as e:
            log.warning("telemetry flush at stop: %s", e)

    def _tick_loop(self) -> None:
        next_at = time.monotonic()
        while not self._stopping.is_set():
            try:
                self.telemetry_now()
            except Exception:  # a figure that fails must not end telemetry for good
                log.exception("could not build the telemetry message")
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:  # a late tick (a suspended process): do not burst to catch up
                next_at = now + self.interval_s
            self._stopping.wait(next_at - now)

    def _flush_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(IDLE_POLL_S)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.flush()
            except OSError as e:
                log.warning("telemetry flush: %s", e)
                self._stopping.wait(IDLE_POLL_S)
