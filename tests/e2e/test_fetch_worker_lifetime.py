"""A SIGKILLed `edge-agent run` leaves no fetch worker behind.

The daemon (a real process) connects to a real mosquitto through a small TCP relay that passes the first connection
through and holds every later one silent: the fetch worker the daemon starts for its first check then waits for a
CONNACK that never comes (up to connect_timeout_s, 600 s here). Killing the daemon must end the worker soon after,
or a restarted daemon would find it still running beside its own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from examples.local_broker import Mosquitto, free_port
from packager import tuf_repo

pytestmark = pytest.mark.slow

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
TIMEOUT = 30.0


class FirstOnlyRelay:
    """Relays the first TCP connection to `target`; accepts later ones and never answers them."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.held_event = threading.Event()
        self._open: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def _accept(self) -> None:
        first = True
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._open.append(conn)
            if first:
                first = False
                upstream = socket.create_connection(self.target)
                self._open.append(upstream)
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
            else:
                self.held.append(conn)
                self.held_event.set()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for s in self._open:
            s.close()


@pytest.fixture
def relay(mosquitto: Mosquitto) -> Iterator[FirstOnlyRelay]:
    host, port = mosquitto.url.removeprefix("mqtt://").rsplit(":", 1)
    r = FirstOnlyRelay((host, int(port)))
    yield r
    r.close()


def _workers(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if "agent.deploy.fetch_worker" in child.cmdline():
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def test_fetch_worker_ends_when_the_daemon_is_killed(tmp_path: Path, relay: FirstOnlyRelay) -> None:
    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "dev-orphan"\nstate_dir = "{tmp_path / "state"}"\nfleet = "orphan"\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{relay.port}"\nconnect_timeout_s = 600.0\n'
        f'[trust]\nroot = "{tuf_repo.provisioning_root(repo)}"\n[serve]\nhttp = "127.0.0.1:{free_port()}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_")}
    with (tmp_path / "agent.log").open("ab") as log:
        daemon = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(config)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    worker: psutil.Process | None = None
    try:
        # the worker of the first check has connected and waits for its CONNACK
        assert relay.held_event.wait(TIMEOUT), (tmp_path / "agent.log").read_text()
        deadline = time.monotonic() + TIMEOUT
        while not (found := _workers(daemon.pid)):
            assert time.monotonic() < deadline, "no fetch worker under the daemon"
            time.sleep(0.05)
        [worker] = found
        assert worker.is_running()

        os.kill(daemon.pid, signal.SIGKILL)
        assert daemon.wait(timeout=10) == -signal.SIGKILL
        try:
            worker.wait(timeout=TIMEOUT)  # reaped by whoever inherited it; gone either way
        except psutil.TimeoutExpired:
            pytest.fail(f"the fetch worker {worker.pid} still runs {TIMEOUT:g}s after its daemon was killed")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if worker is not None and worker.is_running():
            worker.kill()
