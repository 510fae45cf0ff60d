"""sd_notify(3) without libsystemd: one datagram per message on the AF_UNIX socket systemd names in NOTIFY_SOCKET.

    notifier = Notifier.from_env()          # reads (and removes) NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID
    notifier.send(READY=1, STATUS="idle")   # "READY=1\nSTATUS=idle"; False (and nothing sent) without a socket
    notifier.watchdog_s                     # systemd's WatchdogSec= for this process, None when it has none

The variables are removed from the environment as sd_notify(unset_environment=1) does, so the processes the agent
starts (fetch workers, runtime probes) never talk to systemd in its name. Outside systemd (no NOTIFY_SOCKET) every
call is a no-op, so `edge-agent run` behaves the same from a shell. Pure stdlib; what is sent when is decided by
agent/watchdog.py and the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import MutableMapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, *, watchdog_s: float | None = None) -> None:
        """`address`: NOTIFY_SOCKET's value (a path, or "@name" for an abstract socket); None sends nothing."""
        self.address = address
        self.watchdog_s = watchdog_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # the main thread and the broker's reconnect thread both send
        self._warned = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> Notifier:
        """The notifier systemd set up for this process: NOTIFY_SOCKET, and WATCHDOG_USEC when WATCHDOG_PID is
        unset or this process's pid (as sd_watchdog_enabled(3)). `unset` removes the three variables."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_s = _watchdog_seconds(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        if address is not None and not (address.startswith("/") or address.startswith("@")):
            log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract socket: not notifying systemd", address)
            address = None
        return cls(address, watchdog_s=watchdog_s if address is not None else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send `KEY=value` lines in one datagram; True when sent. Never raises: a systemd that went away must not
        stop the agent serving (the first failure is logged, later ones at debug level)."""
        if self.address is None:
            return False
        text = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(text.encode(), target)
        except OSError as e:
            log.log(logging.DEBUG if self._warned else logging.WARNING, "sd_notify to %s failed: %s",
                    self.address, e)
            self._warned = True
            return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _watchdog_seconds(usec: str | None, pid: str | None) -> float | None:
    if not usec:
        return None
    try:
        value = int(usec)
        if pid and int(pid) != os.getpid():
            return None  # meant for another process (the variables were inherited)
    except ValueError:
        log.warning("WATCHDOG_USEC %r / WATCHDOG_PID %r are not integers: no watchdog", usec, pid)
        return None
    return value / 1e6 if value > 0 else None


def _one_line(value: object) -> str:
    """A field's value on one line (a STATUS= naming a model must not start a new KEY=)."""
    return " ".join(str(value).split())
