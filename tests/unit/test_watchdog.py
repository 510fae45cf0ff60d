"""agent/sdnotify.py and agent/watchdog.py in-process, over a real datagram socket: what is read from the
environment, that only the main thread's beats ping, that a blocked main thread or a stuck inference stops the
pings (and a returned one resumes them), the STATUS= text, and the bounded stage wait. The real agent process:
tests/integration/test_sdnotify.py."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier
from agent.watchdog import PulseEvent, Watchdog, WatchedHolder, bounded, status_line


class Listener:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.0)

    def drain(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


@pytest.fixture
def listener() -> Iterator[tuple[Listener, str]]:
    d = Path(os.path.realpath("/tmp")) / f"wd-{os.getpid()}-{threading.get_ident()}"
    d.mkdir()
    lst = Listener(d / "s")
    yield lst, str(d / "s")
    lst.sock.close()
    (d / "s").unlink()
    d.rmdir()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_from_env_reads_and_removes_the_variables() -> None:
    env = {"NOTIFY_SOCKET": "@edgeship", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()), "X": "1"}
    n = Notifier.from_env(env)
    assert (n.address, n.watchdog_s, n.enabled) == ("@edgeship", 2.0, True)
    assert env == {"X": "1"}  # the agent's children (fetch workers, probes) never speak for it


@pytest.mark.parametrize(("env", "address", "watchdog_s"), [
    ({}, None, None),
    ({"WATCHDOG_USEC": "1000000"}, None, None),  # no socket: no watchdog either
    ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, "/run/n", None),  # another pid
    ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "0"}, "/run/n", None),
    ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "soon"}, "/run/n", None),
    ({"NOTIFY_SOCKET": "relative/n"}, None, None),  # neither a path nor an abstract name
])
def test_from_env_edge_cases(env: dict[str, str], address: str | None, watchdog_s: float | None) -> None:
    n = Notifier.from_env(dict(env))
    assert (n.address, n.watchdog_s) == (address, watchdog_s)


def test_send_is_one_datagram_of_one_line_fields(listener: tuple[Listener, str]) -> None:
    lst, path = listener
    n = Notifier(path)
    assert n.send(READY=1, STATUS="idle;\nserving  x")
    assert lst.drain() == ["READY=1\nSTATUS=idle; serving x"]
    assert Notifier(None).send(READY=1) is False
    gone = Notifier(path + ".missing")
    assert gone.send(WATCHDOG=1) is False  # logged, never raised


def test_abstract_socket(listener: tuple[Listener, str]) -> None:
    name = f"edgeship-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        assert Notifier("@" + name).send(WATCHDOG=1)
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_only_the_owner_pings_and_at_most_every_half_period(listener: tuple[Listener, str]) -> None:
    lst, path = listener
    clock = Clock()
    wd = Watchdog(Notifier(path, watchdog_s=4.0), clock=clock)
    assert wd.interval_s == 2.0
    wd.ready()  # READY=1 and the first ping
    wd.beat()  # not due yet
    assert lst.drain() == ["READY=1\nSTATUS=ready", "WATCHDOG=1"]
    threading.Thread(target=lambda: (setattr(clock, "now", 103.0), wd.beat())).start()  # another thread: nothing
    time.sleep(0.1)
    assert lst.drain() == []
    wd.beat()  # the owner, due
    assert lst.drain() == ["WATCHDOG=1"]


def test_without_a_watchdog_nothing_pings(listener: tuple[Listener, str]) -> None:
    lst, path = listener
    wd = Watchdog(Notifier(path))
    wd.ready()
    wd.beat()
    assert lst.drain() == ["READY=1\nSTATUS=ready"]


def test_a_blocked_main_thread_stops_the_pings(listener: tuple[Listener, str]) -> None:
    """The owner thread waits on a PulseEvent (as the daemon's main thread does) and pings, then blocks in a call
    that does not return: other threads keep looking at the same event, and no ping is sent any more."""
    lst, path = listener
    made, blocked, release = threading.Event(), threading.Event(), threading.Event()
    box: list[PulseEvent] = []

    def main_loop() -> None:
        stop = PulseEvent(Watchdog(Notifier(path, watchdog_s=0.2)))  # owned by this thread
        box.append(stop)
        made.set()
        for _ in range(10):
            stop.wait(0.05)  # healthy waits: a ping every 0.1 s
        blocked.set()
        release.wait(60)  # stands for a native call or a lock that never comes back

    t = threading.Thread(target=main_loop, name="main")
    t.start()
    try:
        assert made.wait(10) and blocked.wait(30)
        assert "WATCHDOG=1" in lst.drain()
        stop = box[0]
        for _ in range(25):  # 0.5 s, five ping periods: other threads look at the flag, nothing pings
            stop.is_set()
            stop.wait(0.02)
        assert lst.drain() == []
    finally:
        release.set()
        t.join()


def test_a_stuck_inference_stops_the_pings_and_a_returned_one_resumes_them(listener: tuple[Listener, str]) -> None:
    lst, path = listener
    clock = Clock()
    running = [0.0]
    wd = Watchdog(Notifier(path, watchdog_s=10.0), longest_running_s=lambda: running[0], clock=clock)
    assert wd.stuck_after_s == 10.0  # WatchdogSec unless given
    wd.status("idle; serving m v1 (onnx); edge-agent 0")
    wd.ready()
    assert lst.drain() == ["STATUS=idle; serving m v1 (onnx); edge-agent 0",
                           "READY=1\nSTATUS=idle; serving m v1 (onnx); edge-agent 0", "WATCHDOG=1"]
    clock.now += 5
    running[0] = 10.5
    wd.beat()
    assert lst.drain() == ["STATUS=unhealthy: an inference has run for 10s; idle; serving m v1 (onnx); edge-agent 0"]
    clock.now += 5
    wd.beat()
    wd.status("check; serving m v1 (onnx); edge-agent 0")
    assert lst.drain() == ["STATUS=unhealthy: an inference has run for 10s; check; serving m v1 (onnx); edge-agent 0"]
    running[0] = 0.0
    wd.beat()
    assert lst.drain() == ["STATUS=check; serving m v1 (onnx); edge-agent 0", "WATCHDOG=1"]
    wd.stopping()
    assert lst.drain() == ["STOPPING=1\nSTATUS=stopping; check; serving m v1 (onnx); edge-agent 0"]


def test_watched_holder_counts_calls_in_flight() -> None:
    clock = Clock()
    holder = WatchedHolder(clock=clock)
    assert holder.longest_running_s() == 0.0
    seen: list[float] = []

    class Session:
        inputs = outputs = ()

        def run(self, feeds: object) -> list[object]:
            clock.now += 7
            seen.append(holder.longest_running_s())
            return []

    from agent.errors import ModelNotReady

    with pytest.raises(ModelNotReady):  # a refused call is counted while it runs and forgotten after
        holder.infer("m", None, {})
    assert holder.longest_running_s() == 0.0
    from agent.serve.holder import LoadedModel

    holder.swap(LoadedModel("m", 1, "onnx", Session()))  # type: ignore[arg-type]
    holder.infer("m", None, {})
    assert seen == [7.0]
    assert holder.longest_running_s() == 0.0


def test_status_line() -> None:
    payload = {"state": "stage", "agent_version": "0.1.0", "serving": {"name": "d", "version": 1, "format": "onnx"},
               "candidate": {"name": "d", "version": 2, "format": "tflite"}}
    assert status_line(payload) == "stage; serving d v1 (onnx); candidate d v2; edge-agent 0.1.0"
    assert status_line({**payload, "state": "idle", "serving": None}) == "idle; serving nothing; edge-agent 0.1.0"


def test_bounded_beats_while_it_waits() -> None:
    beats: list[float] = []
    assert bounded(lambda: time.sleep(2.2) or 5, 30, "work", lambda: beats.append(time.monotonic())) == 5
    assert len(beats) >= 2  # at least every MAX_SLICE_S (1 s)
    with pytest.raises(ValueError):
        bounded(lambda: int("x"), 30, "work")


def test_before_ready_healthy_beats_extend_the_start_timeout(listener: tuple[Listener, str]) -> None:
    lst, path = listener
    clock = Clock()
    wd = Watchdog(Notifier(path, watchdog_s=30.0), clock=clock)
    wd.beat()
    wd.beat()  # the next extension is due in 20 s; the ping in 15 s
    assert lst.drain() == ["EXTEND_TIMEOUT_USEC=60000000", "WATCHDOG=1"]
    clock.now += 20
    wd.beat()
    assert lst.drain() == ["EXTEND_TIMEOUT_USEC=60000000", "WATCHDOG=1"]
    wd.ready()
    clock.now += 40
    wd.beat()
    assert lst.drain() == ["READY=1\nSTATUS=ready", "WATCHDOG=1"]  # started: no more extensions

