"""Home Assistant MQTT discovery payloads (agent/telemetry/home_assistant.py), checked against the discovery
schema of Home Assistant's MQTT sensor and binary_sensor (the keys, their types, the device classes with the units
each allows) and by rendering their templates (Jinja2, as Home Assistant does) on an agent's retained state, its
last will and a telemetry message."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jinja2.sandbox import SandboxedEnvironment

from agent.telemetry import home_assistant as ha
from agent.transport.topics import Topics

TOPICS = Topics("edgeship/lab/")
DEVICE = "pi-7_kitchen"

# Home Assistant's MQTT discovery schema for the keys these payloads may carry (homeassistant/components/mqtt:
# abbreviations.py, sensor.py, binary_sensor.py, mixins.py), with each key's type.
COMMON_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str, "unique_id": str, "state_topic": str, "value_template": str, "availability_topic": str,
    "availability_template": str, "payload_available": str, "payload_not_available": str, "device": dict,
    "origin": dict, "qos": int, "device_class": str, "entity_category": str, "expire_after": int, "icon": str,
}
SENSOR_KEYS = {**COMMON_KEYS, "unit_of_measurement": str, "state_class": str, "suggested_display_precision": int}
BINARY_SENSOR_KEYS = {**COMMON_KEYS, "payload_on": str, "payload_off": str}
REQUIRED = {"name", "state_topic", "unique_id", "device", "availability_topic", "payload_available",
            "payload_not_available"}
DEVICE_KEYS = {"identifiers": list, "name": str, "manufacturer": str, "model": str, "sw_version": str}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
ENTITY_CATEGORIES = {"config", "diagnostic"}
# sensor device classes used here, with the units Home Assistant accepts for each
SENSOR_DEVICE_CLASS_UNITS = {"duration": {"d", "h", "min", "s", "ms"}, "temperature": {"°C", "°F", "K"},
                             "data_size": {"bit", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB", "KiB", "MiB",
                                           "GiB", "TiB"}}
BINARY_DEVICE_CLASSES = {"problem"}
ID_RE = re.compile(r"^[a-zA-Z0-9_-]+$")

STATE = {"status": "online", "device": DEVICE, "group": "lab", "agent_version": "0.1.0", "state": "idle",
         "bundle": {"name": "digits", "version": 2, "format": "onnx"}, "candidate": None,
         "serving": {"name": "digits", "version": 2, "format": "onnx"}, "no_deployment": False, "since": 1.0,
         "at": 2.0}
WILL = {"status": "offline", "device": DEVICE}  # what agent/daemon.py sets as the last will
TELEMETRY = {"schema": 1, "device": DEVICE, "name": "digits", "version": 2, "ts": 3.0, "seq": 9,
             "latency_ms_p95": 4.25, "error_rate": 0.02, "throughput_rps": 12.5, "accuracy": None,
             "drift_psi": 0.31, "drift_status": "alarm", "parity_ok": False, "cpu_percent": 37.0,
             "rss_bytes": 83886080, "temp_celsius": None}


def configs() -> list[tuple[str, dict[str, Any]]]:
    msgs = ha.discovery_messages(TOPICS, DEVICE, fleet="lab", agent_version="0.1.0", interval_s=10.0)
    return [(topic, json.loads(payload)) for topic, payload in msgs]


def render(template: str, payload: dict[str, Any]) -> str:
    return SandboxedEnvironment().from_string(template).render(value_json=payload)


def test_every_payload_matches_the_discovery_schema() -> None:
    msgs = configs()
    assert len(msgs) == len(ha.FIGURES)
    unique_ids = set()
    for topic, cfg in msgs:
        prefix, component, node, obj, leaf = topic.split("/")
        assert (prefix, leaf) == ("homeassistant", "config") and component in ("sensor", "binary_sensor")
        assert ID_RE.match(node) and ID_RE.match(obj), topic
        allowed = SENSOR_KEYS if component == "sensor" else BINARY_SENSOR_KEYS
        assert cfg.keys() >= REQUIRED, (topic, REQUIRED - cfg.keys())
        assert cfg.keys() <= allowed.keys(), (topic, cfg.keys() - allowed.keys())
        for key, value in cfg.items():
            assert isinstance(value, allowed[key]) and not isinstance(value, bool), (topic, key, value)
        assert cfg["device"].keys() <= DEVICE_KEYS.keys() and {"identifiers", "name"} <= cfg["device"].keys()
        assert cfg["device"]["identifiers"] == ["edgeship_lab_pi-7_kitchen"] and cfg["device"]["name"] == DEVICE
        assert cfg["availability_topic"] == TOPICS.device(DEVICE, "state")
        assert cfg["state_topic"] in (TOPICS.device(DEVICE, "state"), TOPICS.device(DEVICE, "telemetry"))
        if "state_class" in cfg:
            assert cfg["state_class"] in STATE_CLASSES
        if "entity_category" in cfg:
            assert cfg["entity_category"] in ENTITY_CATEGORIES
        if component == "sensor" and "device_class" in cfg:
            assert cfg.get("unit_of_measurement") in SENSOR_DEVICE_CLASS_UNITS[cfg["device_class"]], topic
        if component == "binary_sensor":
            assert cfg.get("device_class") in BINARY_DEVICE_CLASSES | {None}
        if cfg["state_topic"].endswith("/telemetry"):
            assert cfg["expire_after"] == 30  # three 10 s intervals
        unique_ids.add(cfg["unique_id"])
    assert len(unique_ids) == len(msgs)


def test_availability_follows_the_retained_state_and_the_last_will() -> None:
    for _, cfg in configs():
        template = cfg["availability_template"]
        assert render(template, STATE) == cfg["payload_available"] == "online"
        assert render(template, WILL) == cfg["payload_not_available"] == "offline"
        assert render(template, {**STATE, "status": "offline"}) == "offline"  # a clean stop


@pytest.mark.parametrize(("key", "expected"), [
    ("latency_p95", "4.25"), ("error_rate", "2.0"), ("throughput", "12.5"), ("accuracy", "None"),
    ("drift_psi", "0.31"), ("drift_status", "alarm"), ("parity", "ON"), ("cpu", "37.0"), ("rss", "80.0"),
    ("temperature", "None"), ("version", "2"), ("deploy_state", "idle"),
])
def test_value_templates_read_the_flat_messages(key: str, expected: str) -> None:
    """Null (unknown) renders `None`, which Home Assistant shows as unknown, never 0; a failed parity is a
    problem (ON)."""
    (cfg,) = [c for t, c in configs() if t.split("/")[3] == key]
    payload = STATE if cfg["state_topic"].endswith("/state") else TELEMETRY
    rendered = render(cfg["value_template"], payload)
    assert rendered == expected or (expected not in ("None", "ON") and float(rendered) == pytest.approx(
        float(expected)))


def test_missing_and_unknown_figures_are_unknown_not_zero() -> None:
    bare = {"schema": 1, "device": DEVICE, "seq": 1, "ts": 1.0}  # an older agent, or a field not sent
    for _, cfg in configs():
        if cfg["state_topic"].endswith("/telemetry"):
            assert render(cfg["value_template"], bare) == "None", cfg["unique_id"]
    (parity,) = [c for t, c in configs() if "/binary_sensor/" in t]
    assert render(parity["value_template"], {**TELEMETRY, "parity_ok": True}) == "OFF"
    (version,) = [c for t, c in configs() if t.split("/")[3] == "version"]
    assert render(version["value_template"], {**STATE, "serving": None}) == "2"  # the committed bundle
    assert render(version["value_template"], {**STATE, "serving": None, "bundle": None}) == "None"
    assert render(version["value_template"], WILL) == "None"


def test_publish_retains_every_config_and_removal_empties_them() -> None:
    sent: list[tuple[str, bytes, bool]] = []
    msgs = ha.discovery_messages(TOPICS, DEVICE, fleet="lab")
    assert ha.publish_discovery(lambda t, p, r: sent.append((t, p, r)), msgs) == len(msgs)
    assert sent == [(t, p, True) for t, p in msgs]
    assert ha.removal_messages(msgs) == [(t, b"") for t, _ in msgs]
    # without an agent version the device block has none, and the origin says unknown
    cfg = json.loads(msgs[0][1])
    assert "sw_version" not in cfg["device"] and cfg["origin"] == {"name": "edgeship", "sw_version": "unknown"}


def test_other_discovery_prefix_and_interval() -> None:
    msgs = ha.discovery_messages(TOPICS, "a", fleet="f", interval_s=60, discovery_prefix="ha")
    assert all(t.startswith("ha/") for t, _ in msgs)
    assert {json.loads(p).get("expire_after") for _, p in msgs} == {180, None}
