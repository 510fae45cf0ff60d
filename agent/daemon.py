"""`edge-agent run`: the device daemon.

The deployment state machine's decisions are pure (`agent/deploy/machine.py`); this module does each state's work
and returns an event. The rule everywhere: persist the state, then act. So a crash or power cut at any point
restarts into exactly the old or the new model (`serving_after_restart`), and a deployment that keeps killing
the agent is rolled back after `max_restarts` (`on_restart`); a clean stop (SIGTERM, SIGINT) is not counted
(`on_clean_stop`, saved last in `shutdown`).

Threads: the main thread drives the state machine; the HTTP server and paho's network thread serve requests and
only read the one model reference (`ModelHolder`), so inference never waits for a deployment step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__
from agent.bundle import Manifest
from agent.config import AgentConfig, ConfigError
from agent.deploy.fetch_worker import config_document
from agent.deploy.machine import (
    BundleRef,
    DeployState,
    Event,
    State,
    apply,
    begin_check,
    bundles_to_delete,
    failure_event,
    no_deployment,
    on_clean_stop,
    on_restart,
    on_staged,
    on_update_found,
    serving_after_restart,
)
from agent.deploy.stage import DeviceProfile, StagedModel, parity_check, stage_bundle
from agent.deploy.store import StateStore
from agent.errors import BundleRejected, EdgeshipError, TransportError
from agent.serve.holder import LoadedModel, ModelHolder, RequestStats

log = logging.getLogger(__name__)

MAX_BEFORE_CONNECT = 64  # events kept for the broker while it was never reachable yet; later ones are dropped
EXIT_HUNG = 70  # the agent exits when a model hangs it; systemd restarts it and the crash counter decides
FETCH_CONFIG = "fetch-config.json"  # the configuration the fetch worker reads, in the state directory


class ProbationFailed(EdgeshipError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Candidate:
    """What the group's signed deployment names, as the fetch worker's CHECK reported it."""

    name: str
    version: int
    sha256: str
    chunks: int = 1  # of the signed chunk plan: bounds how long a download may take


class FetchStepError(EdgeshipError):
    """An unexpected error in the fetch worker; subclassed per original class name (see `_worker_error`)."""


def release_dir(state_dir: Path, name: str, version: int, sha256: str) -> Path:
    return state_dir / "releases" / f"{name}-{version}-{sha256[:12]}"


def judge_probation(snapshot: dict[str, Any], budget_ms: float, max_error_rate: float, min_requests: int
                    ) -> tuple[str, str] | None:
    """(reason, message) when live figures fail probation; None while they pass. Pure."""
    answered = int(snapshot["ok"]) + int(snapshot["errors"])
    if answered >= min_requests and snapshot["error_rate"] > max_error_rate:
        return "error_rate", (f"error rate {snapshot['error_rate']:.3f} over {answered} requests exceeds "
                              f"{max_error_rate:g}")
    p95 = snapshot.get("p95_ms")
    if snapshot["samples"] >= min_requests and p95 is not None and p95 > budget_ms:
        return "latency", f"p95 latency {p95:.2f} ms exceeds the budget of {budget_ms:g} ms"
    return None


class Daemon:
    def __init__(self, cfg: AgentConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.state_dir = cfg.agent.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore.in_dir(self.state_dir)
        self.clock = clock
        self.stats = RequestStats()
        self.holder = ModelHolder(stats=self.stats, max_batch=cfg.serve.max_batch)
        self.device = DeviceProfile.detect()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.mqtt: Any = None
        self._before_connect: list[tuple[str, dict[str, Any], bool]] = []  # published once connected
        self._before_connect_lock = threading.Lock()
        self._fetch_config: Path | None = None
        self._prechecked: tuple[Candidate | None, Exception | None] | None = None
        self.candidate: Candidate | None = None  # in memory only: CHECK is re-run after a restart
        self.downloaded: Path | None = None
        self.staged: StagedModel | None = None
        self.models: dict[str, LoadedModel] = {}  # sha256 -> loaded, for an instant rollback swap
        self.http: Any = None
        self._infer_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mqtt-infer")
        self._last_state_key: str | None = None  # the retained state last published, but for its timestamps
        self._last_no_update: str | None = None  # the reason of the last transition if it was no_update
        self._warned_no_deployment = False

    # --- persistence and events ------------------------------------------------------------------------------

    def _save(self, old: DeployState, new: DeployState) -> DeployState:
        self.store.save(new)
        if new.last_event is not None and new.last_event is not old.last_event:
            self._emit(old.state, new)
        for ref in bundles_to_delete(old, new):
            self._delete_bundle(ref)  # only after the new state is durable
        return new

    def _emit(self, old_state: State, ds: DeployState, extra: dict[str, Any] | None = None) -> None:
        le = ds.last_event
        assert le is not None
        bundle = ds.candidate or ds.current
        event = {"device": self.cfg.agent.device_id, "from": old_state.value, "to": ds.state.value,
                 "event": le.event.value, "reason": le.reason, "at": le.at,
                 "bundle": None if bundle is None else {"name": bundle.name, "version": bundle.version,
                                                        "sha256": bundle.sha256, "format": bundle.format}}
        if extra:
            event.update(extra)
        # every poll that finds nothing new says the same: log it once, then only when the answer changes
        quiet = le.event is Event.NO_UPDATE and le.reason == self._last_no_update
        self._last_no_update = le.reason if le.event is Event.NO_UPDATE else None
        log.log(logging.DEBUG if quiet else logging.INFO, "%s -> %s (%s%s)", old_state.value, ds.state.value,
                le.event.value, f": {le.reason}" if le.reason else "")
        self._publish(f"devices/{self.cfg.agent.device_id}/events", event, retain=False)
        if _state_key(self._state_payload(ds)) != self._last_state_key:
            self._birth(ds)  # the retained state follows every transition (a periodic no_update changes nothing)

    def _publish(self, leaf: str, payload: dict[str, Any], retain: bool) -> None:
        if self.mqtt is None:  # e.g. start() records the restart's transition before connecting: send it later
            with self._before_connect_lock:
                if self.mqtt is None:
                    if len(self._before_connect) < MAX_BEFORE_CONNECT:
                        self._before_connect.append((leaf, payload, retain))
                    return
        if not self.mqtt.is_connected:
            return
        try:
            self.mqtt.publish(self.mqtt.topics.prefix + leaf, json.dumps(payload).encode(), retain=retain, qos=1,
                              wait=False)
        except EdgeshipError as e:
            log.warning("could not publish %s: %s", leaf, e)

    def _state_payload(self, ds: DeployState, status: str = "online") -> dict[str, Any]:
        cur, cand = ds.current, ds.candidate
        return {
            "status": status, "device": self.cfg.agent.device_id, "group": self.cfg.agent.group,
            "agent_version": __version__, "state": ds.state.value,
            "bundle": None if cur is None else {"name": cur.name, "version": cur.version, "format": cur.format},
            "candidate": None if cand is None else {"name": cand.name, "version": cand.version,
                                                    "format": cand.format},
            "serving": _describe(self.holder.get()),
            # the last check found nothing signed for this group: a mistyped [agent] group shows here
            "no_deployment": no_deployment(ds),
            "since": ds.updated_at,  # when the state machine last moved (None on a fresh device)
            "at": self.clock(),  # when this message was made
        }

    def _birth(self, ds: DeployState, status: str = "online") -> None:
        """The retained `devices/<id>/state` message: at start, on every transition (`_emit`) and at a clean stop;
        also what the client republishes after a reconnect."""
        from agent.transport.mqtt import Will

        payload = self._state_payload(ds, status)
        self._last_state_key = _state_key(payload)
        leaf = f"devices/{self.cfg.agent.device_id}/state"
        if self.mqtt is not None and status == "online":
            self.mqtt.birth = Will(self.mqtt.topics.prefix + leaf, json.dumps(payload).encode(), retain=True, qos=1)
        self._publish(leaf, payload, retain=True)

    def _delete_bundle(self, ref: BundleRef) -> None:
        shutil.rmtree(ref.path, ignore_errors=True)
        (self.state_dir / "bundles" / f"{ref.name}-{ref.version}.bundle").unlink(missing_ok=True)
        self.models.pop(ref.sha256, None)
        log.info("deleted %s v%s", ref.name, ref.version)

    # --- loading models --------------------------------------------------------------------------------------

    def _stage(self, ref: BundleRef, warm_runs: int, timing_runs: int) -> StagedModel:
        path = Path(ref.path)
        manifest = _read_manifest(path)
        result: list[StagedModel] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                result.append(stage_bundle(path, manifest, self.device, threads=self.cfg.deploy.threads,
                                           warmup=warm_runs, timing_runs=timing_runs))
            except BaseException as e:
                errors.append(e)

        worker = threading.Thread(target=work, name="stage", daemon=True)
        worker.start()
        worker.join(self.cfg.deploy.stage_timeout_s)
        if worker.is_alive():
            # A native call that never returns cannot be interrupted from Python: exit, and let the restart
            # counter (persisted before STAGE) roll this bundle back after max_restarts.
            log.critical("staging %s v%s hung for %gs; exiting so the supervisor restarts the agent", ref.name,
                         ref.version, self.cfg.deploy.stage_timeout_s)
            logging.shutdown()
            os._exit(EXIT_HUNG)
        if errors:
            raise errors[0]
        return result[0]

    def _loaded(self, ref: BundleRef, staged: StagedModel) -> LoadedModel:
        model = LoadedModel(ref.name, ref.version, staged.fmt, staged.session, manifest=_read_manifest(Path(ref.path)))
        self.models[ref.sha256] = model
        return model

    def _serve(self, ref: BundleRef | None) -> None:
        if ref is None:
            self.holder.swap(None)
            return
        serving = self.holder.get()
        if serving is not None and serving is self.models.get(ref.sha256):
            return  # already serving it: no swap, the request stats keep their window
        model = self.models.get(ref.sha256)
        if model is None:
            model = self._loaded(ref, self._stage(ref, warm_runs=5, timing_runs=20))
        self.holder.swap(model)

    # --- the state machine -----------------------------------------------------------------------------------

    def step(self, ds: DeployState) -> DeployState:
        """Do the work of `ds.state` and persist the resulting state (one transition)."""
        state = ds.state
        try:
            if state is State.CHECK:
                return self._save(ds, self._check(ds))
            if state is State.DOWNLOAD:
                cand = self._candidate(ds)
                out = self._fetch_step("download", cand.sha256, chunks=cand.chunks)
                self.downloaded = Path(out["path"])
                return self._save(ds, apply(ds, Event.OK, at=self.clock()))
            if state is State.VERIFY:
                cand = self._candidate(ds)
                assert ds.candidate is not None
                self._fetch_step("verify", cand.sha256, chunks=cand.chunks, extract_to=Path(ds.candidate.path))
                return self._save(ds, apply(ds, Event.OK, at=self.clock()))
            if state is State.STAGE:
                assert ds.candidate is not None
                self.staged = self._stage(ds.candidate, warm_runs=20, timing_runs=100)
                new = on_staged(ds, self.staged.fmt, at=self.clock())
                self.store.save(new)
                self._emit(state, new, {"staging": self.staged.to_event()})
                return new
            if state is State.ACTIVATE:
                assert ds.candidate is not None
                model = self._loaded(ds.candidate, self.staged) if self.staged is not None else None
                if model is None:
                    self._serve(ds.candidate)
                else:
                    self.holder.swap(model)
                return self._save(ds, apply(ds, Event.OK, at=self.clock()))
            if state is State.PROBATION:
                self._probation(ds)
                return self._save(ds, apply(ds, Event.PASSED, at=self.clock()))
            if state is State.COMMIT:
                new = self._save(ds, apply(ds, Event.OK, at=self.clock(), keep=self.cfg.deploy.keep))
                # only the serving model stays loaded; a rollback to an older kept bundle reloads it from disk
                self.models = {k: m for k, m in self.models.items() if m is self.holder.get()}
                return new
            if state is State.ROLLBACK:
                self._serve(ds.current)
                self.staged = None
                return self._save(ds, apply(ds, Event.OK, at=self.clock()))
        except ProbationFailed as e:
            self._serve_current_quietly(ds)
            return self._save(ds, apply(ds, Event.FAILED, e.reason, at=self.clock()))
        except Exception as e:
            event, reason = failure_event(state, e)
            log.warning("%s failed: %s (%s)", state.value, e, reason)
            if state is State.CHECK:
                # nothing was being deployed: a failed check is "no update this time", not a rollback
                return self._save(ds, apply(ds, Event.NO_UPDATE, f"check_failed: {reason}", at=self.clock()))
            if state in (State.ACTIVATE,):
                self._serve_current_quietly(ds)
            return self._save(ds, apply(ds, event, reason, at=self.clock()))
        raise AssertionError(f"no work for state {state}")

    def _serve_current_quietly(self, ds: DeployState) -> None:
        try:
            self._serve(ds.current)
        except Exception as e:  # ROLLBACK retries; the candidate keeps serving meanwhile rather than nothing
            log.error("could not reload %s: %s", ds.current, e)

    # --- CHECK, DOWNLOAD and VERIFY: in a short-lived `agent.deploy.fetch_worker` process ---------------------------
    # The TUF stack (tuf, securesystemslib, cryptography, requests) is never imported here: it would stay resident
    # for the daemon's whole life for a few seconds of work per deployment.

    def _fetch_timeout(self, chunks: int) -> float:
        """How long one worker may run: connecting (MQTT, then the mirror), the metadata refresh and the deployment
        document, and every chunk of the bundle, each bounded by the configured per-chunk timeout."""
        lim, mq = self.cfg.limits, self.cfg.mqtt
        fetches = 8 + max(1, chunks)
        tries = 2 if self.cfg.mirror.http else 1
        return 5.0 + tries * (mq.connect_timeout_s + fetches * lim.chunk_timeout_s)

    def _worker_config(self) -> Path:
        if self._fetch_config is None:
            path = self.state_dir / FETCH_CONFIG
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(config_document(self.cfg)))
            os.replace(tmp, path)
            self._fetch_config = path
        return self._fetch_config

    def _fetch_step(self, step: str, sha256: str | None = None, *, chunks: int = 1,
                    extract_to: Path | None = None) -> dict[str, Any]:
        """Run `step` in a worker process and return its result; its errors are raised here as BundleRejected or
        TransportError with the worker's reason, so `failure_event` sees what an in-process step would raise."""
        if self.mqtt is None and not self.cfg.mirror.http:
            raise TransportError("not connected to the broker")
        # The worker must not outlive this process (a restarted daemon would find it still fetching, under a
        # client id of its own): it watches the read end of this pipe, whose write end only we hold, and on Linux
        # asks for SIGKILL when its parent dies. (PR_SET_PDEATHSIG follows the spawning thread: workers are started
        # only from the main thread, which lives as long as the process.)
        parent_r, parent_w = os.pipe()
        cmd = [sys.executable, "-m", "agent.deploy.fetch_worker", "--config", str(self._worker_config()),
               "--step", step,
               "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()),
               "--parent-pid", str(os.getpid()), "--parent-fd", str(parent_r)]
        if sha256 is not None:
            cmd += ["--sha256", sha256]
        if extract_to is not None:
            cmd += ["--extract-to", str(extract_to)]
        timeout = self._fetch_timeout(chunks)
        deadline = time.monotonic() + timeout
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
                    stdout, _ = proc.communicate(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if self.stopping.is_set():
                        proc.kill()
                        proc.communicate()
                        raise SystemExit(0) from None  # the persisted step is retried after the restart
                    if time.monotonic() >= deadline:
                        proc.kill()
                        proc.communicate()
                        raise TransportError(f"{step} did not finish within {timeout:g}s", reason="timeout") from None
        log.info("fetch worker %s exited with %s after %.2fs", step, proc.returncode,
                 timeout - (deadline - time.monotonic()))
        lines = stdout.decode(errors="replace").strip().splitlines()
        try:
            doc = json.loads(lines[-1]) if lines else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise TransportError(f"the fetch worker for {step} exited with {proc.returncode} and no answer",
                                 reason="fetch_worker")
        if "error" in doc:
            raise _worker_error(doc)
        return doc

    def _check_worker(self) -> Candidate | None:
        """The group's deployment (None when there is none yet), from a worker's CHECK."""
        try:
            out = self._fetch_step("check")
        except BundleRejected as e:
            if e.reason == "not_found":  # no deployment for this group yet
                return None
            raise
        return _candidate_from(out)

    def _precheck(self) -> None:
        """A due check's worker runs while IDLE is still the persisted state; CHECK's step then only applies its
        outcome. So a periodic check that finds nothing does not leave IDLE for the worker's start-up time; a crash
        meanwhile restarts in IDLE, which checks at once, just as a restart in CHECK would."""
        try:
            self._prechecked = (self._check_worker(), None)
        except Exception as e:
            self._prechecked = (None, e)

    def _check(self, ds: DeployState) -> DeployState:
        pre, self._prechecked = self._prechecked, None
        if pre is None:
            cand = self._check_worker()
        elif pre[1] is not None:
            raise pre[1]
        else:
            cand = pre[0]
        group = self.cfg.agent.group
        if cand is None:
            if not self._warned_no_deployment:  # once, and again only after a deployment was found meanwhile
                log.warning("no deployment is signed for group %r (deployments/%s.json): nothing to deploy; "
                            "check [agent] group", group, group)
                self._warned_no_deployment = True
            return on_update_found(ds, None, at=self.clock())
        if self._warned_no_deployment:
            log.info("group %r has a deployment now: %s v%s", group, cand.name, cand.version)
            self._warned_no_deployment = False
        self.candidate, self.downloaded, self.staged = cand, None, None
        ref = BundleRef(cand.name, cand.version, cand.sha256,
                        str(release_dir(self.state_dir, cand.name, cand.version, cand.sha256)))
        return on_update_found(ds, ref, at=self.clock())

    def _candidate(self, ds: DeployState) -> Candidate:
        """The candidate's signed info: from this run's CHECK, or a fresh CHECK after a restart."""
        assert ds.candidate is not None
        if self.candidate is None or self.candidate.sha256 != ds.candidate.sha256:
            cand = _candidate_from(self._fetch_step("check"))
            if cand.sha256 != ds.candidate.sha256:
                raise BundleRejected(f"the deployment changed to {cand.name} v{cand.version} meanwhile",
                                     reason="superseded")
            self.candidate = cand
        return self.candidate

    def _probation(self, ds: DeployState) -> None:
        """Watch the candidate serve: error rate, p95 against the manifest's budget, a golden parity probe that
        also catches a hung model. Returns when it passed; raises ProbationFailed."""
        d = self.cfg.deploy
        assert ds.candidate is not None
        model = self.holder.get()
        path = Path(ds.candidate.path)
        manifest = _read_manifest(path)
        budget = manifest.latency_budget_ms
        golden = _golden_rows(path, manifest, ds.candidate.format or "")
        start = time.monotonic()
        next_probe = start
        while not self.stopping.is_set():
            snap = self.stats.snapshot()
            verdict = judge_probation(snap, budget, d.max_error_rate, d.min_requests_for_rate)
            if verdict is not None:
                raise ProbationFailed(verdict[1], verdict[0])
            if time.monotonic() >= next_probe and model is not None and golden is not None:
                self._probe(model, golden, manifest, budget)
                next_probe = time.monotonic() + 2.0
            if time.monotonic() - start >= d.probation_s or snap["count"] >= d.probation_requests > 0:
                break
            self.stopping.wait(0.2)
        if self.stopping.is_set():
            raise SystemExit(0)  # persisted PROBATION resumes after the restart
        if model is not None and golden is not None:
            self._probe(model, golden, manifest, budget)

    def _probe(self, model: LoadedModel, golden: tuple[dict[str, np.ndarray], list[np.ndarray]], manifest: Any,
               budget_ms: float) -> None:
        inputs, expected = golden
        box: list[Any] = []
        worker = threading.Thread(target=lambda: box.append(_run_safely(model, inputs)), daemon=True)
        worker.start()
        worker.join(max(5.0, 50 * budget_ms / 1000.0))
        if worker.is_alive():
            raise ProbationFailed("the model did not answer a golden probe: hung", "hang")
        out = box[0]
        if isinstance(out, BaseException):
            raise ProbationFailed(f"golden probe failed: {out}", "error")
        result = parity_check(manifest.parity, expected, out)
        if not result.passed:
            raise ProbationFailed(f"golden parity failed while serving: {result.detail}", "parity")

    # --- running ---------------------------------------------------------------------------------------------

    def start(self) -> DeployState:
        """Recover from whatever the last run left, start serving, connect."""
        self.check_listen()
        ds = self.store.load()
        recovered = on_restart(ds, at=self.clock(), max_restarts=self.cfg.deploy.max_restarts)
        if recovered is not ds:
            self._save(ds, recovered)
        ds = recovered
        serving = serving_after_restart(ds)
        try:
            self._serve(serving)
        except Exception as e:
            log.error("could not load %s after restart: %s", serving, e)
            if ds.candidate is not None and serving == ds.candidate and ds.state is not State.ROLLBACK:
                ds = self._save(ds, apply(ds, Event.FAILED, "load_failed", at=self.clock()))
                self._serve_current_quietly(ds)
        self._start_http(ds)
        self._connect()
        return ds

    def _listen_address(self) -> tuple[str, int]:
        host, _, port = self.cfg.serve.http.rpartition(":")
        try:
            number = int(port)
            if not 0 <= number <= 65535:
                raise ValueError(port)
        except ValueError:
            raise ConfigError(f"[serve] http {self.cfg.serve.http!r}: expected HOST:PORT") from None
        return host.strip("[]") or "127.0.0.1", number

    def check_listen(self) -> None:
        """Refuse to start (ConfigError) when the [serve] http address cannot be bound, before the persisted state
        is touched: a busy port is a configuration mistake, not a crash to count against a deployment."""
        host, port = self._listen_address()
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise ConfigError(f"[serve] http {host}:{port}: {e.strerror or e}") from e
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is fine
            try:
                probe.bind(address)
            except OSError as e:
                raise ConfigError(f"[serve] http {host}:{port}: cannot listen ({e.strerror or e})") from e

    def _start_http(self, ds: DeployState) -> None:
        from agent.serve.http import InferenceServer, ListenError

        host, port = self._listen_address()
        self.http = InferenceServer(self.holder, self.stats, host, port)
        try:
            self.http.start()
        except ListenError as e:  # taken since check_listen(): not the model's fault, so not counted as a crash
            self.store.save(on_clean_stop(ds))
            raise ConfigError(f"[serve] http: {e}") from e
        log.info("serving OIP v2 on http://%s:%d", host, self.http.port)

    def _new_client(self) -> Any:
        from agent.transport.mqtt import MqttClient, Will
        from agent.transport.topics import Topics

        dev = self.cfg.agent.device_id
        topics = Topics(self.cfg.topic_prefix)
        will = Will(topics.prefix + f"devices/{dev}/state",
                    json.dumps({"status": "offline", "device": dev}).encode(), retain=True, qos=1)
        return MqttClient(self.cfg.mqtt.url, f"edge-agent-{dev}", prefix=topics,
                          ca_file=self.cfg.mqtt.ca_file or None, will=will)

    def _connect(self) -> None:
        client = self._new_client()
        try:
            client.connect(timeout=self.cfg.mqtt.connect_timeout_s)
        except TransportError as e:
            # paho reconnects on its own only after a first successful connect: until then, retry here
            log.warning("broker unreachable (%s); serving locally, retrying in the background", e)
            threading.Thread(target=self._connect_later, name="mqtt-connect", daemon=True).start()
            return
        self._attach(client)

    def _connect_later(self) -> None:
        delay = 1.0
        while not self.stopping.wait(delay):
            client = self._new_client()
            try:
                client.connect(timeout=self.cfg.mqtt.connect_timeout_s)
                self._attach(client)
            except TransportError as e:
                client.close()
                log.debug("broker still unreachable: %s", e)
                delay = min(2 * delay, 30.0)
                continue
            log.info("connected to the broker")
            self._birth(self.store.load())
            self.wake.set()  # check for a deployment now
            return

    def _attach(self, client: Any) -> None:
        """Use a connected client: subscribe, send what was recorded before, serve MQTT requests."""
        topics, dev = client.topics, self.cfg.agent.device_id
        self._notify_sub = client.subscribe_stream([topics.notify])
        self._infer_sub = client.subscribe_stream([topics.prefix + f"devices/{dev}/infer/request"])
        with self._before_connect_lock:
            self.mqtt = client
            pending, self._before_connect = self._before_connect, []
        for leaf, payload, retain in pending:
            self._publish(leaf, payload, retain)
        threading.Thread(target=self._notify_loop, name="notify", daemon=True).start()
        threading.Thread(target=self._infer_loop, name="mqtt-infer", daemon=True).start()

    def _notify_loop(self) -> None:
        sub = self._notify_sub
        if sub is None:
            return
        for _msg in sub:
            self.wake.set()  # a poke only: what to run is decided from signed metadata

    def _infer_loop(self) -> None:
        from agent.serve.mqtt import MqttInference

        sub = self._infer_sub
        if sub is None:
            return
        client = self.mqtt

        def publish(topic: str, body: bytes, correlation: bytes | None) -> None:
            client.publish(topic, body, retain=False, qos=1, wait=False, correlation_data=correlation)

        # which response topics are answered, and the refusals' log: agent/serve/mqtt.py
        self._answerer = MqttInference(self.holder, self.stats, publish, client.topics.prefix,
                                       self.cfg.agent.device_id)
        for msg in sub:
            self._infer_pool.submit(self._answer, msg)

    def _answer(self, msg: Any) -> None:
        self._answerer.answer(msg)  # never raises; logs what went wrong

    def run(self) -> int:
        ds = self.start()
        self._birth(ds)
        ds = self.drive(ds)
        next_check = time.monotonic()
        while not self.stopping.is_set():
            timeout = max(0.0, next_check - time.monotonic())
            if self.wake.wait(timeout) or time.monotonic() >= next_check:
                self.wake.clear()
                if self.stopping.is_set():
                    break
                if ds.state is State.IDLE:
                    try:
                        self._precheck()
                    except SystemExit:  # a stop request ended the worker: nothing was persisted for it
                        if not self.stopping.is_set():
                            raise
                        break
                    ds = begin_check(ds, at=self.clock())
                ds = self.drive(ds)
                next_check = time.monotonic() + self.cfg.deploy.poll_interval_s
        self.shutdown(ds)
        return 0

    def drive(self, ds: DeployState) -> DeployState:
        """Run transitions until the machine rests in IDLE (or the agent is asked to stop)."""
        self.store.save(ds)  # persist, then act
        while ds.state is not State.IDLE and not self.stopping.is_set():
            try:
                ds = self.step(ds)
            except SystemExit:
                if not self.stopping.is_set():
                    raise
                break  # a stop request ended probation early: shut down cleanly; PROBATION resumes after restart
        return ds

    def shutdown(self, ds: DeployState) -> None:
        """The normal stop (SIGTERM, SIGINT): `ds` is the last state `drive` persisted."""
        self._birth(ds, status="offline")  # a clean disconnect does not fire the last will
        if self.http is not None:
            self.http.stop()
        if self.mqtt is not None:
            self.mqtt.close()
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        # Last, once nothing serves: a model that crashes the agent before this point still counts as a crash.
        try:
            self.store.save(on_clean_stop(ds))
        except OSError as e:  # the next start then counts this stop as a crash: the safe side
            log.warning("could not record the clean stop: %s", e)
            return
        log.info("stopped cleanly in %s; the next start does not count as a restart", ds.state.value)

    def request_stop(self, *_: object) -> None:
        self.stopping.set()
        self.wake.set()


@contextlib.contextmanager
def _closing_fd(fd: int) -> Iterator[None]:
    try:
        yield
    finally:
        os.close(fd)


def _read_manifest(release: Path) -> Manifest:
    try:
        return Manifest.from_json(json.loads((release / "manifest.json").read_text()))
    except (OSError, ValueError) as e:
        raise BundleRejected(f"release {release.name} is unreadable: {e}", reason="unreadable") from e


def _candidate_from(out: dict[str, Any]) -> Candidate:
    try:
        return Candidate(str(out["name"]), int(out["version"]), str(out["sha256"]), int(out.get("chunks", 1)))
    except (KeyError, TypeError, ValueError) as e:
        raise TransportError(f"the fetch worker's check answer is malformed: {e}", reason="fetch_worker") from e


def _worker_error(doc: dict[str, Any]) -> Exception:
    """The exception a fetch worker's error document stands for."""
    message, reason, kind = str(doc.get("error", "")), str(doc.get("reason", "")), doc.get("kind")
    if kind == "rejected":
        return BundleRejected(message, reason=reason or "invalid")
    if kind == "transport":
        return TransportError(message, reason=reason or "transport")
    # failure_event() reports other errors by class name: keep the worker's
    name = str(doc.get("type") or reason or "FetchStepError")
    cls = type(name if name.isidentifier() else "FetchStepError", (FetchStepError,), {})
    return cls(message)


def _run_safely(model: LoadedModel, inputs: dict[str, np.ndarray]) -> Any:
    try:
        return model.session.run(inputs)
    except Exception as e:
        return e


def _golden_rows(path: Path, manifest: Any, fmt: str) -> tuple[dict[str, np.ndarray], list[np.ndarray]] | None:
    try:
        with np.load(path / "golden.npz", allow_pickle=False) as g:
            inputs = {t.name: g[f"input.{t.name}"][:8] for t in manifest.inputs}
            outputs = []
            i = 0
            while f"{fmt}.output.{i}" in g.files:
                outputs.append(g[f"{fmt}.output.{i}"][:8])
                i += 1
    except (OSError, KeyError, ValueError) as e:
        log.warning("no golden rows for probation probes: %s", e)
        return None
    return (inputs, outputs) if outputs else None


def _state_key(payload: dict[str, Any]) -> str:
    """What makes a state message news: everything but its timestamps."""
    return json.dumps({k: v for k, v in payload.items() if k not in ("at", "since")}, sort_keys=True)


def _describe(model: LoadedModel | None) -> dict[str, Any] | None:
    return None if model is None else {"name": model.name, "version": model.version, "format": model.fmt}


def run_daemon(cfg: AgentConfig) -> int:
    daemon = Daemon(cfg)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    return daemon.run()
