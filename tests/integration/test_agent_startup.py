"""`edge-agent fetch` and `edge-agent run` meeting a configuration mistake: one line on stderr naming it, the exit
status docs/agent-config.md gives, never a traceback, and never a daemon that starts and serves nothing.

Real processes (the venv's console scripts), a real TUF root from `packager keys init`'s code, a real mosquitto
where a broker is needed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from examples.local_broker import Mosquitto, free_port
from packager import tuf_repo

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
TIMEOUT = 60.0  # a daemon that starts despite the mistake runs until this and fails the test


@pytest.fixture(scope="module")
def root_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("startup") / "repo"
    tuf_repo.init_repo(repo)
    return tuf_repo.provisioning_root(repo)


def _config(tmp_path: Path, root: Path | str, *, url: str = "", http_port: int | None = None,
            group: str = "lab", fleet: str = "default") -> Path:
    url = url or f"mqtt://127.0.0.1:{free_port()}"  # nothing listens: the checks come first
    port = http_port if http_port is not None else free_port()
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\ndevice_id = "dev-1"\nstate_dir = "{tmp_path / "state"}"\ngroup = "{group}"\n'
                    f'fleet = "{fleet}"\n[mqtt]\nurl = "{url}"\nconnect_timeout_s = 2.0\n'
                    f'[trust]\nroot = "{root}"\n[serve]\nhttp = "127.0.0.1:{port}"\n')
    return path


def _env(**extra: str) -> dict[str, str]:
    # no EDGESHIP_ override but the packager's key passphrase (tests/conftest.py), which no agent reads
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_") or k == "EDGESHIP_KEY_PASSPHRASE"}
    env.update(extra)
    return env


def _agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "edge-agent"), *args], env=env or _env(), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("command", ["fetch", "run"])
@pytest.mark.parametrize("mistake", ["missing", "directory"])
def test_missing_trust_root_is_a_config_error(tmp_path: Path, command: str, mistake: str) -> None:
    root = tmp_path / "root.json"
    if mistake == "directory":
        root.mkdir()
    r = _agent(command, "--config", str(_config(tmp_path, root)))
    line = _one_line(r.stderr)
    assert r.returncode == 2, r
    assert line.startswith("edge-agent: config: [trust] root") and str(root) in line, line


def test_fetch_config_error_in_json_mode(tmp_path: Path) -> None:
    r = _agent("fetch", "--config", str(_config(tmp_path, tmp_path / "nope.json")), "--json")
    assert r.returncode == 2
    assert json.loads(r.stdout)["reason"] == "config"


def test_run_refuses_an_unwritable_state_dir(tmp_path: Path, root_json: Path) -> None:
    config = _config(tmp_path, root_json)
    config.write_text(config.read_text().replace(f'state_dir = "{tmp_path / "state"}"',
                                                 'state_dir = "/proc/self/edge-agent"'))
    r = _agent("run", "--config", str(config))
    assert r.returncode == 2
    assert "[agent] state_dir /proc/self/edge-agent" in _one_line(r.stderr)


def test_run_with_a_busy_http_port_exits_2_in_one_line(tmp_path: Path, root_json: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _agent("run", "--config", str(_config(tmp_path, root_json, http_port=port)))
    line = _one_line(r.stderr)
    assert r.returncode == 2, r
    assert line.startswith("edge-agent: config: [serve] http") and f"127.0.0.1:{port}" in line, line
    assert not (tmp_path / "state" / "deploy-state.json").exists()  # refused before the state was touched


@pytest.mark.parametrize("command", ["fetch", "run"])
def test_mistyped_environment_variable_is_refused(tmp_path: Path, root_json: Path, command: str) -> None:
    r = _agent(command, "--config", str(_config(tmp_path, root_json)),
               env=_env(EDGESHIP_MQTT_UR="mqtt://elsewhere:1883"))
    assert r.returncode == 2
    assert "EDGESHIP_MQTT_UR" in _one_line(r.stderr)


def test_fetch_without_a_deployment_for_the_group_is_worth_a_retry(tmp_path: Path, root_json: Path,
                                                                   mosquitto: Mosquitto) -> None:
    """The fleet's metadata is published and valid, but nothing is signed for this group (yet): exit 75, like
    an incomplete broker, not 1 ("not what the fleet's keys signed")."""
    fleet = f"f{uuid.uuid4().hex[:10]}"
    r = subprocess.run([str(BIN / "packager"), "refresh", "--repo", str(root_json.parent), "--broker",
                        mosquitto.url, "--fleet", fleet], env=_env(), capture_output=True, text=True,
                       timeout=TIMEOUT, check=False)
    assert r.returncode == 0, r.stderr
    r = _agent("fetch", "--config", str(_config(tmp_path, root_json, url=mosquitto.url, fleet=fleet)), "--json")
    assert r.returncode == 75, r
    assert json.loads(r.stdout)["reason"] == "not_found"
    assert "deployments/lab.json" in _one_line(r.stderr)


def test_run_with_a_corrupt_state_file_and_backup_exits_2_in_one_line(tmp_path: Path, root_json: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "deploy-state.json").write_text("{not json")
    (state / "deploy-state.json.bak").write_text("[]")
    r = _agent("run", "--config", str(_config(tmp_path, root_json)))
    assert r.returncode == 2, r
    line = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("edge-agent:")]
    assert "Traceback" not in r.stderr and len(line) == 1, r.stderr
    assert line[0].startswith("edge-agent: state:") and "deploy-state.json" in line[0], line


def test_home_assistant_discovery_is_published_when_enabled(tmp_path: Path, root_json: Path,
                                                            mosquitto: Mosquitto) -> None:
    """`[telemetry] home_assistant = true`: a running agent leaves retained discovery configs whose availability is
    its retained state topic (the payloads themselves: tests/unit/test_home_assistant.py)."""
    from agent.transport.mqtt import MqttClient, unique_client_id

    fleet = f"f{uuid.uuid4().hex[:10]}"
    config = _config(tmp_path, root_json, url=mosquitto.url, fleet=fleet)
    config.write_text(config.read_text() + "[telemetry]\nhome_assistant = true\n")
    proc = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(config)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = MqttClient(mosquitto.url, unique_client_id("ha-test")).connect(timeout=10.0)
    try:
        sub = client.subscribe_stream(["homeassistant/#"])
        configs = {}
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and len(configs) < 3:
            msg = sub.get(timeout=1.0)
            if msg is not None and fleet in msg.topic:
                configs[msg.topic] = json.loads(msg.payload)
        assert configs, "no discovery config arrived"
        for topic, doc in configs.items():
            assert topic.startswith("homeassistant/") and topic.endswith("/config")
            assert doc["availability_topic"] == f"edgeship/{fleet}/devices/dev-1/state"
            assert doc["device"]["name"] == "dev-1"
    finally:
        client.close()
        proc.terminate()
        proc.communicate(timeout=30)
