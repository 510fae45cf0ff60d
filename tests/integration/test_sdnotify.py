"""systemd's notify protocol, spoken by a real `edge-agent run` process to a datagram socket this test listens on.

The test plays systemd for a `Type=notify` unit with `WatchdogSec=3`: it starts the agent with NOTIFY_SOCKET and
WATCHDOG_USEC set and records every datagram. It checks READY=1 (with a STATUS= naming the state and the agent's
version), WATCHDOG=1 pings that never leave a gap systemd would kill for while the agent deploys a real bundle
(fetch worker, STAGE, probation: every healthy wait pings), STATUS= lines following the deployment, and that the
pings stop when an inference gets stuck: the bundle's ONNX model is a real `Loop` whose trip count is the largest
input value, so golden rows (values below 3) answer at once and a request of 1e15s never returns. Then it does what
systemd does when the watchdog fires (SIGABRT). A hung main loop: tests/unit/test_watchdog.py (in-process).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import __version__
from agent.runtime import open_session
from examples.local_broker import Mosquitto
from tests.e2e.test_daemon import BIN, Device, _env, infer_body, is_event
from tests.e2e.test_hung_model import loop_bundle, loop_model

pytestmark = pytest.mark.slow

WATCHDOG_S = 3.0  # the unit's WatchdogSec= in this test: the agent pings every 1.5 s
TIMEOUT = 60.0


# --- systemd's side ---------------------------------------------------------------------------------------------


class NotifySocket:
    """A bound AF_UNIX datagram socket; every message received as (monotonic time, {KEY: value})."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, name="notify-socket", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def wait(self, pred: Any, what: str, timeout: float = TIMEOUT) -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.messages:
                    if pred(item[1]):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"timed out after {timeout:g}s waiting for {what}; got {self.messages[-10:]}")
                self._cond.wait(left)

    def pings(self, since: float = 0.0) -> list[float]:
        with self._cond:
            return [at for at, f in self.messages if f.get("WATCHDOG") == "1" and at >= since]

    def statuses(self) -> list[str]:
        with self._cond:
            return [f["STATUS"] for _, f in self.messages if "STATUS" in f]

    def close(self) -> None:
        self.sock.close()


class NotifiedDevice(Device):
    """test_daemon's Device, started the way systemd starts a Type=notify unit with a watchdog."""

    notify: NotifySocket

    def start(self) -> float:
        assert self.proc is None or self.proc.poll() is not None
        env = {**_env(), "NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
               "WATCHDOG_PID": ""}  # empty: for whichever process reads it (systemd sets the main pid)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(self.config)],
                                         cwd=self.tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
        return time.monotonic()


# --- a model that hangs on demand -------------------------------------------------------------------------------


def loopy_bundle(tmp: Path) -> Path:
    """loopy v1: y = x + floor(max(x)), so an input with a huge value keeps an inference busy for good."""
    tmp.mkdir(parents=True, exist_ok=True)
    model = loop_model(None)
    (tmp / "probe.onnx").write_bytes(model)
    x = np.random.default_rng(0).uniform(0.0, 2.9, (16, 4)).astype(np.float32)
    session = open_session(tmp / "probe.onnx", "onnx", input_names=["x"], output_names=["y"])
    expected = session.run({"x": x})[0]
    np.testing.assert_allclose(expected, x + np.floor(x.max()), rtol=1e-6)  # the Loop really iterates max(x) times
    return loop_bundle(tmp, model, x, expected, "loopy", 1, 50.0)


def post(port: int, x: np.ndarray, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/loopy/infer", body=infer_body(x),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def largest_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


# --- the test ---------------------------------------------------------------------------------------------------


def test_ready_watchdog_status_and_a_stuck_inference_stops_the_pings(mosquitto: Mosquitto, tmp_path: Path) -> None:
    bundle = loopy_bundle(tmp_path / "bundle")
    (tmp_path / "device").mkdir()
    dev = NotifiedDevice(tmp_path / "device", mosquitto, probation_s=2)
    # AF_UNIX paths are limited to 107 bytes: the socket lives in a short directory of its own
    sock_dir = Path(os.path.realpath("/tmp")) / f"sdn-{os.getpid()}-{dev.fleet}"
    sock_dir.mkdir()
    dev.notify = NotifySocket(sock_dir / "notify")
    try:
        dev.start()

        # READY=1 once the agent serves (here: nothing yet, idle), with the state and version in STATUS=
        ready_at, ready = dev.notify.wait(lambda f: f.get("READY") == "1", "READY=1")
        assert ready["STATUS"] == f"idle; serving nothing; edge-agent {__version__}", ready
        dev.notify.wait(lambda f: f.get("WATCHDOG") == "1", "the first WATCHDOG=1")

        # a deployment: check, fetch worker, STAGE, probation, commit. Healthy waits all ping.
        dev.publish(bundle)
        dev.events.wait(is_event(frm="commit", to="idle", version=1), "v1 committed")
        dev.notify.wait(lambda f: f.get("STATUS") == f"idle; serving loopy v1 (onnx); edge-agent {__version__}",
                        "STATUS= after the commit")
        statuses = dev.notify.statuses()
        for state in ("download", "stage", "probation"):  # the STATUS= lines follow the state machine
            assert any(s.startswith(f"{state}; ") and "candidate loopy v1" in s for s in statuses), (state, statuses)
        deployed_at = time.monotonic()
        pings = dev.notify.pings(since=ready_at)
        # systemd kills a unit whose pings are further apart than WatchdogSec (counted from READY=1, when the start
        # ends): that never happened while healthy, through the whole deployment (however quick it was)
        spans = [ready_at, *(t for t in pings if t <= deployed_at), deployed_at]
        assert largest_gap(spans) < WATCHDOG_S, largest_gap(spans)

        # it serves: golden-like rows answer at once
        status, _ = post(dev.port, np.full((1, 4), 2.0, np.float32), timeout=30)
        assert status == 200

        # a stuck inference: max(x) = 1e15 iterations never finish. Pings stop once it has run WatchdogSec.
        stuck_from = time.monotonic()
        def stuck_request() -> None:
            with contextlib.suppress(OSError, http.client.HTTPException):  # the agent is killed under it
                post(dev.port, np.full((1, 4), 1e15, np.float32), timeout=600)

        threading.Thread(target=stuck_request, name="stuck-request", daemon=True).start()
        dev.notify.wait(lambda f: f.get("STATUS", "").startswith("unhealthy: an inference has run for"),
                        "STATUS= saying an inference is stuck")
        unhealthy_at = time.monotonic()
        assert unhealthy_at - stuck_from >= WATCHDOG_S  # not before it has run WatchdogSec
        last_ping = dev.notify.pings()[-1]
        # wait two watchdog periods: no WATCHDOG=1 (systemd would have fired after one)
        time.sleep(2 * WATCHDOG_S)
        assert dev.notify.pings(since=last_ping + 1e-6) == [], "pings went on with an inference stuck"
        assert dev.running, dev.log_tail()  # the agent itself still runs: it is systemd that ends it
        log = dev.log.read_text(errors="replace")
        assert "no more watchdog pings, systemd will restart the agent" in log, dev.log_tail()

        # what systemd does when WatchdogSec passes without a ping (WatchdogSignal=SIGABRT)
        assert dev.proc is not None
        dev.proc.send_signal(signal.SIGABRT)
        assert dev.proc.wait(timeout=30) == -signal.SIGABRT
    finally:
        dev.close()
        dev.notify.close()
        (sock_dir / "notify").unlink(missing_ok=True)
        sock_dir.rmdir()

