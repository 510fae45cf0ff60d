"""CHECK, DOWNLOAD and VERIFY, each run in a short-lived `agent.deploy.fetch_worker` process.

The TUF stack (tuf, securesystemslib, cryptography, requests) and the worker's own MQTT client are never imported
by the daemon: they would stay resident for its whole life for a few seconds of work per deployment. So this module
imports none of them (nor paho); it starts the worker, bounds how long it may run and turns its one JSON answer
(see `agent/deploy/fetch_worker.py`) into typed results:

    client = FetchClient(cfg, stopping=daemon.stopping, connected=lambda: daemon.mqtt is not None)
    client.precheck()                  # IDLE still persisted: runs CHECK's worker, keeps its outcome (or error)
    cand = client.check()              # in CHECK: the precheck's outcome if there is one (consumed), else a worker
    client.remember(cand)              # what CHECK found: DOWNLOAD and VERIFY reuse it (None forgets it)
    cand = client.candidate_for(ref)   # in DOWNLOAD/VERIFY: the remembered one, or a fresh CHECK after a restart
    path = client.download(cand)
    client.verify(cand, Path(ref.path))
    client.last_shadow                 # the shadow bundle the latest CHECK answer named (None: none)
    client.last_rollout                # this device's place in the latest CHECK's rollout (None: no rollout)
    client.fetch_shadow(shadow, release_dir)   # download + verify + unpack it; no deployment state is touched

Errors: the worker's typed errors come back as BundleRejected / TransportError with the worker's reason; anything
else it raised as FetchWorkerError (`type_name` is the worker's class name, which `failure_event` reports); no
answer, a malformed one, a worker that cannot start or runs past its time are TransportError ("fetch_worker",
"timeout"). StopRequested when `stopping` is set while a worker runs (it is killed; the persisted step is retried
after the restart). `precheck()` keeps every outcome for `check()` except StopRequested, which it raises.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.deploy.fetch_worker import config_document
from agent.deploy.machine import BundleRef
from agent.deploy.rollout import Membership
from agent.errors import (
    BundleRejected,
    FetchWorkerError,
    StopRequested,
    TransportError,
    reject_reason,
    transport_reason,
)

log = logging.getLogger(__name__)

FETCH_CONFIG = "fetch-config.json"  # the configuration the fetch worker reads, in the state directory
WORKER_COMMAND = (sys.executable, "-m", "agent.deploy.fetch_worker")
POLL_S = 0.5  # how often a running worker's deadline and the stop request are looked at


@dataclass(frozen=True)
class ShadowCandidate:
    """The bundle the group's signed deployment names as its shadow, as the fetch worker's CHECK reported it."""

    name: str
    version: int
    sha256: str
    chunks: int = 1


@dataclass(frozen=True)
class Candidate:
    """What the group's signed deployment names, as the fetch worker's CHECK reported it."""

    name: str
    version: int
    sha256: str
    chunks: int = 1  # of the signed chunk plan: bounds how long a download may take
    shadow: ShadowCandidate | None = None  # the bundle to run in shadow beside it (agent/telemetry/shadow.py)
    rollout: Membership | None = None  # the rollout that chose it for this device (None: the document has none)


class FetchClient:
    """Runs the fetch worker for one step at a time, from the daemon's main thread only (the worker's
    PR_SET_PDEATHSIG follows the thread that started it, which must live as long as the process)."""

    def __init__(self, cfg: AgentConfig, *, stopping: threading.Event, connected: Callable[[], bool],
                 worker: Sequence[str] = WORKER_COMMAND) -> None:
        """`connected`: whether the daemon has (had) a broker connection; without one and without an HTTP mirror
        a step fails at once. `worker`: the command that runs `agent.deploy.fetch_worker` (tests pass a fake)."""
        self.cfg = cfg
        self.stopping = stopping
        self.connected = connected
        self.worker = tuple(worker)
        self._config: Path | None = None
        self._prechecked: tuple[Candidate | None, Exception | None] | None = None
        self._candidate: Candidate | None = None  # in memory only: CHECK is re-run after a restart
        self.last_shadow: ShadowCandidate | None = None  # what the latest CHECK answer named as the shadow
        self.last_rollout: Membership | None = None  # the latest CHECK answer's rollout membership

    # --- the steps ---------------------------------------------------------------------------------------------

    def precheck(self) -> None:
        """Run CHECK's worker while IDLE is still the persisted state; the next `check()` returns its outcome (or
        raises its error). So a periodic check that finds nothing does not leave IDLE for the worker's start-up
        time; a crash meanwhile restarts in IDLE, which checks at once, just as a restart in CHECK would.
        StopRequested is raised here, not kept: nothing was persisted for this check."""
        try:
            self._prechecked = (self._check_worker(), None)
        except StopRequested:
            self._prechecked = None
            raise
        except Exception as e:
            self._prechecked = (None, e)

    def check(self) -> Candidate | None:
        """The group's deployment (None when none is signed for it: `not_found`, or when this device is outside a
        rollout's wave and nothing else is named for it: then `last_rollout.follows` is "none"), from the precheck
        if one ran since the last check, else from a worker now."""
        pre, self._prechecked = self._prechecked, None
        if pre is None:
            return self._check_worker()
        cand, error = pre
        if error is not None:
            raise error
        return cand

    def remember(self, cand: Candidate | None) -> None:
        """What CHECK found, so that DOWNLOAD and VERIFY of this run need no CHECK of their own."""
        self._candidate = cand

    def candidate_for(self, ref: BundleRef) -> Candidate:
        """The candidate's signed info: from this run's CHECK, or a fresh CHECK after a restart (or when CHECK
        remembered another). BundleRejected("superseded") when the deployment names another bundle now."""
        if self._candidate is None or self._candidate.sha256 != ref.sha256:
            out = self._run("check")
            if out.get("not_in_wave"):
                self.last_rollout, self.last_shadow = Membership.from_json(out.get("rollout")), None
                raise BundleRejected("the deployment no longer names a bundle for this device (outside the "
                                     "rollout's wave)", reason="superseded")
            cand = self._candidate_from(out)
            if cand.sha256 != ref.sha256:
                raise BundleRejected(f"the deployment changed to {cand.name} v{cand.version} meanwhile",
                                     reason="superseded")
            self._candidate = cand
        return self._candidate

    def download(self, cand: Candidate) -> Path:
        """Fetch the candidate's bundle (every chunk checked as it arrives); its path in the state directory."""
        out = self._run("download", cand.sha256, chunks=cand.chunks)
        try:
            return Path(str(out["path"]))
        except KeyError as e:
            raise TransportError(f"the fetch worker's download answer is malformed: no {e}",
                                 reason="fetch_worker") from e

    def verify(self, cand: Candidate, extract_to: Path) -> None:
        """Verify the downloaded bundle against its signed target and this device, extracting it to `extract_to`."""
        self._run("verify", cand.sha256, chunks=cand.chunks, extract_to=extract_to)

    def fetch_shadow(self, shadow: ShadowCandidate, extract_to: Path) -> Path:
        """Download and verify the shadow bundle (every check a candidate gets) and unpack it to `extract_to`;
        returns `extract_to`. Touches no deployment state: call it between deployment steps (from the main
        thread, like every step). BundleRejected "superseded" when the deployment names another shadow now,
        "not_found" when it names none."""
        self._run("shadow", shadow.sha256, chunks=shadow.chunks, extract_to=extract_to)
        return extract_to

    # --- running a worker --------------------------------------------------------------------------------------

    def fetch_timeout(self, chunks: int) -> float:
        """How long one worker may run: connecting (MQTT, then the mirror), the metadata refresh and the deployment
        document, and every chunk of the bundle, each bounded by the configured per-chunk timeout."""
        lim, mq = self.cfg.limits, self.cfg.mqtt
        fetches = 8 + max(1, chunks)
        tries = 2 if self.cfg.mirror.http else 1
        return 5.0 + tries * (mq.connect_timeout_s + fetches * lim.chunk_timeout_s)

    def config_path(self) -> Path:
        """The configuration file the worker reads (written once per FetchClient, atomically)."""
        if self._config is None:
            path = self.cfg.agent.state_dir / FETCH_CONFIG
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(config_document(self.cfg)))
            os.replace(tmp, path)
            self._config = path
        return self._config

    def _check_worker(self) -> Candidate | None:
        try:
            out = self._run("check")
        except BundleRejected as e:
            if e.reason == "not_found":  # no deployment for this group yet
                self.last_shadow, self.last_rollout = None, None
                return None
            raise
        if out.get("not_in_wave"):  # a rollout this device is outside of, with no previous bundle to run
            self.last_shadow, self.last_rollout = None, Membership.from_json(out.get("rollout"))
            return None
        return self._candidate_from(out)

    def _candidate_from(self, out: dict[str, Any]) -> Candidate:
        cand = candidate_from(out)
        self.last_shadow, self.last_rollout = cand.shadow, cand.rollout
        return cand

    def _run(self, step: str, sha256: str | None = None, *, chunks: int = 1,
             extract_to: Path | None = None) -> dict[str, Any]:
        """Run `step` in a worker process and return its answer; its errors are raised here (see the module doc),
        so `failure_event` sees what an in-process step would raise."""
        if not self.connected() and not self.cfg.mirror.http:
            raise TransportError("not connected to the broker")
        # The worker must not outlive this process (a restarted daemon would find it still fetching, under a
        # client id of its own): it watches the read end of this pipe, whose write end only we hold, and on Linux
        # asks for SIGKILL when its parent dies.
        parent_r, parent_w = os.pipe()
        cmd = [*self.worker, "--config", str(self.config_path()), "--step", step,
               "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()),
               "--parent-pid", str(os.getpid()), "--parent-fd", str(parent_r)]
        if sha256 is not None:
            cmd += ["--sha256", sha256]
        if extract_to is not None:
            cmd += ["--extract-to", str(extract_to)]
        timeout = self.fetch_timeout(chunks)
        started = time.monotonic()
        deadline = started + timeout
        try:
            # stderr is inherited: the worker's log lines go where the daemon's go
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, pass_fds=(parent_r,))
        except OSError as e:
            os.close(parent_w)
            raise TransportError(f"could not start the fetch worker: {e}", reason="fetch_worker") from e
        finally:
            os.close(parent_r)
        with proc, _closing_fd(parent_w):
            while True:
                try:
                    stdout, _ = proc.communicate(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if self.stopping.is_set():
                        proc.kill()
                        proc.communicate()
                        raise StopRequested(f"stopped during {step}") from None
                    if time.monotonic() >= deadline:
                        proc.kill()
                        proc.communicate()
                        raise TransportError(f"{step} did not finish within {timeout:g}s", reason="timeout") from None
        log.info("fetch worker %s exited with %s after %.2fs", step, proc.returncode, time.monotonic() - started)
        lines = stdout.decode(errors="replace").strip().splitlines()
        try:
            doc = json.loads(lines[-1]) if lines else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise TransportError(f"the fetch worker for {step} exited with {proc.returncode} and no answer",
                                 reason="fetch_worker")
        if "error" in doc:
            raise worker_error(doc)
        return doc


def candidate_from(out: dict[str, Any]) -> Candidate:
    """The Candidate of a worker's CHECK answer; TransportError("fetch_worker") when it is malformed."""
    try:
        return Candidate(str(out["name"]), int(out["version"]), str(out["sha256"]), int(out.get("chunks", 1)),
                         shadow_from(out.get("shadow")), Membership.from_json(out.get("rollout")))
    except (KeyError, TypeError, ValueError) as e:
        raise TransportError(f"the fetch worker's check answer is malformed: {e}", reason="fetch_worker") from e


def shadow_from(raw: object) -> ShadowCandidate | None:
    """The ShadowCandidate of a CHECK answer's `shadow` (None when absent, null or malformed: a shadow is optional
    and never a reason to refuse the deployment; a worker that predates shadow mode sends none)."""
    if raw is None:
        return None
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"not an object: {raw!r}")
        return ShadowCandidate(str(raw["name"]), int(raw["version"]), str(raw["sha256"]), int(raw.get("chunks", 1)))
    except (KeyError, TypeError, ValueError) as e:
        log.warning("ignoring a malformed shadow in the fetch worker's check answer: %s", e)
        return None


def worker_error(doc: dict[str, Any]) -> Exception:
    """The exception a fetch worker's error document stands for."""
    message, reason, kind = str(doc.get("error", "")), doc.get("reason"), doc.get("kind")
    if kind == "rejected":  # a reason this agent does not know becomes the family's default
        return BundleRejected(message, reason=reject_reason(reason))
    if kind == "transport":
        return TransportError(message, reason=transport_reason(reason))
    # failure_event() reports other errors by the worker's own class name
    name = str(doc.get("type") or reason or "")
    return FetchWorkerError(message, type_name=name if name.isidentifier() else "FetchWorkerError")


@contextlib.contextmanager
def _closing_fd(fd: int) -> Iterator[None]:
    try:
        yield
    finally:
        os.close(fd)
