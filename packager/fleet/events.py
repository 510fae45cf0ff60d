"""`packager fleet events`: the devices' transition events, de-duplicated, one per line.

Events are not retained: without `--follow` this prints what arrives within `--wait` seconds (an agent flushing its
store-and-forward queue after an outage, say), with it until Ctrl-C. QoS 1 redelivery and the agent's re-sends
after a lost PUBACK repeat messages; each event is printed once (`view.event_key`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from agent.transport.mqtt import MqttClient
from packager.fleet.view import FleetView

log = logging.getLogger(__name__)


def run(client: MqttClient, prefix: str, *, device: str | None, follow: bool, wait: float, as_json: bool,
        out: TextIO | None = None, registry: Mapping[str, str] | None = None) -> int:
    out = out or sys.stdout
    view = FleetView(prefix, registry)
    deadline = None if follow else time.monotonic() + wait
    try:
        with client.subscribe_stream(view.filters(("events",), device or "+")) as sub:
            log.info("subscribed to %s", " ".join(sub.filters))
            while not sub.closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                msg = sub.get(timeout=0.5 if remaining is None else min(remaining, 0.5))
                if msg is None:
                    continue
                event = view.feed(msg.topic, msg.payload)
                if event is not None:
                    line = json.dumps({**event.body, "device_id": event.device_id}) if as_json else event.line()
                    print(line, file=out, flush=True)
    except KeyboardInterrupt:
        if not follow:
            raise
    skipped = sum(view.skipped.values())
    if skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(view.skipped.items()))
        print(f"packager: skipped {skipped} malformed message(s): {reasons}", file=sys.stderr)
    if view.events.duplicates:
        log.info("%d duplicate event message(s) dropped", view.events.duplicates)
    return 0
