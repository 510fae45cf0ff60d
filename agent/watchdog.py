"""How the agent notices it is hung, and tells systemd (systemd/edge-agent.service: Type=notify, WatchdogSec=).

- `WatchedHolder`: the ModelHolder every inference goes through, counting the calls in flight and since when;
- `Watchdog`: READY=1, STATUS= lines and STOPPING=1 through agent/sdnotify.py, and WATCHDOG=1 sent *from the main
  thread only*, at most every half WatchdogSec, and only while no inference has been running for longer than
  `stuck_after_s` (WatchdogSec unless given). So a main loop that hangs (a native call that never returns, a
  deadlock) or a stuck inference stops the pings, and systemd kills and restarts the agent (Restart=on-failure);
  a crash during a deployment counts against it like any crash (docs/agent.md);
- `PulseEvent`: the daemon's stop flag. Every wait of the main thread is bounded and looks at it often (the fetch
  worker's poll, probation's poll, the main loop); each look from the main thread is a `beat()`, so healthy waits
  ping and nothing else has to know about systemd;
- `bounded`: staging in a thread bounded by [deploy] stage_timeout_s (beating while it waits): a native call that
  never returns cannot be interrupted from Python, so the agent exits with EXIT_HUNG and the restart counter decides.

Without NOTIFY_SOCKET (not under systemd) nothing is sent and only `bounded` and the in-flight count do anything.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from agent.sdnotify import Notifier
from agent.serve.holder import InferResult, ModelHolder

log = logging.getLogger(__name__)

EXIT_HUNG = 70  # the agent exits when a model hangs it; systemd restarts it and the crash counter decides
MAX_SLICE_S = 1.0  # a bounded wait looks at the watchdog at least this often
EXTEND_START_S = 60.0  # before READY=1, each healthy beat (at most every 20 s) extends systemd's start timeout this far
T = TypeVar("T")


class WatchedHolder(ModelHolder):
    """A ModelHolder that knows which inference calls are running and since when (monotonic seconds)."""

    def __init__(self, *args: Any, clock: Callable[[], float] = time.monotonic, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = clock
        self._inflight: dict[int, float] = {}
        self._inflight_lock = threading.Lock()
        self._next_id = 0

    def infer(self, *args: Any, **kwargs: Any) -> InferResult:
        """ModelHolder.infer, counted while it runs."""
        with self._inflight_lock:
            call, self._next_id = self._next_id, self._next_id + 1
            self._inflight[call] = self._clock()
        try:
            return super().infer(*args, **kwargs)
        finally:
            with self._inflight_lock:
                del self._inflight[call]

    def longest_running_s(self) -> float:
        """How long the oldest inference still running has run (0.0 when none runs)."""
        with self._inflight_lock:
            oldest = min(self._inflight.values(), default=None)
        return 0.0 if oldest is None else self._clock() - oldest


class Watchdog:
    def __init__(self, notifier: Notifier, *, longest_running_s: Callable[[], float] = lambda: 0.0,
                 stuck_after_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 owner: threading.Thread | None = None) -> None:
        """`owner`: the thread whose beats count (the main thread; default: the one constructing this).
        `longest_running_s`: WatchedHolder's; `stuck_after_s`: an inference running longer is stuck."""
        self.notifier = notifier
        self.watchdog_s = notifier.watchdog_s
        self.interval_s = self.watchdog_s / 2 if self.watchdog_s else MAX_SLICE_S  # sd_watchdog_enabled(3)
        self.stuck_after_s = stuck_after_s if stuck_after_s is not None else (self.watchdog_s or 0.0)
        self.longest_running_s = longest_running_s
        self.clock = clock
        self.owner = owner or threading.current_thread()
        self._next_ping = 0.0
        self._next_extend = 0.0
        self._ready = False
        self._status = ""
        self._unhealthy: str | None = None

    def ready(self) -> None:
        """Start-up is done: the HTTP server listens and the persisted model (if any) serves."""
        self._ready = True
        self.notifier.send(READY=1, STATUS=self._status or "ready")
        self.beat()

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self.notifier.send(STATUS=status if self._unhealthy is None else f"{self._unhealthy}; {status}")

    def stopping(self) -> None:
        self.notifier.send(STOPPING=1, STATUS=f"stopping; {self._status}")

    def beat(self) -> None:
        """From the main thread: WATCHDOG=1 when one is due and the agent is healthy. Cheap; any other thread's
        call does nothing."""
        if threading.current_thread() is not self.owner:
            return
        now = self.clock()
        if not self._ready and self.notifier.enabled and now >= self._next_extend:
            # starting (loading the persisted model, maybe probing its runtime first: each bounded by
            # stage_timeout_s): a healthy main thread keeps TimeoutStartSec= from running out
            self.notifier.send(EXTEND_TIMEOUT_USEC=int(EXTEND_START_S * 1e6))
            self._next_extend = now + EXTEND_START_S / 3
        if self.watchdog_s is None:
            return
        if now < self._next_ping:
            return
        running = self.longest_running_s()
        if self.stuck_after_s > 0 and running > self.stuck_after_s:
            if self._unhealthy is None:
                self._unhealthy = f"unhealthy: an inference has run for {running:.0f}s"
                log.critical("%s (over %gs): no more watchdog pings, systemd will restart the agent",
                             self._unhealthy, self.stuck_after_s)
                self.notifier.send(STATUS=f"{self._unhealthy}; {self._status}")
            return
        if self._unhealthy is not None:  # the call returned after all: pinging again
            log.warning("the stuck inference returned: watchdog pings resume")
            self._unhealthy = None
            self.notifier.send(STATUS=self._status)
        self.notifier.send(WATCHDOG=1)
        self._next_ping = now + self.interval_s

    def link(self, inner: Any) -> StatusLink:
        """`inner` (the daemon's MqttLink) with every retained-state update also sent as STATUS=."""
        return StatusLink(inner, self)


class StatusLink:
    """The deployer's Link (agent/deploy/driver.py): passes everything on, and turns each state update into a
    STATUS= line: "<state>; serving <name> v<version> (<format>)[; candidate ...]; edge-agent <version>"."""

    def __init__(self, inner: Any, watchdog: Watchdog) -> None:
        self.inner = inner
        self.watchdog = watchdog

    def event(self, payload: dict[str, Any]) -> None:
        self.inner.event(payload)

    def state(self, payload: dict[str, Any], *, online: bool) -> None:
        self.inner.state(payload, online=online)
        if online:
            self.watchdog.status(status_line(payload))


def status_line(payload: dict[str, Any]) -> str:
    """The STATUS= text of a retained state message (Deployer.state_payload). Pure."""
    serving = payload.get("serving")
    parts = [str(payload.get("state")),
             "serving nothing" if not serving else f"serving {serving['name']} v{serving['version']} "
                                                   f"({serving['format']})"]
    cand = payload.get("candidate")
    if cand and payload.get("state") != "idle":
        parts.append(f"candidate {cand['name']} v{cand['version']}")
    parts.append(f"edge-agent {payload.get('agent_version')}")
    return "; ".join(parts)


class PulseEvent(threading.Event):
    """A threading.Event whose every look from the watchdog's owner thread (`is_set`, `wait`) beats it; `wait`
    then waits in slices of at most the ping interval."""

    def __init__(self, watchdog: Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def is_set(self) -> bool:
        self.watchdog.beat()
        return super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread() is not self.watchdog.owner:
            return super().wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.watchdog.beat()
            step = self.watchdog.interval_s
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    return super().is_set()
            if super().wait(step):
                return True


def bounded(work: Callable[[], T], timeout_s: float, what: str, beat: Callable[[], None] = lambda: None) -> T:
    """`work()` in a thread, waited for at most `timeout_s` (calling `beat` at least every MAX_SLICE_S meanwhile):
    a native call that hangs exits the agent (EXIT_HUNG)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=run, name="stage", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    while worker.is_alive() and (left := deadline - time.monotonic()) > 0:
        beat()
        worker.join(min(left, MAX_SLICE_S))
    if worker.is_alive():
        log.critical("%s hung for %gs; exiting so the supervisor restarts the agent", what, timeout_s)
        logging.shutdown()
        os._exit(EXIT_HUNG)
    if errors:
        raise errors[0]
    return result[0]
