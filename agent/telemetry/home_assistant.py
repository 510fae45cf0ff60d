"""Home Assistant MQTT discovery (opt-in: `[telemetry] home_assistant = true`): retained config messages under
`homeassistant/<component>/<node_id>/<object_id>/config` that make a device's main figures appear in Home
Assistant by themselves, read straight from the flat telemetry and the retained state (docs/telemetry.md,
docs/dashboard.md).

Pure: `discovery_messages()` builds (topic, payload) pairs; `publish_discovery()` hands them to a publish callable
the daemon supplies (retained, so Home Assistant finds them whenever it starts). Nothing here imports a transport.

Availability is the retained state topic itself: `availability_template` reads its `status` field, so an agent's
clean stop and its broker-sent last will (`{"status": "offline", ...}`) both mark every entity unavailable.
A null figure (not known, docs/telemetry.md) renders as `None`, which Home Assistant's MQTT sensor shows as
unknown, never 0; a field missing from the message renders the same way (`value_json.get`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.transport.topics import Topics

DISCOVERY_PREFIX = "homeassistant"
_OBJECT_ID_RE = re.compile(r"[^a-zA-Z0-9_-]")  # what Home Assistant allows in node_id and object_id
EXPIRE_INTERVALS = 3  # a sensor turns unavailable after this many telemetry intervals without a message
MIN_EXPIRE_S = 30


@dataclass(frozen=True)
class Figure:
    """One entity: a telemetry (or state) field and how Home Assistant should show it."""

    key: str  # the object id, unique per device
    name: str
    field: str  # the field of the JSON message
    source: str = "telemetry"  # "telemetry" or "state"
    component: str = "sensor"  # "sensor" or "binary_sensor"
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = "measurement"
    precision: int | None = None
    scale: float | None = None  # multiply by this (fractions shown as %)
    entity_category: str | None = None


# The fleet table's columns (docs/dashboard.md), in Home Assistant's units and device classes.
FIGURES: tuple[Figure, ...] = (
    Figure("latency_p95", "Latency p95", "latency_ms_p95", unit="ms", device_class="duration", precision=1),
    Figure("error_rate", "Error rate", "error_rate", unit="%", scale=100.0, precision=2),
    Figure("throughput", "Requests per second", "throughput_rps", unit="req/s", precision=1),
    Figure("accuracy", "Accuracy", "accuracy", unit="%", scale=100.0, precision=1),
    Figure("drift_psi", "Drift PSI", "drift_psi", precision=3),
    Figure("drift_status", "Drift status", "drift_status", state_class=None),
    Figure("parity", "Golden parity", "parity_ok", component="binary_sensor", device_class="problem",
           state_class=None),
    Figure("cpu", "CPU", "cpu_percent", unit="%", precision=0),
    Figure("rss", "Agent memory", "rss_bytes", unit="MiB", device_class="data_size", precision=1,
           scale=1 / 1048576, entity_category="diagnostic"),
    Figure("temperature", "SoC temperature", "temp_celsius", unit="°C", device_class="temperature", precision=1),
    Figure("version", "Model version", "version", source="state", state_class=None),
    Figure("deploy_state", "Deployment state", "state", source="state", state_class=None),
)


def object_id(text: str) -> str:
    """`text` with every character Home Assistant refuses in a node or object id replaced by `_`."""
    return _OBJECT_ID_RE.sub("_", text)


def _value_template(fig: Figure) -> str:
    get = f"value_json.get('{fig.field}')"
    if fig.source == "state" and fig.field == "version":
        # what serves: the state's `serving`, else its committed `bundle` (packager fleet's rule)
        return ("{% set b = value_json.get('serving') or value_json.get('bundle') %}"
                "{{ b.get('version') if b else None }}")
    if fig.component == "binary_sensor":
        # device_class problem: ON means a problem, so a failed parity check is ON; unknown stays unknown
        return f"{{{{ None if {get} is none else ('OFF' if {get} else 'ON') }}}}"
    if fig.scale is not None:
        return f"{{{{ None if {get} is none else ({get} * {fig.scale!r}) }}}}"
    return f"{{{{ {get} }}}}"


def discovery_messages(topics: Topics, device_id: str, *, fleet: str, agent_version: str | None = None,
                       interval_s: float = 10.0, discovery_prefix: str = DISCOVERY_PREFIX
                       ) -> list[tuple[str, bytes]]:
    """The retained discovery configs for one device: (topic, JSON payload), one per entry of FIGURES."""
    node = object_id(f"edgeship_{fleet}_{device_id}")
    state_topic = topics.device(device_id, "state")
    device = {"identifiers": [node], "name": device_id, "manufacturer": "edgeship", "model": "edge-agent"}
    if agent_version:
        device["sw_version"] = agent_version
    expire = max(MIN_EXPIRE_S, math.ceil(EXPIRE_INTERVALS * interval_s))
    out = []
    for fig in FIGURES:
        config: dict[str, object] = {
            "name": fig.name,
            "unique_id": f"{node}_{fig.key}",
            "state_topic": topics.device(device_id, fig.source),
            "value_template": _value_template(fig),
            "availability_topic": state_topic,
            "availability_template": "{{ value_json.get('status') }}",
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device,
            "origin": {"name": "edgeship", "sw_version": agent_version or "unknown"},
            "qos": 1,
        }
        if fig.source == "telemetry":
            config["expire_after"] = expire
        if fig.component == "binary_sensor":
            config["payload_on"] = "ON"
            config["payload_off"] = "OFF"
        for key, value in (("unit_of_measurement", fig.unit), ("device_class", fig.device_class),
                           ("state_class", fig.state_class), ("suggested_display_precision", fig.precision),
                           ("entity_category", fig.entity_category)):
            if value is not None and not (fig.component == "binary_sensor" and key in (
                    "unit_of_measurement", "state_class", "suggested_display_precision")):
                config[key] = value
        topic = f"{discovery_prefix}/{fig.component}/{node}/{fig.key}/config"
        out.append((topic, json.dumps(config, sort_keys=True).encode()))
    return out


def removal_messages(messages: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Empty retained payloads on the same topics: Home Assistant removes the entities (a retired device)."""
    return [(topic, b"") for topic, _ in messages]


def publish_discovery(publish: Callable[[str, bytes, bool], object], messages: Iterable[tuple[str, bytes]]) -> int:
    """Hand each message to `publish(topic, payload, retain)` with retain=True; returns how many."""
    n = 0
    for topic, payload in messages:
        publish(topic, payload, True)
        n += 1
    return n
