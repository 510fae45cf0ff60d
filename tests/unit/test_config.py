from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from agent.errors import ConfigError

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
        (dict(MINIMAL, agent={"device_id": "pi.1", "state_dir": "/s"}), {}, "device_id 'pi.1'"),  # no '.' (NATS)
        (dict(MINIMAL, agent=dict(MINIMAL["agent"], fleet="lab.1")), {}, "fleet 'lab.1'"),
        (dict(MINIMAL, mqtt={"topic_prefix": "edgeship/lab.1/"}), {}, "topic_prefix"),
        (dict(MINIMAL, mqtt={"url": "mqtt://a", "urls": ["mqtt://b"]}), {}, "url and urls: give one"),
        (dict(MINIMAL, mqtt={"url": "mqtt://a"}), {"EDGESHIP_MQTT_URLS": "mqtt://b"}, "url and urls: give one"),
        (dict(MINIMAL, mqtt={"urls": []}), {}, "at least one"),
        (dict(MINIMAL, mqtt={"urls": ["mqtt://a", "mqtts://b"]}), {}, "all mqtt:// or all mqtts://"),
        (dict(MINIMAL, mqtt={"urls": ["mqtt://a", "ftp://b"]}), {}, "'ftp://b': expected mqtt://"),
        (dict(MINIMAL, mqtt={"urls": ["mqtt://a", "mqtt://a"]}), {}, "listed twice"),
        (dict(MINIMAL, mqtt={"url": "mqtt://a?subscribe_qos=2"}), {}, "optionally \\?subscribe_qos=0"),
        (dict(MINIMAL, mqtt={"url": "mqtt://a?x=1"}), {}, "expected mqtt://"),
        (dict(MINIMAL, mqtt={"urls": ["mqtt://a", 7]}), {}, "list of strings"),
        (MINIMAL, {"EDGESHIP_MQTT_RETAINED_GRACE_S": "61"}, "retained_grace_s: 61.0 is outside"),
    ],
)
def test_bad_config_is_one_clear_error(data: dict, env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, env=env)


def test_several_brokers() -> None:
    """`urls` (or a comma-separated url / EDGESHIP_MQTT_URLS): `url` then holds the list MqttClient takes."""
    cfg = parse_config(dict(MINIMAL, mqtt={"urls": ["mqtt://a:1883", "mqtt://b:1884"]}), env={})
    assert cfg.mqtt.urls == ("mqtt://a:1883", "mqtt://b:1884") and cfg.mqtt.url == "mqtt://a:1883,mqtt://b:1884"
    cfg = parse_config(MINIMAL, env={"EDGESHIP_MQTT_URLS": "mqtt://a:1883, mqtt://b:1884"})
    assert cfg.mqtt.url == "mqtt://a:1883,mqtt://b:1884"
    assert parse_config(MINIMAL, env={"EDGESHIP_MQTT_URL": "mqtt://a,mqtt://b"}).mqtt.url == "mqtt://a,mqtt://b"
    assert parse_config(MINIMAL, env={}).mqtt.retained_grace_s == 0.5
    nats = ["mqtt://a:1883?subscribe_qos=0", "mqtt://b:1883?subscribe_qos=0"]  # a NATS 2.9 cluster (scaling.md)
    assert parse_config(dict(MINIMAL, mqtt={"urls": nats}), env={}).mqtt.url == ",".join(nats)


def test_a_config_written_back_reads_back_equal() -> None:
    """The daemon hands its config to the fetch worker as JSON (`config_document`): url and urls both present."""
    from agent.deploy.fetch_worker import config_document

    for mqtt in ({}, {"url": "mqtt://a:1"}, {"urls": ["mqtt://a:1", "mqtt://b:2"]}):
        cfg = parse_config(dict(MINIMAL, mqtt=mqtt), env={})
        assert parse_config(config_document(cfg), env={}) == cfg


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


def test_mistyped_environment_override_is_refused_like_a_mistyped_key() -> None:
    with pytest.raises(ConfigError, match="EDGESHIP_MQTT_UR") as info:
        parse_config(MINIMAL, env={"EDGESHIP_MQTT_UR": "mqtt://broker:1883"})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="EDGESHIP_AGENT_GROUPS"):
        parse_config(MINIMAL, env={"EDGESHIP_AGENT_GROUPS": "lab", "EDGESHIP_AGENT_GROUP": "lab"})


def test_other_programs_edgeship_variables_are_not_overrides() -> None:
    # read by the tests' broker helper and the refresh unit, so they may be set where the agent runs
    env = {"EDGESHIP_MOSQUITTO": "/usr/sbin/mosquitto", "EDGESHIP_REPO": "/srv/repo",
           "EDGESHIP_BROKER": "mqtt://127.0.0.1:1883", "EDGESHIP_FLEET": "default", "EDGESHIPPING": "x"}
    assert parse_config(MINIMAL, env=env) == parse_config(MINIMAL, env={})


def test_every_edgeship_variable_used_in_the_repository_is_known() -> None:
    """A new `EDGESHIP_*` variable elsewhere in the project must be listed as an override or in OTHER_ENV, or the
    agent would refuse to start where it is set."""
    import re

    from agent.config import OTHER_ENV, override_names

    root = Path(__file__).resolve().parents[2]
    used: set[str] = set()
    corpus = root / "tests" / "fuzz" / "corpus"  # fuzz inputs: mangled names on purpose
    for sub in ("agent", "packager", "benchmarks", "examples", "systemd", "tests", "docs"):
        for path in (root / sub).rglob("*"):
            if corpus in path.parents:
                continue
            if path.is_file() and path.suffix in (".py", ".md", ".service", ".timer", ".toml", ".sh", ""):
                used.update(re.findall(r"\bEDGESHIP_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace")))
    mistyped_on_purpose = {"EDGESHIP_MQTT_UR", "EDGESHIP_AGENT_GROUPS"}
    assert used - override_names() - OTHER_ENV - mistyped_on_purpose == set()


def _root_file(path: Path) -> Path:
    path.write_text('{"signed": {"_type": "root", "version": 1}, "signatures": []}')
    return path


def _with_paths(tmp_path: Path, **agent: str) -> dict:
    return {"agent": {"device_id": "pi-001", "state_dir": str(tmp_path / "state"), **agent},
            "trust": {"root": str(tmp_path / "root.json")}}


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda t: None, r"\[trust\] root .*root.json: no such file"),
        (lambda t: (t / "root.json").mkdir(), r"\[trust\] root .*root.json: is a directory"),
        (lambda t: (t / "root.json").write_text("not json"), r"\[trust\] root .*: not TUF root metadata"),
        (lambda t: (t / "root.json").write_text('{"signed": {"_type": "targets"}}'), "not TUF root metadata"),
        (lambda t: (_root_file(t / "root.json"), (t / "state").write_text("")),
         r"\[agent\] state_dir .*state: not a directory"),
        (lambda t: (_root_file(t / "root.json"), (t / "file").write_text(""), (t / "state").symlink_to(t / "file")),
         r"\[agent\] state_dir .*: not a directory"),
    ],
)
def test_check_paths_names_the_key_and_the_file(tmp_path: Path, setup, message: str) -> None:
    from agent.config import check_paths

    setup(tmp_path)
    cfg = parse_config(_with_paths(tmp_path), env={})
    with pytest.raises(ConfigError, match=message) as info:
        check_paths(cfg)
    assert "\n" not in str(info.value)


def test_check_paths_creates_the_state_dir_and_checks_the_ca_file(tmp_path: Path) -> None:
    from agent.config import check_paths

    _root_file(tmp_path / "root.json")
    data = _with_paths(tmp_path, state_dir=str(tmp_path / "a" / "state"))
    check_paths(parse_config(data, env={}))
    assert (tmp_path / "a" / "state").is_dir() and list((tmp_path / "a" / "state").iterdir()) == []
    with pytest.raises(ConfigError, match=r"\[mqtt\] ca_file .*ca.pem: no such file"):
        check_paths(parse_config(dict(data, mqtt={"ca_file": str(tmp_path / "ca.pem")}), env={}))


def test_check_paths_refuses_a_state_dir_it_cannot_create(tmp_path: Path) -> None:
    from agent.config import check_paths

    _root_file(tmp_path / "root.json")  # /proc refuses new directories even to root
    with pytest.raises(ConfigError, match=r"\[agent\] state_dir /proc/self/edge-agent: cannot create it"):
        check_paths(parse_config(_with_paths(tmp_path, state_dir="/proc/self/edge-agent"), env={}))
