"""Rows as a rich Table, shared by `fleet status` (printed once) and `fleet watch` (redrawn live)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from rich.table import Table
from rich.text import Text

from packager.fleet.view import DEFAULT_ERROR_RATE_ALARM, DeviceRow, alarms

UNKNOWN = Text("-", style="dim")


def _age(ts: float | None, now: float) -> Text:
    if ts is None:
        return UNKNOWN
    s = max(0.0, now - ts)
    text = f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"
    return Text(text)


def _num(v: float | int | None, fmt: Callable[[float], str], bad: bool = False) -> Text:
    if v is None:
        return UNKNOWN
    return Text(fmt(float(v)), style="bold red" if bad else "")


def _gaps(r: DeviceRow) -> Text:
    """Missing sequence numbers seen, and what the agent says its full queue dropped."""
    cell = _num(r.seq_gaps, lambda v: f"{v:.0f}", bool(r.seq_gaps))
    if r.telemetry_dropped_total:
        cell = Text(f"{cell.plain} ({r.telemetry_dropped_total} dropped)", style="bold red")
    return cell


def render(rows: Sequence[DeviceRow], now: float | None = None, *, title: str | None = None,
           error_rate_alarm: float = DEFAULT_ERROR_RATE_ALARM) -> Table:
    """One line per device; offline devices dimmed, alarms in red and listed in the last column."""
    now = time.time() if now is None else now
    table = Table(title=title, title_justify="left")
    for name, justify in (("device", "left"), ("online", "left"), ("group", "left"), ("bundle", "left"),
                          ("state", "left"), ("last seen", "right"), ("p95", "right"), ("errors", "right"),
                          ("parity", "left"), ("accuracy", "right"), ("drift PSI", "right"), ("CPU", "right"),
                          ("RSS", "right"), ("temp", "right"), ("seq gaps", "right"), ("alarms", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        flags = alarms(r, error_rate_alarm)
        online = UNKNOWN if r.online is None else Text("online", style="green") if r.online \
            else Text("OFFLINE", style="bold red")
        bundle = UNKNOWN if r.name is None and r.version is None else \
            Text(f"{r.name or '?'} v{r.version if r.version is not None else '?'}")
        if r.candidate_version is not None and r.candidate_version != r.version:
            bundle.append(f" -> v{r.candidate_version}", style="yellow")
        parity = UNKNOWN if r.parity is None else Text("ok", style="green") if r.parity \
            else Text("FAIL", style="bold red")
        drift = _num(r.drift_psi, lambda v: f"{v:.3f}", "drift" in flags)
        if r.drift_status is not None and r.drift_status not in ("ok", "unknown"):
            drift.append(f" {r.drift_status}")
        table.add_row(
            Text(r.device_id), online, Text(r.group) if r.group else UNKNOWN, bundle,
            Text(r.state) if r.state else UNKNOWN, _age(r.last_seen, now),
            _num(r.latency_ms_p95, lambda v: f"{v:.1f} ms"),
            _num(r.error_rate, lambda v: f"{100 * v:.1f}%", "errors" in flags),
            parity,
            _num(r.accuracy, lambda v: f"{v:.3f}"),
            drift,
            _num(r.cpu_percent, lambda v: f"{v:.0f}%"),
            _num(r.rss_bytes, lambda v: f"{v / 2**20:.0f} MiB"),
            _num(r.temp_celsius, lambda v: f"{v:.0f} °C"),
            _gaps(r),
            Text(" ".join(flags), style="bold red") if flags else Text(""),
            style="dim" if r.online is False else None,
        )
    return table
