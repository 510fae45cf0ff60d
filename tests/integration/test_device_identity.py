"""Device identity and broker access against a real Mosquitto (docs/security.md): a TLS-only listener with
`require_certificate`, `use_identity_as_username`, the ACL `packager ca acl` prints and the CRL the fleet CA signs,
every file made by the real `packager ca` / `packager device` commands.

What is observable decides each assertion: under MQTT 5 Mosquitto 2.0 answers a refused PUBLISH with PUBACK 0x87
(our client raises "Not authorized"); under 3.1.1 it acknowledges and drops it, so there the proof is that a
subscriber holding the packager's identity, which may read every topic involved, never sees it. A refused read is a
subscription that delivers nothing (Mosquitto 2.0 grants the SUBSCRIBE and filters on delivery)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.errors import TransportError
from agent.transport.mqtt import Message, MqttClient, Subscription
from agent.transport.topics import Topics
from examples.local_broker import Mosquitto, MosquittoTls, free_port
from packager import tuf_repo
from packager.acl import app_request_topic, app_response_topic
from packager.fleet_ca import identity_name
from packager.keystore import PASSPHRASE_ENV
from tests.e2e.test_signed_fetch import make_bundle

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
FLEET = "idtest"
T = Topics(f"edgeship/{FLEET}/")
SHA = "cd" * 32
PACKAGER, DASHBOARD, CAM = (identity_name("packager", FLEET), identity_name("dashboard", FLEET),
                            identity_name("app", FLEET, "cam"))
GROUPS = {"dev-a": "lab", "dev-b": "idle", "dev-r": "lab"}  # idle: a group nothing is deployed to
QUIET_S = 1.0  # how long "nothing arrives" is watched, after a control message that did arrive


def packager(*args: str | Path) -> str:
    r = subprocess.run([str(BIN / "packager"), *map(str, args)], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, f"packager {' '.join(map(str, args))}: {r.stderr}"
    return r.stdout


@dataclass
class Pki:
    tmp: Path
    repo: Path
    ids: Path  # the packager's, the dashboard's and the apps' certificates and (encrypted) keys
    broker: Mosquitto
    broker_files: Path  # what `ca broker-cert` wrote: the broker reads its crlfile from here
    topics: Topics

    def device_dir(self, device_id: str) -> Path:
        return self.tmp / device_id

    def device(self, device_id: str, *, client_id: str | None = None, protocol: str = "auto",
               directory: Path | None = None) -> MqttClient:
        d = directory or self.device_dir(device_id)
        return MqttClient(self.broker.url, client_id or f"edge-agent-{device_id}-{uuid.uuid4().hex[:6]}",
                          prefix=self.topics, ca_file=str(d / "ca.pem"), cert_file=str(d / "client.pem"),
                          key_file=str(d / "client.key"), protocol=protocol)

    def identity(self, identity: str) -> MqttClient:
        return MqttClient(self.broker.url, f"tester-{uuid.uuid4().hex[:8]}", prefix=self.topics,
                          ca_file=str(self.ids / "ca.pem"), cert_file=str(self.ids / f"{identity}.pem"),
                          key_file=str(self.ids / f"{identity}.key"), key_password=os.environ[PASSPHRASE_ENV].encode())


def make_pki(tmp: Path, fleet: str, roles: list[tuple[str, str | None]], devices: dict[str, str]) -> Pki:
    """A repository, its CA, the given identities (role, app name) and devices (id -> group), all made by the real
    `packager ca` / `device add`, and a TLS-only Mosquitto (not started yet) with the generated ACL and CRL."""
    repo, ids, brk = tmp / "repo", tmp / "ids", tmp / "broker-files"
    tuf_repo.init_repo(repo)
    (tmp / "mosquitto").mkdir()
    broker = Mosquitto(tmp / "mosquitto", tls=MosquittoTls(brk / "ca.pem", brk / "broker.pem", brk / "broker.key",
                                                           brk / "crl.pem", tmp / "acl"))
    packager("ca", "init", "--repo", repo)
    packager("ca", "broker-cert", "--host", "localhost", "--repo", repo, "--out", brk)
    for role, name in roles:
        packager("ca", "issue", "--role", role, *(["--name", name] if name else []), "--fleet", fleet, "--repo", repo,
                 "--out", ids)
    for device_id, group in devices.items():
        packager("device", "add", device_id, "--group", group, "--repo", repo, "--out", tmp / device_id,
                 "--broker", broker.url, "--fleet", fleet, "--device-dir", tmp / device_id,
                 "--state-dir", tmp / f"state-{device_id}")
    (tmp / "acl").write_text(packager("ca", "acl", "--repo", repo, "--fleet", fleet))
    return Pki(tmp, repo, ids, broker, brk, Topics(f"edgeship/{fleet}/"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    tmp = tmp_path_factory.mktemp("identity")
    pki = make_pki(tmp, FLEET, [("packager", None), ("dashboard", None), ("app", "cam")], GROUPS)
    # the same device id certified by another fleet's CA: an impostor the broker must not take for dev-a
    tuf_repo.init_repo(tmp / "other-repo")
    packager("device", "add", "dev-a", "--group", "lab", "--repo", tmp / "other-repo", "--out", tmp / "impostor",
             "--broker", pki.broker.url, "--fleet", FLEET, "--device-dir", tmp / "impostor")
    pki.broker.start()
    yield pki
    pki.broker.stop()


def collect(sub: Subscription, until: str, timeout: float = 10.0) -> list[str]:
    """Topics delivered to `sub` up to and including the control message on `until`, then QUIET_S more."""
    topics: list[str] = []
    deadline = time.monotonic() + timeout
    while until not in topics:
        msg = sub.get(timeout=max(0.0, deadline - time.monotonic()))
        assert msg is not None, f"the control message on {until} never arrived; got {topics}"
        topics.append(msg.topic)
    while (msg := sub.get(timeout=QUIET_S)) is not None:
        topics.append(msg.topic)
    return topics


FORBIDDEN_FOR_A = [T.device("dev-b", "state"), T.device("dev-b", "events"), T.device("dev-b", "infer/request"),
                   T.device("dev-b", "infer/response"), app_response_topic(T, "dev-b", "cam"),
                   T.tuf("timestamp.json"), T.root_latest, T.target_meta(SHA), T.chunk(SHA, 0), T.notify,
                   T.rollout("lab")]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_device_cannot_write_another_devices_or_the_fleets_topics(pki: Pki, protocol: str) -> None:
    with pki.identity(PACKAGER) as watcher, pki.device("dev-a", protocol=protocol) as a:
        watcher.connect(timeout=10)
        a.connect(timeout=10)
        assert a.protocol == protocol
        with watcher.subscribe_stream([T.prefix + "#"]) as seen:
            for topic in FORBIDDEN_FOR_A:
                if protocol == "5":
                    with pytest.raises(TransportError, match="Not authorized"):
                        a.publish(topic, b"forged", retain=True, qos=1, wait=True, timeout=5)
                else:
                    a.publish(topic, b"forged", retain=True, qos=1, wait=True, timeout=5)
            own = T.device("dev-a", "events")
            a.publish(own, b"mine", retain=False, qos=1, wait=True, timeout=5)
            # other tests of this module leave genuine retained messages on this broker: only a forged one counts
            arrived: list[Message] = []
            while (msg := seen.get(timeout=QUIET_S if own in (m.topic for m in arrived) else 10)) is not None:
                arrived.append(msg)
            assert own in [m.topic for m in arrived]
            assert [m.topic for m in arrived if m.payload == b"forged"] == []
        assert b"forged" not in watcher.get_retained(FORBIDDEN_FOR_A, timeout=5).values()


def test_a_device_cannot_read_another_devices_answers_or_state(pki: Pki) -> None:
    """dev-b answers the app `cam` on cam's response topic and keeps its retained state; dev-a, subscribed to all of
    dev-b's topics, gets none of it, while the app gets its answer and the dashboard the state."""
    with pki.device("dev-a") as a, pki.device("dev-b") as b, pki.identity(CAM) as cam, \
            pki.identity(DASHBOARD) as dashboard:
        for c in (a, b, cam, dashboard):
            c.connect(timeout=10)
        answer, request = app_response_topic(T, "dev-b", "cam"), app_request_topic(T, "dev-b", "cam")
        state = T.device("dev-b", "state")
        with a.subscribe_stream([T.prefix + "devices/dev-b/#", T.prefix + "devices/+/infer/response/#"]) as spy, \
                b.subscribe_stream([request]) as inbox, cam.subscribe_stream([answer]) as answers, \
                dashboard.subscribe_stream([T.prefix + "devices/#"]) as fleet_view:
            cam.publish(request, b'{"inputs": []}', retain=False, response_topic=answer, correlation_data=b"1")
            got = inbox.get(timeout=10)
            assert got is not None and got.response_topic == answer
            b.publish(answer, b'{"outputs": []}', retain=False, correlation_data=b"1")
            b.publish(state, b'{"status": "online"}', retain=True)
            reply = answers.get(timeout=10)
            assert reply is not None and (reply.topic, reply.payload) == (answer, b'{"outputs": []}')
            assert state in collect(fleet_view, state)
            own = T.device("dev-a", "events")
            with a.subscribe_stream([own]) as control:
                a.publish(own, b"control", retain=False)
                assert collect(control, own) == [own]
            assert spy.get(timeout=QUIET_S) is None
        assert a.get_retained([state], timeout=5) == {}
        assert dashboard.get_retained([state], timeout=5) == {state: b'{"status": "online"}'}
        with pytest.raises(TransportError, match="Not authorized"):  # the dashboard only reads
            dashboard.publish(state, b'{"status": "forged"}', retain=True, wait=True, timeout=5)
        with pytest.raises(TransportError, match="Not authorized"):  # an app asks, it never answers
            cam.publish(T.device("dev-a", "infer/response"), b"forged", retain=False, wait=True, timeout=5)


def test_clients_without_a_fleet_certificate_are_refused(pki: Pki) -> None:
    d = pki.device_dir("dev-a")
    anonymous = MqttClient(pki.broker.url, "anonymous", prefix=T, ca_file=str(d / "ca.pem"))
    impostor = pki.device("dev-a", directory=pki.tmp / "impostor")  # trusts the other CA too: its ca.pem
    ours_with_foreign_key = MqttClient(pki.broker.url, "mixed", prefix=T, ca_file=str(d / "ca.pem"),
                                       cert_file=str(pki.tmp / "impostor" / "client.pem"),
                                       key_file=str(pki.tmp / "impostor" / "client.key"))
    for client in (anonymous, ours_with_foreign_key):
        with pytest.raises(TransportError), client:
            client.connect(timeout=5)
    with pytest.raises(TransportError), impostor:  # the broker's certificate is not from the impostor's CA either
        impostor.connect(timeout=5)
    log = pki.broker.log()
    assert "peer did not return a certificate" in log and "certificate verify failed" in log
    with pki.device("dev-a") as genuine:  # the listener itself works
        genuine.connect(timeout=5)


def test_plain_tcp_finds_no_listener_and_is_refused_at_the_tls_handshake(pki: Pki) -> None:
    """The secured broker has no plain listener at all (its only `listener` is the TLS one), and an MQTT CONNECT in
    plain TCP to that port fails in the broker's TLS handshake, not for some later reason."""
    listeners = [line.split() for line in pki.broker.conf_path.read_text().splitlines() if line.startswith("listener")]
    assert [int(words[1]) for words in listeners] == [pki.broker.port]
    before = len(pki.broker.log())
    plain = MqttClient(pki.broker.url.replace("mqtts://", "mqtt://"), "plain", prefix=T)
    with pytest.raises(TransportError), plain:
        plain.connect(timeout=5)
    assert "SSL routines::wrong version number" in pki.broker.log()[before:]  # refused by TLS itself


def test_an_encrypted_key_without_its_password_fails_at_once_never_prompts(pki: Pki) -> None:
    ids = pki.ids
    client = MqttClient(pki.broker.url, "no-password", prefix=T, ca_file=str(ids / "ca.pem"),
                        cert_file=str(ids / f"{PACKAGER}.pem"), key_file=str(ids / f"{PACKAGER}.key"))
    with pytest.raises(TransportError, match="encrypted and no key password"), client:
        client.connect(timeout=5)


def test_a_revoked_device_is_refused_once_the_broker_reloads_the_crl(pki: Pki) -> None:
    """Mosquitto 2.0.11 reads the crlfile again on SIGHUP: new connections with the revoked certificate fail, the
    one already open stays (docs/security.md: restart the broker to cut it)."""
    with pki.device("dev-r") as before:
        before.connect(timeout=5)
        out = packager("device", "revoke", "dev-r", "--repo", pki.repo)
        assert "revoked device dev-r" in out and "restart Mosquitto" in out
        listing = packager("device", "list", "--repo", pki.repo, "--json")
        assert [d["revoked"] is not None for d in json.loads(listing)["devices"] if d["device_id"] == "dev-r"] == [
            True]
        shutil.copy(pki.repo / "ca" / "crl.pem", pki.broker_files / "crl.pem")
        pki.broker.reload()
        deadline = time.monotonic() + 10
        while "Reloading config" not in pki.broker.log():
            assert time.monotonic() < deadline, pki.broker.log()
            time.sleep(0.05)
        with pytest.raises(TransportError), pki.device("dev-r") as after:
            after.connect(timeout=5)
        assert before.is_connected  # what SIGHUP does not do
    with pki.device("dev-a") as other:  # the CRL names dev-r's certificate only
        other.connect(timeout=5)


def test_the_barrier_follows_the_client_id_across_a_failover(pki: Pki, tmp_path: Path) -> None:
    """Two Mosquittos with the same rules; after the first dies the client reconnects to the second under a fresh
    client id, and its retained reads (which end on its barrier `_barrier/<client id>`, granted as `%c`) still
    complete: the barrier topic follows the client id."""
    assert pki.broker.tls is not None
    first, second = Mosquitto(tmp_path / "a", tls=pki.broker.tls), Mosquitto(tmp_path / "b", tls=pki.broker.tls)
    for b in (first, second):
        b.workdir.mkdir()
        b.start()
    d = pki.device_dir("dev-a")
    absent = T.device("dev-a", "nothing-retained-here")  # a read that only the barrier can end
    try:
        with MqttClient([first.url, second.url], "edge-agent-dev-a", prefix=T, ca_file=str(d / "ca.pem"),
                        cert_file=str(d / "client.pem"), key_file=str(d / "client.key")) as client:
            client.connect(timeout=5)
            assert client.get_retained([absent], timeout=5) == {}
            first.kill()
            deadline = time.monotonic() + 20
            while not (client.url == second.url and client.is_connected):
                assert time.monotonic() < deadline, "no failover to the second broker"
                time.sleep(0.1)
            assert client.client_id != "edge-agent-dev-a"
            assert client.barrier_topic == T.barrier(client.client_id)
            assert client.get_retained([absent], timeout=5) == {}
    finally:
        first.stop()
        second.stop()


def _agent_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_")}
    return {**env, **overrides}


def test_a_provisioned_agent_works_end_to_end(pki: Pki) -> None:
    """The packager publishes over mqtts with its own identity; `edge-agent fetch` configured only by the agent.toml
    `device add` wrote fetches and verifies the bundle; a daemon (`edge-agent run`, its fetch worker on its own
    connection) shows up for the dashboard's identity, through `packager fleet status`, and answers the app `cam`
    on its response topic."""
    ids = pki.ids
    tls: list[str | Path] = ["--broker", pki.broker.url, "--fleet", FLEET, "--ca-file", ids / "ca.pem",
           "--cert-file", ids / f"{PACKAGER}.pem", "--key-file", ids / f"{PACKAGER}.key"]
    bundle = make_bundle(pki.tmp / "bundles", "digits", 1)
    assert "published" in packager("publish", bundle, "--repo", pki.repo, "--group", "lab", *tls)

    config = pki.device_dir("dev-a") / "agent.toml"
    r = subprocess.run([str(BIN / "edge-agent"), "fetch", "--config", str(config), "--json"], cwd=pki.tmp,
                       env=_agent_env(), capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in out, out
    assert (pki.tmp / "state-dev-a" / "bundles" / bundle.name).read_bytes() == bundle.read_bytes()

    log = (pki.tmp / "agent-b.log").open("wb")
    daemon = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(pki.device_dir("dev-b") / "agent.toml")], cwd=pki.tmp,
        env=_agent_env(EDGESHIP_SERVE_HTTP=f"127.0.0.1:{free_port()}", EDGESHIP_DEPLOY_POLL_INTERVAL_S="1",
                       EDGESHIP_TELEMETRY_INTERVAL_S="1"),
        stdout=log, stderr=subprocess.STDOUT)
    try:
        with pki.identity(DASHBOARD) as dashboard:
            dashboard.connect(timeout=10)
            with dashboard.subscribe_stream([T.device("dev-b", "state")]) as states:
                deadline = time.monotonic() + 30
                while True:  # "no deployment for group idle": the worker read the signed metadata over mqtts
                    msg = states.get(timeout=max(0.0, deadline - time.monotonic()))
                    assert msg is not None, (pki.tmp / "agent-b.log").read_text()[-3000:]
                    if json.loads(msg.payload).get("no_deployment") is True:
                        break
        with pki.identity(CAM) as cam:  # the app asks the running agent, which answers on the app's own topic
            cam.connect(timeout=10)
            answer = app_response_topic(T, "dev-b", "cam")
            with cam.subscribe_stream([answer]) as answers:
                cam.publish(app_request_topic(T, "dev-b", "cam"), b'{"inputs": []}', retain=False,
                            response_topic=answer, correlation_data=b"42")
                reply = answers.get(timeout=15)
        assert reply is not None and reply.correlation_data == b"42", (pki.tmp / "agent-b.log").read_text()[-3000:]
        assert json.loads(reply.payload)["status"] == 400  # an empty request: refused, but answered where asked
        status = json.loads(packager("fleet", "status", "--json", "--wait", "3", "--broker", pki.broker.url,
                                     "--fleet", FLEET, "--ca-file", ids / "ca.pem",
                                     "--cert-file", ids / f"{DASHBOARD}.pem", "--key-file", ids / f"{DASHBOARD}.key"))
        rows = {d["device_id"]: d for d in status["devices"]}
        row = rows["dev-b"]  # its retained state and its telemetry reached the dashboard's identity
        assert (row["online"], row["group"], row["state"]) == (True, "idle", "idle") and row["telemetry_messages"] > 0
        assert list(rows) == ["dev-b"]  # no other device ran; the dashboard read only devices/
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)
        log.close()
