"""End to end: `packager rollout start` moving a group of 5 real agents (`edge-agent run` processes) on a real
mosquitto, in waves gated on their telemetry (every 0.5 s, under a steady inference load).

The device ids are chosen by their bucket (agent/deploy/rollout.py) so that each of the waves 20,60,100 holds
devices: 2 in the first wave, 2 more in the second, 1 in the last. The module's fleet goes through one history in
order: a malformed gate is refused before anything is signed; v1 is deployed to the whole group; v2 rolls through
every wave; a parity-broken v3 aborts at wave 1 (the first-wave devices reject it, the others never fetch it); v4
with a gate nobody has data for pauses, and `rollout abort` from another process returns the group to v2; v5's
controller is SIGKILLed in wave 2 and, started again, resumes there and finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import sha256_file
from agent.deploy.machine import State
from agent.deploy.rollout import bucket
from agent.deploy.store import StateStore
from examples.digits.train import train_digits
from examples.local_broker import Mosquitto, free_port
from packager import tuf_repo
from packager.build import BuildOptions, Progress, build
from packager.rollout import state as rollout_state
from tests.conftest import stored_chunks
from tests.e2e.test_daemon import _env, _rebundle, post_infer

pytestmark = pytest.mark.slow

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
GROUP = "lab"
WAVES = "20,60,100"
TIMEOUT = 120.0
GOOD_GATES = "parity>=0.99,error_rate<=0.01,rollbacks==0,offline<=0.05,latency_ms_p95<=50*baseline"


def pick_devices() -> list[str]:
    """5 ids: 2 in the first wave (bucket < 20), 2 in the second (< 60), 1 in the last."""
    want = [(0, 20, 2), (20, 60, 2), (60, 100, 1)]
    chosen: list[str] = []
    for lo, hi, n in want:
        i = 0
        found = 0
        while found < n:
            d = f"pi-{lo}-{i}"
            if lo <= bucket(d, GROUP) < hi:
                chosen.append(d)
                found += 1
            i += 1
    return chosen


@dataclass(frozen=True)
class Versions:
    v1: Path
    v2: Path
    v3_broken: Path
    v4: Path
    v5: Path
    x: np.ndarray


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    tmp = tmp_path_factory.mktemp("rollout-bundles")
    paths = train_digits(tmp / "digits", epochs=2)
    opts = BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                        out_dir=tmp / "out", name="digits", version=1, formats=("onnx",), latency_runs=20,
                        latency_budget_ms=5000.0)  # 5 agents and a load share 2 cores: probation judges p95
    v1 = build(opts, Progress(0, enabled=False)).bundle
    out = {}
    for v in (2, 3, 4, 5):
        (tmp / f"v{v}").mkdir()
        out[v] = _rebundle(v1, tmp / f"v{v}" / f"digits-{v}.bundle", v, shuffle_golden=v == 3)
    with np.load(paths["eval"], allow_pickle=False) as z:
        x = z["x"][:16].astype(np.float32)
    return Versions(v1, out[2], out[3], out[4], out[5], x)


class Agent:
    def __init__(self, tmp: Path, device_id: str, fleet: str, broker: Mosquitto, root: Path) -> None:
        self.id, self.tmp = device_id, tmp
        tmp.mkdir()
        self.port = free_port()
        self.state_dir = tmp / "state"
        self.config = tmp / "agent.toml"
        self.log = tmp / "agent.log"
        self.config.write_text(
            f'[agent]\ndevice_id = "{device_id}"\nstate_dir = "{self.state_dir}"\nfleet = "{fleet}"\n'
            f'group = "{GROUP}"\n[mqtt]\nurl = "{broker.url}"\nconnect_timeout_s = 5.0\n'
            f'[trust]\nroot = "{root}"\n[serve]\nhttp = "127.0.0.1:{self.port}"\n'
            "[limits]\nchunk_timeout_s = 20.0\n[deploy]\npoll_interval_s = 1\nprobation_s = 2\n"
            "[telemetry]\ninterval_s = 0.5\nparity_interval_s = 2\n")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(self.config)],
                                         cwd=tmp, env=_env(), stdout=log, stderr=subprocess.STDOUT)

    def current(self) -> int | None:
        ds = StateStore.in_dir(self.state_dir).load()
        return ds.current.version if ds.current is not None and ds.state is State.IDLE else None

    def log_tail(self) -> str:
        return f"{self.id}: " + "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Load:
    """Inference requests to every agent until stopped (503 before a first model, refused connections at start)."""

    def __init__(self, agents: list[Agent], x: np.ndarray) -> None:
        self.agents, self.x = agents, x
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import http.client

        i = 0
        while not self._stop.is_set():
            for a in self.agents:
                i += 1
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
                    try:
                        post_infer(conn, self.x[i % len(self.x)][None])
                    finally:
                        conn.close()
                except OSError:
                    pass
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class Fleet:
    tmp: Path
    broker: Mosquitto
    name: str
    repo: Path
    agents: list[Agent]

    def packager(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "packager"), *args], cwd=self.tmp, env=_env(), capture_output=True,
                              text=True, timeout=timeout, check=False)

    def publish(self, bundle: Path, *extra: str) -> None:
        r = self.packager("publish", str(bundle), "--repo", str(self.repo), "--broker", self.broker.url,
                          "--fleet", self.name, *extra)
        assert r.returncode == 0, r.stderr

    def start_args(self, name: str, version: int, gate: str, soak: str = "3s") -> list[str]:
        return ["rollout", "start", name, "--version", str(version), "--group", GROUP, "--waves", WAVES,
                "--soak", soak, "--gate", gate, "--min-devices", "1", "--min-requests", "5", "--repo",
                str(self.repo), "--broker", self.broker.url, "--fleet", self.name, "--json"]

    def rollout(self, *args: str) -> tuple[int, list[dict[str, Any]], str]:
        """`packager rollout start ARGS` to its end; fails at once should the rollout pause (which waits for an
        operator) or take longer than 300 s."""
        proc = subprocess.Popen([str(BIN / "packager"), *args], cwd=self.tmp, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        name = args[2]
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None:
                st = rollout_state.load(self.repo, name)
                assert st is None or st.status != "paused", f"the rollout paused: {st.reason}\n{st.figures}"
                assert time.monotonic() < deadline, "the rollout took more than 300 s"
                time.sleep(0.2)
            out, err = proc.communicate()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return proc.returncode, [json.loads(line) for line in out.splitlines()], err

    def state(self, name: str) -> rollout_state.RolloutState:
        return rollout_state.load_existing(self.repo, name)

    def versions(self) -> dict[str, int | None]:
        return {a.id: a.current() for a in self.agents}

    def wait(self, pred: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            for a in self.agents:
                assert a.proc.poll() is None, f"agent {a.id} exited\n{a.log_tail()}"
            if time.monotonic() > deadline:
                tails = "\n".join(a.log_tail() for a in self.agents)
                pytest.fail(f"timed out after {timeout:g}s waiting for {what}: {self.versions()}\n{tails}")
            time.sleep(0.1)

    def wait_all(self, version: int) -> None:
        self.wait(lambda: all(v == version for v in self.versions().values()), f"every device on v{version}")


@pytest.fixture(scope="module")
def fleet(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory, versions: Versions) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("rollout-fleet")
    repo = tmp / "repo"
    tuf_repo.init_repo(repo)
    root = tmp / "provisioned-root.json"
    root.write_bytes(tuf_repo.provisioning_root(repo).read_bytes())
    name = f"ro{os.getpid()}{int(time.time()) % 100000}"
    agents = [Agent(tmp / d, d, name, mosquitto, root) for d in pick_devices()]
    load = Load(agents, versions.x)
    try:
        yield Fleet(tmp, mosquitto, name, repo, agents)
    finally:
        load.stop()
        for a in agents:
            a.close()


def wave_of(device: str) -> int:
    b = bucket(device, GROUP)
    return 1 if b < 20 else 2 if b < 60 else 3


# --- 0: a malformed gate is refused before anything is signed --------------------------------------------------

def test_malformed_gate_is_refused_before_anything(fleet: Fleet, versions: Versions) -> None:
    fleet.publish(versions.v2)  # signed for nobody
    metadata = {p.name: p.read_bytes() for p in (fleet.repo / "metadata").iterdir()}
    for gate, needle in (("parity>=0.99,latency<=5", "unknown metric 'latency'"),
                         ("error_rate<=0.01,,rollbacks==0", "empty gate"),
                         ("error_rate=>0.01", "unexpected character")):
        r = fleet.packager(*fleet.start_args("r-bad-gate", 2, gate))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], r.stderr
    assert {p.name: p.read_bytes() for p in (fleet.repo / "metadata").iterdir()} == metadata
    assert not rollout_state.state_path(fleet.repo, "r-bad-gate").exists()
    assert "deployments/lab.json" not in tuf_repo.referenced_targets(fleet.repo)  # v2 deploys to nobody


# --- 1: a good version rolls through every wave -----------------------------------------------------------------

def test_good_version_rolls_through_every_wave(fleet: Fleet, versions: Versions) -> None:
    fleet.publish(versions.v1, "--group", GROUP)
    fleet.wait_all(1)
    code, lines, err = fleet.rollout(*fleet.start_args("r-v2", 2, GOOD_GATES))
    assert code == 0, (err, lines[-1:] if lines else None)
    st = fleet.state("r-v2")
    assert st.status == "done" and st.wave == 3
    passed = [h["reason"] for h in st.history if "passed" in (h["reason"] or "")]
    assert len(passed) == 2, st.history  # waves 1 and 2 passed, then the last one finished
    assert all(v["outcome"] == "pass" for v in st.figures["verdicts"]), st.figures
    fleet.wait_all(2)
    # the retained status says so
    r = fleet.packager("rollout", "status", "r-v2", "--repo", str(fleet.repo), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "done"


# --- 2: a parity-broken version aborts at wave 1 ---------------------------------------------------------------

def test_failing_version_aborts_at_wave_1(fleet: Fleet, versions: Versions) -> None:
    fleet.publish(versions.v3_broken)
    code, lines, err = fleet.rollout(*fleet.start_args("r-v3", 3, GOOD_GATES))
    assert code == 3, (err, lines[-1:])
    st = fleet.state("r-v3")
    assert st.status == "aborted" and st.wave == 1 and "rollbacks" in (st.reason or ""), st.reason
    first = {a.id for a in fleet.agents if wave_of(a.id) == 1}
    assert set(st.rolled_back) <= first and st.rolled_back
    fleet.wait_all(2)
    sha = sha256_file(versions.v3_broken)
    for a in fleet.agents:
        if a.id not in first:  # outside the reached wave: never downloaded a byte of v3
            assert stored_chunks(a.state_dir, sha) == {}, a.id
            assert not list(a.state_dir.rglob("*digits-3*")), a.id


# --- 3: a gate without data pauses; abort from another terminal returns the group ------------------------------

def test_gate_without_data_pauses_and_abort_returns_the_group(fleet: Fleet, versions: Versions) -> None:
    fleet.publish(versions.v4)
    proc = subprocess.Popen([str(BIN / "packager"), *fleet.start_args("r-v4", 4, "accuracy>=0.9,rollbacks==0")],
                            cwd=fleet.tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fleet.wait(lambda: rollout_state.load(fleet.repo, "r-v4") is not None
                   and fleet.state("r-v4").status == "paused", "the rollout to pause", timeout=90)
        st = fleet.state("r-v4")
        assert st.wave == 1 and "no data: accuracy" in (st.reason or ""), st.reason
        first = {a.id for a in fleet.agents if wave_of(a.id) == 1}
        fleet.wait(lambda: all(fleet.versions()[d] == 4 for d in first), "wave 1 on v4")
        assert all(v == 2 for d, v in fleet.versions().items() if d not in first)  # paused: never promoted
        r = fleet.packager("rollout", "abort", "r-v4", "--repo", str(fleet.repo))
        assert r.returncode == 0, r.stderr
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err
    st = fleet.state("r-v4")
    assert st.status == "aborted" and st.reason == "aborted by request"
    fleet.wait_all(2)  # the wave-1 devices went back to the previous version


# --- 4: a killed controller resumes where it was ---------------------------------------------------------------

def test_killed_controller_resumes_where_it_was(fleet: Fleet, versions: Versions) -> None:
    fleet.publish(versions.v5)
    args = fleet.start_args("r-v5", 5, GOOD_GATES, soak="4s")
    proc = subprocess.Popen([str(BIN / "packager"), *args], cwd=fleet.tmp, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        fleet.wait(lambda: rollout_state.load(fleet.repo, "r-v5") is not None
                   and fleet.state("r-v5").signed == "2:rolling", "wave 2 signed", timeout=90)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = fleet.state("r-v5")
    assert (before.wave, before.status) == (2, "rolling")
    signed_before = len(before.history)
    code, lines, err = fleet.rollout(*args)  # the same command again: a resume, not a new rollout
    assert code == 0, err
    assert lines[0]["wave"] == 2, lines[0]  # it started where it was
    after = fleet.state("r-v5")
    assert after.status == "done"
    waves_after = [h["wave"] for h in after.history[signed_before:]]
    assert 1 not in waves_after, after.history  # wave 1 was never rolled out again
    fleet.wait_all(5)
