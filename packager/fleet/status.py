"""`packager fleet status`: listen to the fleet for a short window, then print one row per device.

The retained `state` of every device arrives at once; telemetry is periodic, so the window is about two telemetry
intervals (`--wait`, default 20 s for the agent's default 10 s). It ends early once every online device has sent
two telemetry messages (enough to tell missing sequence numbers), or after a second when no device is online.

RabbitMQ 3.10 hands retained messages to exact subscriptions only, never through the `devices/+/state` wildcard: a
device seen by its telemetry whose state has not arrived is then read on its exact state topic (docs/transport.md,
"Wildcards and retained state").
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from rich.console import Console

from agent.transport.mqtt import MqttClient
from agent.transport.topics import Topics
from packager.fleet.table import render
from packager.fleet.view import DEFAULT_ERROR_RATE_ALARM, FleetView

log = logging.getLogger(__name__)

SETTLE_S = 1.0  # retained messages follow the SUBACK within milliseconds; a second is plenty on a slow link


def collect(client: MqttClient, view: FleetView, *, wait: float, group: str | None = None,
            clock: Callable[[], float] = time.monotonic) -> None:
    """Feed `view` what arrives on the devices' state and telemetry topics for up to `wait` seconds."""
    topics = Topics(view.prefix)
    looked_up: set[str] = set()  # devices whose exact state topic was read
    with client.subscribe_stream(view.filters(("state", "telemetry"))) as sub:
        log.info("subscribed to %s", " ".join(sub.filters))
        start = clock()
        deadline = start + wait
        while (now := clock()) < deadline:
            if now - start >= min(SETTLE_S, wait) and not [
                    d for d in view.waiting_for() if group is None or view.rows[d].group == group]:
                break
            msg = sub.get(timeout=min(deadline - now, 0.2))
            if msg is not None:
                view.feed(msg.topic, msg.payload)
                _read_missing_states(client, view, topics, looked_up)


def _read_missing_states(client: MqttClient, view: FleetView, topics: Topics, looked_up: set[str]) -> None:
    """Devices known (by telemetry) without a state: read their retained state on its exact topic, once each."""
    wanted = [d for d, r in view.rows.items() if r.online is None and d not in looked_up]
    if not wanted:
        return
    looked_up.update(wanted)
    for topic, payload in client.get_retained([topics.device(d, "state") for d in wanted], timeout=10).items():
        view.feed(topic, payload)


def run(client: MqttClient, prefix: str, *, wait: float, group: str | None, as_json: bool,
        error_rate_alarm: float = DEFAULT_ERROR_RATE_ALARM, out: TextIO | None = None,
        registry: Mapping[str, str] | None = None) -> int:
    out = out or sys.stdout
    view = FleetView(prefix, registry)
    collect(client, view, wait=wait, group=group)
    if as_json:
        print(json.dumps(view.to_json(group, error_rate_alarm)), file=out)
    else:
        rows = view.devices(group)
        if rows:
            console = Console(file=out, width=None if out.isatty() else 200)
            console.print(render(rows, error_rate_alarm=error_rate_alarm))
        else:
            print(f"no devices under {prefix}" + (f" in group {group}" if group else ""), file=out)
    skipped = sum(view.skipped.values())
    if skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(view.skipped.items()))
        print(f"packager: skipped {skipped} malformed message(s): {reasons}", file=sys.stderr)
    if view.ignored:
        print(f"packager: ignored {len(view.ignored)} device id(s) the registry does not hold or has revoked",
              file=sys.stderr)
    return 0
