"""`packager fleet status|watch|events` against a real mosquitto: messages published as an agent publishes them
(retained state with the agent's last-will payload for a dead one, periodic telemetry, events re-sent), read by
the real command line in its own process."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.transport.mqtt import MqttClient, unique_client_id
from agent.transport.topics import Topics
from examples.local_broker import Mosquitto, free_port
from packager.cli import main as packager_main

ROOT = Path(__file__).resolve().parents[2]


# `python -m packager.cli` with SIGINT raising KeyboardInterrupt, as at a terminal. A suite started in the background
# by a shell without job control (`make test &`, CI) runs with SIGINT ignored, every child inherits that, and Python
# then installs no KeyboardInterrupt handler: our Ctrl-C did nothing and `watch`/`events --follow` ran on for ever.
_RUN_CLI = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('packager.cli', run_name='__main__', alter_sys=True)")


class Cli:
    """`packager -v fleet ...` in a child process; `subscribed()` waits until it listens (its debug log says so)."""

    def __init__(self, args: Sequence[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _RUN_CLI, "-v", "fleet", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self.out: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._listening = threading.Event()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()
        threading.Thread(target=self._read_out, daemon=True).start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            if "subscribed to" in line:
                self._listening.set()
        self._listening.set()  # exited: let the waiter see why

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.put(line)
        self.out.put(None)

    def subscribed(self) -> None:
        assert self._listening.wait(60), self.err
        assert self.proc.poll() is None, self.err

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # not left running after the test
            self.proc.wait(10)
            raise
        self._err_reader.join(10)  # all of stderr read before anyone looks at it
        lines = []
        while (line := self.out.get(timeout=10)) is not None:
            lines.append(line)
        return rc, "".join(lines)


@pytest.fixture
def fleet() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def device(mosquitto: Mosquitto, fleet: str) -> Iterator[MqttClient]:
    """One client publishing as the devices would (one per device makes no difference to the broker's view)."""
    client = MqttClient(mosquitto.url, unique_client_id("fake-agent"), prefix=Topics(f"edgeship/{fleet}/"))
    client.connect()
    yield client
    client.close()


def state(dev: str, group: str, version: int, st: str, **over: Any) -> bytes:
    """What agent/deploy/driver.py state_payload publishes."""
    bundle = {"name": "digits", "version": version, "format": "onnx"}
    doc = {"status": "online", "device": dev, "group": group, "agent_version": "0.1.0", "state": st,
           "bundle": bundle, "candidate": None, "serving": bundle, "no_deployment": False, "since": 1000.0,
           "at": 1000.5}
    return json.dumps(doc | over).encode()


def telemetry(dev: str, seq: int, **figures: Any) -> bytes:
    doc = {"schema": 1, "device": dev, "name": "digits", "version": 3, "ts": 2000.0 + seq, "seq": seq,
           "latency_ms_p95": None, "error_rate": None, "parity_ok": None, "accuracy": None, "drift_psi": None,
           "drift_status": "unknown", "cpu_percent": None, "rss_bytes": None, "temp_celsius": None}
    return json.dumps(doc | figures).encode()


def publish_states(client: MqttClient) -> None:
    t = client.topics
    client.publish(t.device("pi-1", "state"), state("pi-1", "lab", 3, "IDLE"))
    client.publish(t.device("pi-2", "state"), state("pi-2", "lab", 4, "PROBATION",
                                                    candidate={"name": "digits", "version": 4, "format": "onnx"}))
    # pi-3 died: the broker published its last will over its retained state
    client.publish(t.device("pi-3", "state"), json.dumps({"status": "offline", "device": "pi-3"}).encode())
    client.publish(t.device("junk", "state"), b"\x00not json")  # retained garbage must not hide the others


def test_status_json_lists_versions_states_and_figures(mosquitto: Mosquitto, fleet: str,
                                                       device: MqttClient) -> None:
    publish_states(device)
    cli = Cli(["status", "--broker", mosquitto.url, "--fleet", fleet, "--json", "--wait", "120"])
    cli.subscribed()
    t = device.topics
    for seq in (5, 6, 8):  # 7 never arrives
        device.publish(t.device("pi-1", "telemetry"), telemetry(
            "pi-1", seq, latency_ms_p95=seq + 0.5, error_rate=0.0, parity_ok=True, accuracy=0.93, drift_psi=0.01,
            drift_status="ok", cpu_percent=7.5, rss_bytes=61_000_000, temp_celsius=48.0), retain=False)
    device.publish(t.device("pi-2", "telemetry"), b"{\"schema\": 1, \"device\": \"pi-2\", \"seq\": [", retain=False)
    device.publish(t.device("pi-2", "telemetry"), telemetry("pi-1", 99, cpu_percent=1.0), retain=False)  # spoofed
    for seq in (1, 2):
        device.publish(t.device("pi-2", "telemetry"), telemetry(
            "pi-2", seq, version=4, error_rate=0.25, parity_ok=False, drift_psi=0.31, drift_status="alarm",
            cpu_percent=55.0, rss_bytes=70_000_000), retain=False)
    # pi-1 and pi-2, the online devices, have now sent two telemetry messages each: status ends without --wait
    rc, out = cli.finish()
    assert rc == 0, cli.err
    doc = json.loads(out)
    rows = {r["device_id"]: r for r in doc["devices"]}
    assert set(rows) == {"pi-1", "pi-2", "pi-3"}
    one, two, three = rows["pi-1"], rows["pi-2"], rows["pi-3"]
    assert (one["online"], one["group"], one["name"], one["version"], one["state"]) == \
        (True, "lab", "digits", 3, "IDLE")
    assert (one["latency_ms_p95"], one["error_rate"], one["parity"], one["accuracy"], one["drift_psi"]) == \
        (8.5, 0.0, True, 0.93, 0.01)
    assert (one["cpu_percent"], one["rss_bytes"], one["temp_celsius"], one["seq_gaps"]) == (7.5, 61_000_000, 48.0, 1)
    assert one["last_seen"] == 2008.0 and one["alarms"] == []
    assert (two["version"], two["candidate_version"], two["state"], two["seq_gaps"]) == (4, 4, "PROBATION", 0)
    assert two["temp_celsius"] is None and two["accuracy"] is None and two["latency_ms_p95"] is None
    assert two["alarms"] == ["drift", "parity", "errors"]
    assert three["online"] is False and three["alarms"] == ["offline"]
    assert all(three[k] is None for k in ("group", "version", "state", "cpu_percent", "seq_gaps"))
    assert doc["skipped"] == {"not_json": 2, "device_mismatch": 1}
    assert any("skipped 3 malformed message(s)" in line for line in cli.err)


def test_status_table_and_group_filter(mosquitto: Mosquitto, fleet: str, device: MqttClient) -> None:
    publish_states(device)
    device.publish(device.topics.device("gw-1", "state"), state("gw-1", "field", 2, "IDLE", status="offline"))
    cli = Cli(["status", "--broker", mosquitto.url, "--fleet", fleet, "--group", "field", "--wait", "1"])
    rc, out = cli.finish()
    assert rc == 0, cli.err
    assert "gw-1" in out and "OFFLINE" in out and "digits v2" in out
    assert "pi-1" not in out and "pi-3" not in out


def test_events_are_printed_once_each(mosquitto: Mosquitto, fleet: str, device: MqttClient) -> None:
    cli = Cli(["events", "--broker", mosquitto.url, "--fleet", fleet, "--json", "--follow"])
    cli.subscribed()
    t = device.topics
    first: dict[str, Any] = {"device": "pi-1", "from": "IDLE", "to": "CHECK", "event": "poll", "reason": None,
                             "at": 10.0, "bundle": None}
    second = first | {"from": "CHECK", "to": "DOWNLOAD", "event": "update_found", "at": 11.0, "seq": 7}
    third = first | {"device": "pi-2", "at": 10.0}
    sent: list[dict[str, Any] | bytes] = [first, first, b"{oops", second, second | {"reason": "re-sent"},
                                          {"device": "pi-1"}, third]  # one publisher: delivered in this order
    for body in sent:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        dev = "pi-1" if isinstance(body, bytes) else body["device"]
        device.publish(t.device(dev, "events"), payload, retain=False)
    got = [json.loads(cli.out.get(timeout=30) or "null") for _ in range(3)]
    assert [(g["device_id"], g["to"]) for g in got] == [("pi-1", "CHECK"), ("pi-1", "DOWNLOAD"), ("pi-2", "CHECK")]
    assert got[1]["seq"] == 7 and got[1]["reason"] is None
    cli.proc.send_signal(signal.SIGINT)  # Ctrl-C ends --follow
    rc, rest = cli.finish()
    assert rc == 0, cli.err
    assert rest == ""  # no duplicate followed the third event
    assert any("skipped 2 malformed message(s)" in line for line in cli.err)


def test_ctrl_c_ends_follow_also_when_the_suite_runs_with_sigint_ignored(mosquitto: Mosquitto, fleet: str) -> None:
    """What a background `make test &` hands every process it starts; the child inherits it (see _RUN_CLI)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cli = Cli(["events", "--broker", mosquitto.url, "--fleet", fleet, "--follow"])
    finally:
        signal.signal(signal.SIGINT, previous)
    cli.subscribed()
    cli.proc.send_signal(signal.SIGINT)
    rc, out = cli.finish()
    assert (rc, out) == (0, ""), cli.err


def test_events_for_one_device_in_text(mosquitto: Mosquitto, fleet: str, device: MqttClient) -> None:
    cli = Cli(["events", "--broker", mosquitto.url, "--fleet", fleet, "--device", "pi-2", "--wait", "3"])
    cli.subscribed()
    ev = {"device": "pi-1", "from": "PROBATION", "to": "ROLLBACK", "event": "probation_failed",
          "reason": "p95 over budget", "at": 1_700_000_000.0,
          "bundle": {"name": "digits", "version": 4, "sha256": "0" * 64, "format": "onnx"}}
    device.publish(device.topics.device("pi-1", "events"), json.dumps(ev).encode(), retain=False)
    device.publish(device.topics.device("pi-2", "events"), json.dumps(ev | {"device": "pi-2"}).encode(),
                   retain=False)
    rc, out = cli.finish()
    assert rc == 0, cli.err
    assert out.splitlines() == ["2023-11-14T22:13:20.000Z pi-2 PROBATION -> ROLLBACK probation_failed digits v4 "
                                "(p95 over budget)"]


def test_watch_draws_the_table_and_ctrl_c_exits_0(mosquitto: Mosquitto, fleet: str, device: MqttClient) -> None:
    publish_states(device)
    cli = Cli(["watch", "--broker", mosquitto.url, "--fleet", fleet])
    cli.subscribed()
    device.publish(device.topics.device("pi-2", "telemetry"), telemetry("pi-2", 1, drift_status="alarm"),
                   retain=False)
    device.publish(device.topics.device("pi-2", "events"), b"sentinel: watch does not read events", retain=False)
    # the table is redrawn within half a second of a message; give it a few redraws, then Ctrl-C
    assert cli.proc.poll() is None
    threading.Event().wait(1.5)
    cli.proc.send_signal(signal.SIGINT)
    rc, out = cli.finish()
    assert rc == 0, cli.err
    assert "pi-1" in out and "pi-3" in out and "OFFLINE" in out and "drift" in out


@pytest.mark.parametrize("args, needle", [
    (["status", "--broker", "mqtt://127.0.0.1:1", "--fleet", "a/#"], "--fleet 'a/#'"),
    (["status", "--broker", "http://127.0.0.1:1"], "--broker"),
    (["watch", "--broker", "mqtt://127.0.0.1:1", "--group", "a b"], "--group 'a b'"),
    (["events", "--broker", "mqtt://127.0.0.1:1", "--device", "pi/+"], "--device 'pi/+'"),
    (["status", "--broker", "mqtt://127.0.0.1:1", "--wait", "0"], "--wait"),
    (["status", "--broker", "mqtt://127.0.0.1:1", "--wait", "nan"], "--wait"),
    (["watch", "--broker", "mqtt://127.0.0.1:1", "--error-rate-alarm", "2"], "--error-rate-alarm"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = packager_main(["fleet", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("packager: error: "), lines
    assert needle in lines[0], lines


def test_no_broker_is_exit_4(capsys: pytest.CaptureFixture[str]) -> None:
    code = packager_main(["fleet", "status", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--wait", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(lines) == 1 and lines[0].startswith("packager: broker: "), lines


def test_status_with_a_registry_takes_groups_from_it_and_ignores_unregistered_ids(
        mosquitto: Mosquitto, fleet: str, device: MqttClient, tmp_path: Path) -> None:
    """--repo with a device registry: pi-1 (registered in lab) claiming group field stays in lab, pi-2 (revoked) and
    junk (never registered) are left out and counted, gw-1 (registered in field) is the field group."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from packager import devices

    for dev, group in (("pi-1", "lab"), ("pi-2", "lab"), ("gw-1", "field")):
        key = X25519PrivateKey.generate().public_key()
        devices.register(tmp_path, devices.DeviceRecord(dev, group, 1, devices.public_b64(key), devices.now_iso()))
    devices.mark_revoked(tmp_path, "pi-2")
    t = device.topics
    device.publish(t.device("pi-1", "state"), state("pi-1", "field", 3, "IDLE"))
    device.publish(t.device("pi-2", "state"), state("pi-2", "field", 3, "IDLE"))
    device.publish(t.device("gw-1", "state"), state("gw-1", "field", 2, "IDLE"))
    device.publish(t.device("junk", "state"), state("junk", "field", 2, "IDLE"))
    cli = Cli(["status", "--broker", mosquitto.url, "--fleet", fleet, "--json", "--wait", "1", "--group", "field",
               "--repo", str(tmp_path)])
    rc, out = cli.finish()
    assert rc == 0, cli.err
    doc = json.loads(out)
    assert [r["device_id"] for r in doc["devices"]] == ["gw-1"] and doc["ignored_devices"] == 2
    assert any("ignored 2 device id(s) the registry does not hold or has revoked" in line for line in cli.err)
    cli = Cli(["status", "--broker", mosquitto.url, "--fleet", fleet, "--json", "--wait", "1", "--group", "field"])
    rc, out = cli.finish()  # no --repo: each state's own group, as before
    assert rc == 0, cli.err
    assert [r["device_id"] for r in json.loads(out)["devices"]] == ["gw-1", "junk", "pi-1", "pi-2"]
