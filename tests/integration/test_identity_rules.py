"""The rules around device identity, against a real Mosquitto configured as docs/security.md prescribes (TLS only,
`require_certificate`, `use_identity_as_username`, the ACL `packager ca acl` prints), every file made by the real
`packager ca` / `packager device` commands:

- edgeship-refresh.service's own ExecStart line refreshes over mqtts:// with the packager's identity, with the
  fleet CA (REPO/ca) and the content-key escrow (REPO/content-keys) out of its reach as the unit makes them;
- a device cannot knock a running daemon off the broker by taking its client id, and a late last will of an earlier
  run does not leave the daemon marked offline;
- an inference app cannot make a device answer into another app's response topic."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.errors import TransportError
from agent.transport.topics import Topics
from examples.local_broker import free_port
from packager import keystore, tuf_repo
from packager.acl import app_request_topic, app_response_topic
from packager.fleet_ca import identity_name
from tests.e2e.test_signed_fetch import make_bundle
from tests.integration.test_device_identity import Pki, make_pki, packager
from tests.unit.test_systemd_units import UNITS, unit_settings

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
FLEET = "rules"
T = Topics(f"edgeship/{FLEET}/")
PACKAGER = identity_name("packager", FLEET)
CAM, DOOR = identity_name("app", FLEET, "cam"), identity_name("app", FLEET, "door")
QUIET_S = 1.0  # how long a takeover is given to show in the broker's log
PASSPHRASE = os.environ[keystore.PASSPHRASE_ENV]  # tests/conftest.py


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    pki = make_pki(tmp_path_factory.mktemp("rules"), FLEET, [("packager", None), ("app", "cam"), ("app", "door")],
                   {"dev-a": "lab", "dev-b": "lab"})
    pki.broker.start()
    yield pki
    pki.broker.stop()


def test_the_refresh_unit_refreshes_as_the_packager_without_the_ca_or_the_escrow(pki: Pki, tmp_path: Path) -> None:
    """The unit's ExecStart, run by /bin/sh with the unit's Environment= (values pointed at this test's repository,
    broker and identity, as a drop-in would) and the passphrase only as the systemd credential, refreshes a
    repository holding an encrypted bundle while REPO/ca and REPO/content-keys are gone as InaccessiblePaths= makes
    them (an empty directory in their place)."""
    s = unit_settings(UNITS / "edgeship-refresh.service")
    env_unit = dict(e.split("=", 1) for e in s["Environment"])
    repo_in_unit = env_unit["EDGESHIP_REPO"]
    hidden = {p.lstrip("-") for line in s["InaccessiblePaths"] for p in line.split()}
    assert {f"{repo_in_unit}/ca", f"{repo_in_unit}/content-keys"} <= hidden
    assert env_unit["EDGESHIP_BROKER"].startswith("mqtts://")
    assert Path(env_unit["EDGESHIP_CERT_FILE"]).name == f"{identity_name('packager', env_unit['EDGESHIP_FLEET'])}.pem"

    # an encrypted bundle: the repository now holds escrowed content keys and a signed grants document
    bundle = make_bundle(tmp_path / "bundles", "secret", 1)
    packager("publish", bundle, "--repo", pki.repo, "--group", "lab", "--encrypt", "--broker", pki.broker.url,
             "--fleet", FLEET, "--ca-file", pki.ids / "ca.pem", "--cert-file", pki.ids / f"{PACKAGER}.pem",
             "--key-file", pki.ids / f"{PACKAGER}.key")
    assert any((pki.repo / "content-keys").iterdir())
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / keystore.CREDENTIAL_NAME).write_text(PASSPHRASE + "\n")
    env = {k: v for k, v in os.environ.items() if k not in (keystore.PASSPHRASE_ENV, keystore.ROOT_PASSPHRASE_ENV)}
    env.update(env_unit)
    env.update(EDGESHIP_REPO=str(pki.repo), EDGESHIP_BROKER=pki.broker.url, EDGESHIP_FLEET=FLEET,
               EDGESHIP_CA_FILE=str(pki.ids / "ca.pem"), EDGESHIP_CERT_FILE=str(pki.ids / f"{PACKAGER}.pem"),
               EDGESHIP_KEY_FILE=str(pki.ids / f"{PACKAGER}.key"), CREDENTIALS_DIRECTORY=str(creds),
               PATH=f"{BIN}:{os.environ['PATH']}")
    (exec_start,) = s["ExecStart"]
    moved = [(pki.repo / d, tmp_path / f"away-{d}") for d in ("ca", "content-keys")]
    for where, away in moved:
        where.rename(away)
        where.mkdir(mode=0o000)
    try:
        before = tuf_repo.current_metadata(pki.repo)
        r = subprocess.run(shlex.split(exec_start), env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120, check=False)
    finally:
        for where, away in moved:
            where.rmdir()
            away.rename(where)
    assert r.returncode == 0, f"the unit's ExecStart failed ({r.returncode}):\n{r.stderr}"
    assert "re-signed timestamp" in r.stdout, r.stdout
    after = tuf_repo.current_metadata(pki.repo)
    with pki.identity(PACKAGER) as watcher:
        watcher.connect(timeout=10)
        got = watcher.get_retained([T.tuf("timestamp.json")], timeout=10)
    assert got[T.tuf("timestamp.json")] == after["timestamp.json"] != before["timestamp.json"]


@pytest.fixture(scope="module")
def daemon_a(pki: Pki) -> Iterator[Path]:
    """`edge-agent run` as dev-a, configured only by the agent.toml `device add` wrote; yields its log's path once
    its retained state says online."""
    log_path = pki.tmp / "agent-a.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_")}
    env.update(EDGESHIP_SERVE_HTTP=f"127.0.0.1:{free_port()}", EDGESHIP_DEPLOY_POLL_INTERVAL_S="1")
    with log_path.open("wb") as log:
        daemon = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(pki.tmp / "dev-a" / "agent.toml")],
                                  cwd=pki.tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_state(pki, "dev-a", lambda s: s.get("status") == "online", log_path)
            yield log_path
        finally:
            daemon.terminate()
            daemon.wait(timeout=20)


def wait_for_state(pki: Pki, device_id: str, wanted: Callable[[dict[str, object]], bool], log: Path,
                   timeout: float = 30.0) -> dict[str, object]:
    with pki.identity(PACKAGER) as watcher:
        watcher.connect(timeout=10)
        with watcher.subscribe_stream([T.device(device_id, "state")]) as states:
            deadline = time.monotonic() + timeout
            while True:
                msg = states.get(timeout=max(0.0, deadline - time.monotonic()))
                assert msg is not None, f"no wanted state of {device_id}:\n{log.read_text()[-3000:]}"
                state = json.loads(msg.payload)
                if wanted(state):
                    return dict(state)


def test_another_device_cannot_knock_the_daemon_off_with_its_client_id(pki: Pki, daemon_a: Path) -> None:
    """The daemon's client id is not the guessable `edge-agent-<device id>`: dev-b connecting with that id takes
    over nobody's session (Mosquitto logs a takeover as 'already connected, closing old connection')."""
    with pki.device("dev-b", client_id="edge-agent-dev-a") as b:
        b.connect(timeout=10)
        time.sleep(QUIET_S)
    log = pki.broker.log()
    assert re.search(r"New client connected from .* as edge-agent-dev-a-\d+-[0-9a-f]{8} ", log), log[-3000:]
    assert "already connected, closing old connection" not in log, log[-3000:]
    with pki.identity(PACKAGER) as watcher:
        watcher.connect(timeout=10)
        state = json.loads(watcher.get_retained([T.device("dev-a", "state")], timeout=10)[T.device("dev-a", "state")])
    assert state["status"] == "online"


def test_a_late_last_will_of_an_earlier_run_is_answered_with_the_state(pki: Pki, daemon_a: Path) -> None:
    """A session of an earlier run (another client id) whose last will arrives after the daemon said online: the
    daemon, watching its own state topic, announces its state again."""
    will = json.dumps({"status": "offline", "device": "dev-a"}).encode()
    with pki.device("dev-a") as earlier_run:
        earlier_run.connect(timeout=10)
        earlier_run.publish(T.device("dev-a", "state"), will, retain=True, qos=1, wait=True, timeout=5)
    wait_for_state(pki, "dev-a", lambda s: s.get("status") == "online" and "state" in s, daemon_a)
    assert "a last will marked this device offline while it runs" in daemon_a.read_text()


def test_an_app_cannot_make_a_device_answer_into_another_apps_topic(pki: Pki, daemon_a: Path) -> None:
    """App cam asks the running dev-a to answer on door's response topic, on the shared request topic (the ACL
    refuses it to an app: MQTT 5 PUBACK 0x87) and on its own (the agent refuses that answer topic): door, subscribed
    to its answers, gets nothing, while cam's own request is answered on cam's topic."""
    door_answers, cam_answers = app_response_topic(T, "dev-a", "door"), app_response_topic(T, "dev-a", "cam")
    with pki.identity(CAM) as cam, pki.identity(DOOR) as door:
        cam.connect(timeout=10)
        door.connect(timeout=10)
        with door.subscribe_stream([door_answers]) as door_inbox, cam.subscribe_stream([cam_answers]) as cam_inbox:
            with pytest.raises(TransportError, match="Not authorized"):
                cam.publish(T.device("dev-a", "infer/request"), b'{"inputs": []}', retain=False,
                            response_topic=door_answers, correlation_data=b"forged", wait=True, timeout=5)
            cam.publish(app_request_topic(T, "dev-a", "cam"), b'{"inputs": []}', retain=False,
                        response_topic=door_answers, correlation_data=b"forged", wait=True, timeout=5)
            cam.publish(app_request_topic(T, "dev-a", "cam"), b'{"inputs": []}', retain=False,
                        correlation_data=b"mine", wait=True, timeout=5)
            reply = cam_inbox.get(timeout=15)
            assert reply is not None and reply.correlation_data == b"mine", daemon_a.read_text()[-3000:]
            assert door_inbox.get(timeout=QUIET_S) is None
    assert f"response topic {door_answers!r} is not {cam_answers!r}" in daemon_a.read_text()
