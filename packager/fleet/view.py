"""The fleet's view, pure: fold `devices/<id>/{state,telemetry,events}` messages into one row per device, count
missing sequence numbers, de-duplicate events and flag alarms. No I/O: the status, watch and events commands feed
it what they receive, and the unit tests feed it bytes.

Every message comes from the broker, which is untrusted transport, and may come from a buggy or hostile device: a
message that does not parse, names another device than its topic, or carries a figure of the wrong type is skipped
and counted (`FleetView.skipped`), never a crash. A figure the device did not send, or sent as something else than
a finite number, is unknown: None (null in JSON), never 0.
"""

from __future__ import annotations

import datetime
import json
import math
from collections import Counter, OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

# is_id: what a device's [agent] device_id / group may be (agent/config.py); a topic level that matches anything
# else was not published by an edgeship agent
from agent.transport.topics import is_id

MAX_PAYLOAD_BYTES = 256 * 1024  # a telemetry message is a few KiB; anything far bigger is not one
MAX_TEXT = 200  # longest name/state string shown; longer ones are not from an agent
MAX_EVENT_KEYS = 100_000  # events remembered for de-duplication (oldest forgotten first)
MAX_SEQS = 100_000  # telemetry sequence numbers remembered per device for gap counting
TELEMETRY_SCHEMA = 1
DEFAULT_ERROR_RATE_ALARM = 0.05
STATUS_WAIT_S = 20.0  # `fleet status` listens about two of the agent's default telemetry intervals (10 s)
EVENTS_WAIT_S = 5.0  # `fleet events` without --follow

LEAVES = ("state", "telemetry", "events")


class _Malformed(ValueError):  # never leaves this module: feed() counts it
    """A message the view skips; the text is the reason it is counted under."""


def _reject_constant(name: str) -> Any:
    raise _Malformed(f"non-finite number {name}")


def _loads(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _Malformed("too_large")
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, _Malformed) as e:
        raise _Malformed("not_json") from e
    if not isinstance(doc, dict):
        raise _Malformed("not_an_object")
    return doc


def _number(v: Any) -> float | None:
    """A finite real number, else None (bools are not numbers here, whatever Python says)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v) if not isinstance(v, int) or abs(v) < 2**63 else math.inf
    return f if math.isfinite(f) else None


def _int(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
        return None
    return v


def _bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _text(v: Any) -> str | None:
    """A string safe to print: short and without control characters (no terminal escapes from a device)."""
    if not isinstance(v, str) or not v or len(v) > MAX_TEXT or not v.isprintable():
        return None
    return v


def _bundle(v: Any) -> tuple[str | None, int | None] | None:
    if not isinstance(v, dict):
        return None
    name, version = _text(v.get("name")), _int(v.get("version"))
    return None if name is None and version is None else (name, version)


@dataclass
class DeviceRow:
    """What is known of one device. Fields named as `packager fleet status --json` prints them."""

    device_id: str
    online: bool | None = None
    group: str | None = None
    name: str | None = None
    version: int | None = None
    state: str | None = None
    last_seen: float | None = None
    latency_ms_p95: float | None = None
    error_rate: float | None = None
    parity: bool | None = None
    accuracy: float | None = None
    drift_psi: float | None = None
    drift_status: str | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    temp_celsius: float | None = None
    seq_gaps: int | None = None
    # more than the fixed names
    agent_version: str | None = None
    candidate_version: int | None = None
    telemetry_dropped_total: int | None = None  # the agent's queue dropped this much telemetry when full
    events_dropped_total: int | None = None
    queue_messages: int | None = None  # waiting in the agent's store-and-forward queue
    telemetry_seq: int | None = None
    telemetry_messages: int = 0
    state_at: float | None = None
    telemetry_ts: float | None = None
    _seqs: set[int] = field(default_factory=set, repr=False)

    def to_json(self, error_rate_alarm: float = DEFAULT_ERROR_RATE_ALARM) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        d["alarms"] = alarms(self, error_rate_alarm)
        return d


def alarms(row: DeviceRow, error_rate_alarm: float = DEFAULT_ERROR_RATE_ALARM) -> list[str]:
    """Why a row wants attention: `offline`, `drift` (drift_status alarm), `parity` (golden parity failed),
    `errors` (error rate above `error_rate_alarm`). Unknown figures raise no alarm: they are shown as unknown."""
    out = []
    if row.online is False:
        out.append("offline")
    if row.drift_status == "alarm":
        out.append("drift")
    if row.parity is False:
        out.append("parity")
    if row.error_rate is not None and row.error_rate > error_rate_alarm:
        out.append("errors")
    return out


def seq_gaps(seqs: set[int]) -> int | None:
    """Sequence numbers missing between the lowest and highest seen; None below two (nothing to tell yet)."""
    if len(seqs) < 2:
        return None
    return max(seqs) - min(seqs) + 1 - len(seqs)


def event_key(device_id: str, event: Mapping[str, Any]) -> Hashable:
    """What makes two event messages the same event: the device and its sequence number when the agent numbered
    it, else the device and the transition's time, states and event (a redelivery repeats all of them)."""
    seq = _int(event.get("seq"))
    if seq is not None:
        return (device_id, "seq", seq)
    return (device_id, "at", json.dumps([event.get("at"), event.get("from"), event.get("to"), event.get("event")],
                                        sort_keys=True, default=str))


class EventDeduper:
    """Remembers the last `max_keys` events seen; `fresh()` is True the first time an event is offered."""

    def __init__(self, max_keys: int = MAX_EVENT_KEYS) -> None:
        self.max_keys = max_keys
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self.duplicates = 0

    def fresh(self, device_id: str, event: Mapping[str, Any]) -> bool:
        key = event_key(device_id, event)
        if key in self._seen:
            self.duplicates += 1
            return False
        self._seen[key] = None
        if len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return True


@dataclass(frozen=True)
class Event:
    device_id: str
    body: dict[str, Any]

    def line(self) -> str:
        """One line for a terminal: time, device, transition, reason, bundle."""
        b = self.body
        at = _number(b.get("at"))
        when = _iso(at) if at is not None else "?"
        bundle = _bundle(b.get("bundle"))
        parts = [when, self.device_id, f"{_text(b.get('from')) or '?'} -> {_text(b.get('to')) or '?'}",
                 _text(b.get("event")) or "?"]
        if bundle is not None:
            parts.append(f"{bundle[0] or '?'} v{bundle[1] if bundle[1] is not None else '?'}")
        reason = _text(b.get("reason"))
        if reason:
            parts.append(f"({reason})")
        return " ".join(parts)


def _iso(ts: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    except (OverflowError, OSError, ValueError):
        return "?"


class FleetView:
    """Rows keyed by device id, built from the messages under `prefix` (`edgeship/<fleet>/`)."""

    def __init__(self, prefix: str, registry: Mapping[str, str] | None = None) -> None:
        """`registry`: device id -> group of the devices the repository registers and has not revoked
        (packager/devices.py `group_registry`). With it a device's group is the registry's, never what its own state
        claims (a device could otherwise enter another group's rollout), and messages of any other id are ignored,
        their ids counted in `ignored`. Without it (a repository with no registry) the state's group is taken."""
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.registry = registry
        self.rows: dict[str, DeviceRow] = {}
        self.skipped: Counter[str] = Counter()
        self.ignored: set[str] = set()
        self.events = EventDeduper()

    def filters(self, leaves: tuple[str, ...] = ("state", "telemetry"), device_id: str = "+") -> list[str]:
        return [f"{self.prefix}devices/{device_id}/{leaf}" for leaf in leaves]

    def _split(self, topic: str) -> tuple[str, str]:
        rest = topic[len(self.prefix):] if topic.startswith(self.prefix) else None
        parts = rest.split("/") if rest is not None else []
        if len(parts) != 3 or parts[0] != "devices" or parts[2] not in LEAVES:
            raise _Malformed("unexpected_topic")
        if not is_id(parts[1]):
            raise _Malformed("bad_device_id")
        return parts[1], parts[2]

    def feed(self, topic: str, payload: bytes) -> Event | None:
        """Fold one message in. Returns the event it carried when it is an event seen for the first time.
        A malformed message changes nothing and is counted in `skipped` under its reason."""
        try:
            device_id, leaf = self._split(topic)
            if self.registry is not None and device_id not in self.registry:
                self.ignored.add(device_id)  # unregistered or revoked: nothing it says is counted
                return None
            if leaf == "state" and not payload:
                self._cleared(device_id)  # the retained state was deleted: the device was retired
                return None
            doc = _loads(payload)
            sender = doc.get("device")
            if sender is not None and sender != device_id:
                raise _Malformed("device_mismatch")  # a device speaking for another: believe neither
            if leaf == "state":
                self._state(device_id, doc)
            elif leaf == "telemetry":
                self._telemetry(device_id, doc)
            else:
                return self._event(device_id, doc)
        except _Malformed as e:
            self.skipped[str(e)] += 1
        return None

    def _row(self, device_id: str) -> DeviceRow:
        row = self.rows.get(device_id)
        if row is None:
            row = self.rows[device_id] = DeviceRow(device_id)
        return row

    def _cleared(self, device_id: str) -> None:
        row = self.rows.get(device_id)
        if row is not None and row.telemetry_messages == 0:
            del self.rows[device_id]
        elif row is not None:
            row.online = None

    def _state(self, device_id: str, doc: dict[str, Any]) -> None:
        status = doc.get("status")
        if status not in ("online", "offline"):
            raise _Malformed("bad_status")
        at = _number(doc.get("at"))
        row = self._row(device_id)
        if at is not None and row.state_at is not None and at < row.state_at:
            return  # an older state than the one we hold (a redelivery after a newer one)
        row.online = status == "online"
        row.state_at = at
        # The last will carries only status and device: what else we knew is no longer vouched for.
        group = doc.get("group") if self.registry is None else self.registry[device_id]
        row.group = group if isinstance(group, str) and is_id(group) else None
        row.state = _text(doc.get("state"))
        row.agent_version = _text(doc.get("agent_version"))
        serving = _bundle(doc.get("serving")) or _bundle(doc.get("bundle"))
        if serving is not None:
            row.name, row.version = serving
        elif "bundle" in doc or "serving" in doc:
            row.name = row.version = None  # the device says it serves nothing
        candidate = _bundle(doc.get("candidate"))
        row.candidate_version = candidate[1] if candidate else None
        self._seen(row, at)

    def _telemetry(self, device_id: str, doc: dict[str, Any]) -> None:
        if doc.get("schema") != TELEMETRY_SCHEMA or isinstance(doc.get("schema"), bool):
            raise _Malformed("unknown_schema")
        seq = _int(doc.get("seq"))
        row = self._row(device_id)
        row.telemetry_messages += 1
        if seq is not None:
            if len(row._seqs) >= MAX_SEQS:
                row._seqs = {max(row._seqs)} if row._seqs else set()  # start counting again; gaps reset
            row._seqs.add(seq)
            row.seq_gaps = seq_gaps(row._seqs)
            if row.telemetry_seq is not None and seq < row.telemetry_seq:
                return  # an older message flushed late: counted for gaps, figures stay the newest
            row.telemetry_seq = seq
        ts = _number(doc.get("ts"))
        row.telemetry_ts = ts
        # the retained state names what serves; telemetry fills in for a device whose state we have not seen
        if row.name is None and row.version is None and row.state_at is None:
            row.name, row.version = _text(doc.get("name")), _int(doc.get("version"))
        row.latency_ms_p95 = _number(doc.get("latency_ms_p95"))
        row.error_rate = _number(doc.get("error_rate"))
        row.parity = _bool(doc.get("parity_ok"))
        row.accuracy = _number(doc.get("accuracy"))
        row.drift_psi = _number(doc.get("drift_psi"))
        row.drift_status = _text(doc.get("drift_status"))
        row.cpu_percent = _number(doc.get("cpu_percent"))
        row.rss_bytes = _int(doc.get("rss_bytes"))
        row.temp_celsius = _number(doc.get("temp_celsius"))
        row.telemetry_dropped_total = _int(doc.get("telemetry_dropped_total"))
        row.events_dropped_total = _int(doc.get("events_dropped_total"))
        row.queue_messages = _int(doc.get("queue_messages"))
        self._seen(row, ts)

    @staticmethod
    def _seen(row: DeviceRow, at: float | None) -> None:
        if at is not None and (row.last_seen is None or at > row.last_seen):
            row.last_seen = at

    def _event(self, device_id: str, doc: dict[str, Any]) -> Event | None:
        if not isinstance(doc.get("event"), str) or not isinstance(doc.get("to"), str):
            raise _Malformed("not_an_event")
        if not self.events.fresh(device_id, doc):
            return None
        return Event(device_id, doc)

    def devices(self, group: str | None = None) -> list[DeviceRow]:
        """Rows sorted by device id; with `group`, only devices whose state names that group."""
        return [r for _, r in sorted(self.rows.items()) if group is None or r.group == group]

    def to_json(self, group: str | None = None, error_rate_alarm: float = DEFAULT_ERROR_RATE_ALARM
                ) -> dict[str, Any]:
        out: dict[str, Any] = {"devices": [r.to_json(error_rate_alarm) for r in self.devices(group)],
                               "skipped": dict(sorted(self.skipped.items()))}
        if self.registry is not None:
            out["ignored_devices"] = len(self.ignored)
        return out

    def waiting_for(self) -> list[str]:
        """Online devices whose telemetry has not yet shown two sequence numbers (seq_gaps still unknown)."""
        return [d for d, r in sorted(self.rows.items()) if r.online and len(r._seqs) < 2]
