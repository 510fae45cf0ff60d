"""End to end, the device side of a staged rollout: four real `edge-agent run` processes of one group on a real
mosquitto follow signed deployment documents that carry a `rollout` entry (docs/transport.md).

The documents are signed here directly with the packager's TUF repository and publish internals (the controller,
packager/rollout, writes the same format): v1 is deployed to the group, then a rollout of v2 reaches 50% of it
(the devices in the wave commit v2, the others never download it), then the rollout is aborted (every device returns
to v1, and v2 is on no device's rejected list), then a new rollout of the same v2 reaches every device again.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import sha256_file
from agent.deploy.machine import decode
from agent.deploy.rollout import bucket
from agent.transport.mqtt import MqttClient
from examples.digits.train import train_digits
from examples.local_broker import Mosquitto, free_port
from packager import publish as pub
from packager import tuf_repo
from packager.build import BuildOptions, Progress, build

pytestmark = pytest.mark.slow

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
GROUP = "lab"
TIMEOUT = 90.0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_")}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("rollout-bundles")
    paths = train_digits(tmp / "digits", epochs=2)

    def make(version: int) -> Path:
        opts = BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                            out_dir=tmp / "out", name="digits", version=version, formats=("onnx",), latency_runs=20)
        return build(opts, Progress(0, enabled=False)).bundle

    return make(1), make(2)


class Group:
    """One fleet, one TUF repository, four agents of group `lab`: two inside a 50% wave, two outside."""

    def __init__(self, tmp: Path, broker: Mosquitto) -> None:
        self.tmp, self.broker = tmp, broker
        self.fleet = f"r{uuid.uuid4().hex[:10]}"
        self.topics = pub.topics_for(self.fleet)
        self.repo = tmp / "repo"
        tuf_repo.init_repo(self.repo)
        root = tmp / "provisioned-root.json"
        root.write_bytes(tuf_repo.provisioning_root(self.repo).read_bytes())
        ids = (f"dev-{self.fleet}-{i}" for i in range(10_000))
        inside = [d for d in ids if bucket(d, GROUP) < 50][:2]
        outside = [d for d in (f"dev-{self.fleet}-{i}" for i in range(10_000)) if bucket(d, GROUP) >= 50][:2]
        self.inside, self.outside = inside, outside
        self.ids = inside + outside
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.mqtt = MqttClient(broker.url, f"tester-{uuid.uuid4().hex[:8]}", prefix=self.topics)
        self.mqtt.connect(timeout=10)
        self.telemetry: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        sub = self.mqtt.subscribe_stream([self.topics.device(d, "telemetry") for d in self.ids])
        threading.Thread(target=self._pump, args=(sub,), daemon=True).start()
        for d in self.ids:
            state = tmp / d
            state.mkdir()
            (state / "agent.toml").write_text(
                f'[agent]\ndevice_id = "{d}"\nstate_dir = "{state / "state"}"\nfleet = "{self.fleet}"\n'
                f'group = "{GROUP}"\n[mqtt]\nurl = "{broker.url}"\nconnect_timeout_s = 5.0\n'
                f'[trust]\nroot = "{root}"\n[serve]\nhttp = "127.0.0.1:{free_port()}"\n'
                "[limits]\nchunk_timeout_s = 20.0\n[deploy]\npoll_interval_s = 1\nprobation_s = 1\n"
                "[telemetry]\ninterval_s = 0.5\n")

    def _pump(self, sub: Any) -> None:
        for msg in sub:
            with self._lock:
                self.telemetry.append(json.loads(msg.payload))

    def start(self) -> None:
        for d in self.ids:
            with (self.tmp / d / "agent.log").open("ab") as log:
                self.procs[d] = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config",
                                                  str(self.tmp / d / "agent.toml")], cwd=self.tmp / d, env=_env(),
                                                 stdout=log, stderr=subprocess.STDOUT)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.mqtt.close()

    # signing, as the packager does

    def publish(self, bundle: Path, group: str) -> str:
        """Sign and push `bundle` with a plain deployment document for `group`; its target path."""
        r = pub.publish(self.repo, bundle, group, self.mqtt, self.topics, None)
        return r.bundle_target

    def deploy(self, bundle_target: str, rollout: dict[str, Any] | None) -> None:
        """Sign and push deployments/lab.json naming `bundle_target` with a `rollout` entry."""
        signed = tuf_repo.referenced_targets(self.repo)
        tf = signed[bundle_target]
        custom = dict(tf.custom)
        name, version = str(custom["name"]), int(custom["version"])
        doc: dict[str, Any] = {"group": GROUP, "bundle": bundle_target, "name": name, "version": version,
                               "sha256": tf.hashes["sha256"]}
        if rollout is not None:
            doc["rollout"] = rollout
        dep = pub.deployment_target_path(GROUP)
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / f"{GROUP}.json"
            f.write_bytes(json.dumps(doc, sort_keys=True).encode() + b"\n")
            tuf_repo.add_targets(self.repo, [(dep, f, {"group": GROUP, "name": name, "version": version})],
                                 chunk_size=pub.CHUNK_SIZE)
        signed = tuf_repo.referenced_targets(self.repo)
        pub.push(self.repo, self.mqtt, self.topics, [signed[bundle_target], signed[dep]], None)

    # watching

    def states(self) -> dict[str, dict[str, Any] | None]:
        topics = {self.topics.device(d, "state"): d for d in self.ids}
        got = self.mqtt.get_retained(list(topics), timeout=10)
        return {d: (json.loads(got[t]) if t in got else None) for t, d in topics.items()}

    def wait(self, pred: Callable[[str, dict[str, Any]], bool], what: str) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            states = self.states()
            if all(s is not None and pred(d, s) for d, s in states.items()):
                return {d: s for d, s in states.items() if s is not None}
            if time.monotonic() > deadline:
                logs = "\n".join((self.tmp / d / "agent.log").read_text(errors="replace")[-1500:] for d in self.ids)
                pytest.fail(f"timed out waiting for {what}: {json.dumps(states, indent=1)}\n{logs}")
            for d, p in self.procs.items():
                assert p.poll() is None, f"agent {d} exited with {p.returncode}"
            time.sleep(0.3)

    def persisted(self, d: str) -> Any:
        return decode((self.tmp / d / "state" / "deploy-state.json").read_bytes())

    def downloaded(self, d: str, version: int) -> bool:
        return (self.tmp / d / "state" / "bundles" / f"digits-{version}.bundle").exists()

    def telemetry_of(self, d: str, since: int) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.telemetry[since:] if m.get("device") == d]


@pytest.fixture
def group(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Group]:
    g = Group(tmp_path, mosquitto)
    try:
        yield g
    finally:
        g.close()


def _on(version: int, state: str = "idle") -> Callable[[str, dict[str, Any]], bool]:
    return lambda d, s: s["state"] == state and (s.get("bundle") or {}).get("version") == version


def test_a_rollout_reaches_its_wave_aborts_back_and_reaches_the_reverted_again(
        group: Group, bundles: tuple[Path, Path]) -> None:
    v1, v2 = bundles
    t1 = group.publish(v1, GROUP)
    group.start()
    group.wait(_on(1), "every device on v1")

    # v2 signed for the bundle only (a document for another group); lab's document carries the rollout
    t2 = group.publish(v2, "elsewhere")
    previous = {"bundle": t1, "name": "digits", "version": 1}
    rollout = {"id": "r-digits-2-a", "wave": 2, "waves": [10, 50, 100], "percent": 50.0, "previous": previous,
               "state": "rolling", "reverted_by_controller": False}
    group.deploy(t2, rollout)
    states = group.wait(lambda d, s: _on(2 if d in group.inside else 1)(d, s) and s.get("rollout_id") == "r-digits-2-a",
                        "the wave on v2, the rest on v1")
    for d in group.inside:
        assert states[d]["rollout_wave"] in (1, 2)  # the device's own wave: 10% or 50%
    mark = len(group.telemetry)
    for d in group.outside:
        assert states[d]["rollout_wave"] is None
        assert not group.downloaded(d, 2), "a device outside the wave fetched the new bundle"
        assert group.persisted(d).current.version == 1

    # telemetry says the same membership
    deadline = time.monotonic() + 30
    while not all(group.telemetry_of(d, mark) for d in group.ids):
        assert time.monotonic() < deadline, "no telemetry from every device"
        time.sleep(0.2)
    for d in group.ids:
        last = group.telemetry_of(d, mark)[-1]
        assert last["rollout_id"] == "r-digits-2-a"
        assert (last["rollout_wave"] is None) == (d in group.outside)

    # aborted: every device returns to v1; v2 is not on anyone's rejected list (the controller's verdict)
    v2_sha = sha256_file(v2)
    group.deploy(t2, {**rollout, "state": "aborted", "reverted_by_controller": True})
    group.wait(_on(1), "every device back on v1")
    for d in group.ids:
        assert v2_sha not in group.persisted(d).rejected
    for d in group.outside:
        assert not group.downloaded(d, 2)

    # a later rollout of the same version reaches every device, the reverted ones included
    group.deploy(t2, {"id": "r-digits-2-b", "wave": 3, "waves": [10, 50, 100], "percent": 100.0,
                      "previous": previous, "state": "rolling", "reverted_by_controller": False})
    states = group.wait(lambda d, s: _on(2)(d, s) and s.get("rollout_id") == "r-digits-2-b", "every device on v2")
    assert all(s["rollout_wave"] in (1, 2, 3) for s in states.values())
