"""The demo's child processes, and their cleanup whichever way the demo ends: at the end, on an error, on Ctrl-C
(SIGINT), SIGTERM or SIGHUP (a closed terminal).

Every child runs in its own session and process group (`start_new_session`), so a Ctrl-C in the terminal reaches
the demo alone, and the demo stops its children in order (the agents before the broker they report to) instead of
everything dying at once; stopping a child signals its whole group, so whatever the child started itself (an
agent's runtime probe, say) goes with it. `stop_all` sends SIGTERM, waits, then SIGKILLs what is left.

The one thing this cannot clean up after is a SIGKILL of the demo itself: nothing runs in a killed process.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_TIMEOUT_S = 20.0  # an agent stops within a few seconds (systemd's TimeoutStopSec is the bound that matters)


class Interrupted(Exception):
    """A stop signal arrived; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StepFailed(Exception):
    """A foreground command exited with a status it should not have."""


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside: SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread (so `finally` blocks run);
    the previous handlers come back on the way out."""

    def raise_interrupted(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """While inside (the cleanup): stop signals are ignored, so a second Ctrl-C cannot cut the cleanup short; it
    is bounded anyway (SIGKILL after STOP_TIMEOUT_S)."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child has exited, without reaping it: while it is an unreaped zombie its pid, and so its process
    group's id, cannot be handed to another process, which keeps `_signal_group` from ever hitting a stranger."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped behind our back
        return True


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """`sig` to the child's process group (its pgid is its pid: it leads its own session). Only while the child is
    not reaped (`proc.returncode` is None): then the group id is still ours."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class Children:
    """The processes the demo started, in start order. Not thread-safe: the demo's main thread owns it."""

    def __init__(self, stop_timeout: float = STOP_TIMEOUT_S) -> None:
        self.stop_timeout = stop_timeout
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    @property
    def running(self) -> list[str]:
        """The names of the children that have not exited."""
        return [name for name, p in self._procs if not _exited(p)]

    def pids(self) -> list[int]:
        return [p.pid for _, p in self._procs]

    def start(self, name: str, cmd: Sequence[object], *, log: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A background child; its stdout and stderr go to `log` (or nowhere)."""
        out: IO[bytes] | int = log.open("ab") if log is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env)
        finally:
            if not isinstance(out, int):
                out.close()  # the child holds its own copy
        self._procs.append((name, proc))
        return proc

    def run(self, cmd: Sequence[object], *, ok: Sequence[int] = (0,), echo: bool = True,
            env: dict[str, str] | None = None) -> tuple[int, str]:
        """A foreground child: its stdout is printed line by line as it comes (when `echo`) and returned with the
        exit status; its stderr goes to ours. StepFailed when the status is not in `ok`. An interrupt while it runs
        leaves it registered, so `stop_all` stops it."""
        args = [str(c) for c in cmd]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
                                env=env)
        self._procs.append((Path(args[0]).name, proc))
        lines: list[str] = []
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped yet
        _signal_group(proc, signal.SIGKILL)  # anything it left behind in its group
        code = proc.wait()
        proc.stdout.close()
        self._procs.remove((Path(args[0]).name, proc))
        if code not in ok:
            raise StepFailed(f"exit status {code}: {shlex.join(args)}")
        return code, "".join(lines)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop one child (and its group): SIGTERM, then SIGKILL after the timeout."""
        self._stop([p for p in self._procs if p[1] is proc])

    def stop_all(self) -> None:
        """Stop every child, the latest started first, and forget them. Safe to call more than once."""
        with stop_signals_ignored():
            self._stop(list(reversed(self._procs)))

    def _stop(self, entries: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
        for _, proc in entries:
            if not _exited(proc):
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for entry in entries:
            proc = entry[1]
            while not _exited(proc) and time.monotonic() < deadline:
                time.sleep(0.02)
            _signal_group(proc, signal.SIGKILL)  # what the child left in its group, or the child after the timeout
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            self._procs.remove(entry)
