"""The fetch worker's JSON protocol: the config it is handed, the one line it prints, and how the daemon reads it."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest

from agent.config import AgentConfig, parse_config
from agent.deploy.fetch_client import worker_error
from agent.deploy.fetch_worker import config_document, error_document, main, read_config
from agent.deploy.machine import Event, State, failure_event
from agent.errors import BundleRejected, FetchWorkerError, TransportError


def _cfg(tmp_path: Path, **mqtt: object) -> AgentConfig:
    return parse_config({"agent": {"device_id": "dev-1", "state_dir": str(tmp_path / "state"), "group": "g"},
                         "trust": {"root": str(tmp_path / "root.json")},
                         "mqtt": {"url": "mqtt://127.0.0.1:1883", **mqtt},
                         "limits": {"chunk_timeout_s": 2.5}, "deploy": {"probation_s": 7}}, env={})


def test_config_document_round_trips(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, topic_prefix="x/y/")
    path = tmp_path / "fetch-config.json"
    path.write_text(json.dumps(config_document(cfg)))
    assert read_config(path) == cfg


@pytest.mark.parametrize("exc, kind, reason", [
    (BundleRejected("gone", reason="not_found"), "rejected", "not_found"),
    (TransportError("slow", reason="hash_mismatch"), "transport", "hash_mismatch"),
    (OSError("disk"), "error", "OSError"),
])
def test_errors_map_back_to_the_same_failure_event(exc: Exception, kind: str, reason: str) -> None:
    doc = json.loads(json.dumps(error_document(exc)))
    assert (doc["kind"], doc["reason"], doc["error"]) == (kind, reason, str(exc))
    back = worker_error(doc)
    assert type(back) is type(exc) or isinstance(back, FetchWorkerError)
    for state in (State.CHECK, State.DOWNLOAD, State.VERIFY):
        assert failure_event(state, back) == failure_event(state, exc)
    assert failure_event(State.DOWNLOAD, worker_error(error_document(TransportError("x"))))[0] is Event.ABORTED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_broker_prints_one_transport_error_line(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, url=f"mqtt://127.0.0.1:{_free_port()}", connect_timeout_s=1.0)
    path = tmp_path / "fetch-config.json"
    path.write_text(json.dumps(config_document(cfg)))
    out = io.StringIO()
    assert main(["--config", str(path), "--step", "check"], out=out) == 1
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["kind"] == "transport" and isinstance(worker_error(doc), TransportError)


def test_download_without_a_candidate_is_refused(tmp_path: Path) -> None:
    out = io.StringIO()
    assert main(["--config", str(tmp_path / "missing.json"), "--step", "download"], out=out) == 1
    assert json.loads(out.getvalue())["kind"] == "rejected"


def test_each_fetch_uses_a_client_id_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes (or two fetches) with one MQTT client id knock each other off the broker in turn: every fetch
    client id carries the process id and a random part."""
    import os

    import agent.transport.mqtt
    from agent.trust.fetch import with_source

    ids: list[str] = []

    class Recorder(agent.transport.mqtt.MqttClient):
        def connect(self, timeout: float = 10.0) -> agent.transport.mqtt.MqttClient:
            ids.append(self.client_id)
            raise TransportError("no broker here")

    monkeypatch.setattr(agent.transport.mqtt, "MqttClient", Recorder)
    cfg = _cfg(tmp_path)
    for _ in range(2):
        with pytest.raises(TransportError):
            with_source(cfg, lambda source: None)
    assert len(ids) == 2 and ids[0] != ids[1], ids
    assert all(i.startswith(f"edge-agent-dev-1-fetch-{os.getpid()}-") for i in ids), ids


def test_client_id_stays_valid_for_the_longest_device_id() -> None:
    from agent.ids import is_client_id
    from agent.transport.mqtt import unique_client_id

    base = "edge-agent-" + "d" * 64 + "-fetch"
    cid = unique_client_id(base)
    assert is_client_id(cid) and cid != unique_client_id(base)
    assert is_client_id(unique_client_id("edge agent.x/y+#"))  # anything else in the base becomes '-'
    assert unique_client_id("a.b").startswith("a-b-")


def test_worker_exits_when_the_parent_pipe_closes(tmp_path: Path) -> None:
    """The fallback beside PR_SET_PDEATHSIG (and the only way off Linux): a worker blocked on a broker that never
    answers exits once every write end of its `--parent-fd` pipe is closed, as when the daemon dies."""
    import os
    import subprocess
    import sys

    from agent.deploy.fetch_worker import EXIT_ORPHANED

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never sends a CONNACK
        cfg = _cfg(tmp_path, url=f"mqtt://127.0.0.1:{silent.getsockname()[1]}", connect_timeout_s=600.0)
        path = tmp_path / "fetch-config.json"
        path.write_text(json.dumps(config_document(cfg)))
        r, w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-m", "agent.deploy.fetch_worker", "--config", str(path), "--step",
                                 "check", "--parent-fd", str(r)], pass_fds=(r,), stdout=subprocess.PIPE)
        os.close(r)
        try:
            silent.settimeout(60)
            conn, _ = silent.accept()  # the worker got as far as connecting, and now waits
            with conn:
                assert proc.poll() is None
                os.close(w)
                w = -1
                assert proc.wait(timeout=60) == EXIT_ORPHANED
        finally:
            if w >= 0:
                os.close(w)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
