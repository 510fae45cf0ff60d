from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config

MINIMAL = {"agent": {"device_id": "pi-001", "state_dir": "/var/lib/edge-agent"},
           "trust": {"root": "/etc/edge-agent/root.json"}}


def test_defaults_are_bounded_and_prefix_follows_fleet() -> None:
    cfg = parse_config(MINIMAL, env={})
    assert cfg.agent.fleet == "default" and cfg.topic_prefix == "edgeship/default/"
    assert cfg.mqtt.url == "mqtt://127.0.0.1:1883"
    assert cfg.limits.max_bundle_bytes == 2 << 30
    assert cfg.serve.http == "127.0.0.1:8501"
    assert cfg.mqtt.receive_window == 1


def test_environment_overrides_file() -> None:
    cfg = parse_config(MINIMAL, env={"EDGESHIP_AGENT_FLEET": "labs", "EDGESHIP_MQTT_URL": "mqtts://broker:8883",
                                     "EDGESHIP_LIMITS_MAX_BUNDLE_BYTES": "1048576"})
    assert cfg.topic_prefix == "edgeship/labs/" and cfg.mqtt.url == "mqtts://broker:8883"
    assert cfg.limits.max_bundle_bytes == 1 << 20


@pytest.mark.parametrize(
    ("data", "env", "message"),
    [
        ({"trust": {"root": "r.json"}}, {}, r"\[agent\] device_id is required"),
        (dict(MINIMAL, mqtt={"url": "http://x"}), {}, "expected mqtt://"),
        (MINIMAL, {"EDGESHIP_LIMITS_MAX_BUNDLE_BYTES": "12"}, "outside"),
        (MINIMAL, {"EDGESHIP_LIMITS_CHUNK_TIMEOUT_S": "soon"}, "chunk_timeout_s"),
        (MINIMAL, {"EDGESHIP_MQTT_RECEIVE_WINDOW": "0"}, r"\[mqtt\] receive_window: 0 is outside"),
        (dict(MINIMAL, agent={"device_id": "a/b", "state_dir": "/s"}), {}, "device_id 'a/b'"),
        (dict(MINIMAL, mqtt={"topic_prefix": "edgeship/#/"}), {}, "wildcards"),
        (dict(MINIMAL, agent=dict(MINIMAL["agent"], colour="blue")), {}, "unknown key"),
        (dict(MINIMAL, extra={}), {}, "unknown section"),
    ],
)
def test_bad_config_is_one_clear_error(data: dict, env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, env=env)


def test_load_resolves_relative_paths_against_the_file(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('[agent]\ndevice_id = "d1"\nstate_dir = "state"\n[trust]\nroot = "root.json"\n')
    cfg = load_config(p, env={})
    assert cfg.agent.state_dir == tmp_path / "state" and cfg.trust.root == tmp_path / "root.json"
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml", env={})
