"""`packager fleet watch`: the status table, redrawn as messages arrive (rich Live); Ctrl-C ends it (exit 0)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

from rich.console import Console
from rich.live import Live
from rich.table import Table

from agent.transport.mqtt import MqttClient
from packager.fleet.table import render
from packager.fleet.view import DEFAULT_ERROR_RATE_ALARM, FleetView

log = logging.getLogger(__name__)

REDRAW_S = 0.5  # also redraws "last seen" while nothing arrives


def _title(view: FleetView, group: str | None) -> str:
    skipped = sum(view.skipped.values())
    return (f"{view.prefix}" + (f" group {group}" if group else "") + f"  {len(view.devices(group))} device(s)"
            + (f"  {skipped} malformed message(s) skipped" if skipped else "")
            + (f"  {len(view.ignored)} unregistered/revoked id(s) ignored" if view.ignored else "")
            + "  (Ctrl-C to quit)")


def run(client: MqttClient, prefix: str, *, group: str | None,
        error_rate_alarm: float = DEFAULT_ERROR_RATE_ALARM, console: Console | None = None,
        registry: Mapping[str, str] | None = None) -> int:
    view = FleetView(prefix, registry)
    console = console or Console(width=None if sys.stdout.isatty() else 200)  # a pipe is not 80 columns wide

    def table() -> Table:
        return render(view.devices(group), title=_title(view, group), error_rate_alarm=error_rate_alarm)

    try:
        with client.subscribe_stream(view.filters(("state", "telemetry"))) as sub, \
                Live(table(), console=console, auto_refresh=False) as live:
            log.info("subscribed to %s", " ".join(sub.filters))
            drawn = time.monotonic()
            while not sub.closed:
                msg = sub.get(timeout=REDRAW_S)
                if msg is not None:
                    view.feed(msg.topic, msg.payload)
                if msg is None or time.monotonic() - drawn >= REDRAW_S:
                    live.update(table(), refresh=True)
                    log.info("subscribed to %s", " ".join(sub.filters))
            drawn = time.monotonic()
    except KeyboardInterrupt:
        pass  # the way to leave a live view: not an error
    return 0
