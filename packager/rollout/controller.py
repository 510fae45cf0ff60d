"""The rollout loop: sign each wave's deployment document, watch the fleet, judge the gates over the soak window,
then advance, pause (saying why) or abort (signing the document that returns the group to the previous version).

I/O lives here; the decisions are pure (gates.py, figures.py, planner.py). The state is saved before and after
every document is signed (state.py), so a controller killed at any point resumes at the wave it had reached and
signs again, idempotently, whatever it may not have pushed. A resumed wave's soak starts again: the controller
vouches only for what it watched itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.deploy.machine import NOT_BLAMED
from agent.transport.mqtt import MqttClient
from agent.transport.topics import Topics
from packager import devices, tuf_repo
from packager import publish as pub
from packager.errors import InputError
from packager.fleet.view import FleetView
from packager.rollout import state as st
from packager.rollout.figures import DeviceWindow, figures
from packager.rollout.gates import Gate, evaluate_all, parse_gates
from packager.rollout.planner import Decision, decide, split

log = logging.getLogger(__name__)

TICK_S = 0.5  # how often the gates are judged and a request file looked for
DEPLOY_TIMEOUT_S = 600.0  # a wave whose online canary devices do not all serve the new version by then pauses
STATUS_EVERY_S = 5.0  # the retained status is republished at least this often while running
EXIT_DONE = 0
EXIT_ABORTED = 3
ROLLBACK_EVENTS = ("failed", "crash_loop")  # a device's own verdict; `aborted` is a transport failure

Emit = Callable[[st.RolloutState], None]


def _bundle_for(repo: Path, version: int, name: str | None) -> tuple[str, str, str]:
    """(target path, name, sha256) of the signed bundle of `version` (of `name` when known)."""
    candidates = [(p, tf) for p, tf in tuf_repo.referenced_targets(repo).items()
                  if p.startswith("bundles/") and tf.custom.get("version") == version
                  and (name is None or tf.custom.get("name") == name)]
    if not candidates:
        which = f"{name} v{version}" if name else f"version {version}"
        raise InputError(f"no signed bundle of {which} in {repo}: `packager publish BUNDLE` (without --group) first")
    if len(candidates) > 1:
        raise InputError(f"several signed bundles have version {version}: "
                         f"{', '.join(p for p, _ in candidates)}; deploy one to the group first")
    path, tf = candidates[0]
    return path, str(tf.custom["name"]), tf.hashes["sha256"]


def _previous(doc: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """What the group runs now, as the rollout's `previous`; InputError when a rollout there is unfinished."""
    if doc is None:
        return None
    rollout = doc.get("rollout")
    if isinstance(rollout, dict) and rollout.get("state") == "rolling":
        raise InputError(f"group {doc.get('group')} is in rollout {rollout.get('id')!r}: finish or abort it first")
    if isinstance(rollout, dict) and rollout.get("state") == "aborted":
        prev = rollout.get("previous")
        return dict(prev) if isinstance(prev, dict) else None
    return {"bundle": doc.get("bundle"), "name": doc.get("name"), "version": doc.get("version")}


def prepare(repo: Path, name: str, *, version: int, group: str, fleet: str, waves: tuple[float, ...],
            soak_s: float, gate: str, min_devices: int, min_requests: int) -> st.RolloutState:
    """The rollout's state: loaded when `name` exists with the same plan (a resume), else a new one, saved.
    Everything is checked before anything is signed."""
    parse_gates(gate)
    st.check_name(name)
    plan = {"group": group, "fleet": fleet, "version": version, "waves": list(waves), "soak_s": soak_s,
            "gate": gate, "min_devices": min_devices, "min_requests": min_requests}
    existing = st.load(repo, name)
    if existing is not None:
        if existing.plan() != plan:
            diff = ", ".join(k for k in plan if plan[k] != existing.plan()[k])
            raise InputError(f"rollout {name!r} exists with another plan ({diff} differ): "
                             "rerun it with the same arguments to resume, or use another name")
        return existing
    doc = pub.current_deployment(repo, group)
    deployed_name = doc.get("name") if doc is not None and isinstance(doc.get("name"), str) else None
    bundle, bundle_name, sha256 = _bundle_for(repo, version, deployed_name)
    previous = _previous(doc, bundle_name)
    if previous is not None and previous.get("version") == version and previous.get("name") == bundle_name:
        raise InputError(f"group {group} already runs {bundle_name} v{version}")
    state = st.RolloutState(name=name, group=group, fleet=fleet, bundle=bundle, bundle_name=bundle_name,
                            version=version, sha256=sha256, previous=previous, waves=list(waves), soak_s=soak_s,
                            gate=gate, min_devices=min_devices, min_requests=min_requests)
    state.note("rolling", f"created; previous {previous['name']} v{previous['version']}" if previous
               else "created; no previous deployment")
    st.save(repo, state)
    return state


def rollout_entry(state: st.RolloutState) -> dict[str, Any]:
    """The document's `rollout` entry (docs/rollouts.md, agent/deploy/rollout.py reads it)."""
    doc_state = state.document_state
    return {"id": state.rollout_id, "wave": state.wave, "waves": state.waves,
            "percent": 100.0 if doc_state == "done" else state.percent, "previous": state.previous,
            "state": doc_state, "reverted_by_controller": doc_state == "aborted"}


def status_json(state: st.RolloutState, repo: Path | None = None) -> dict[str, Any]:
    out = {"name": state.name, "group": state.group, "fleet": state.fleet, "bundle": state.bundle,
           "version": state.version, "previous": state.previous, "wave": state.wave, "waves": state.waves,
           "percent": state.percent, "status": state.status, "reason": state.reason, "figures": state.figures,
           "rolled_back": state.rolled_back, "updated_at": state.updated_at}
    if repo is not None:
        out["pending_request"] = st.pending_request(repo, state.name)
        out["controller_running"] = st.controller_running(repo, state.name)
    return out


class Controller:
    def __init__(self, repo: Path, state: st.RolloutState, client: MqttClient, *, emit: Emit | None = None,
                 clock: Callable[[], float] = time.time, tick_s: float = TICK_S) -> None:
        self.repo, self.state, self.client = repo, state, client
        self.topics: Topics = pub.topics_for(state.fleet)
        self.gates: tuple[Gate, ...] = parse_gates(state.gate)
        # with a device registry, groups are the registry's: a device cannot join another group's rollout by saying so
        self.view = FleetView(self.topics.prefix, devices.group_registry(repo))
        self.windows: dict[str, DeviceWindow] = {}
        self.emit = emit or (lambda s: None)
        self.clock, self.tick_s = clock, tick_s
        self._status_sent = 0.0
        self._last_decision: Decision | None = None

    # -- signing and reporting ---------------------------------------------------------------------------------

    def _save(self) -> None:
        st.save(self.repo, self.state)

    def _sign(self) -> None:
        """Sign and push the document the state wants, unless it was already (idempotent either way)."""
        if self.state.signed == self.state.wanted:
            return
        version = pub.deploy(self.repo, self.state.group, self.state.bundle, rollout_entry(self.state),
                             self.client, self.topics)
        log.info("signed %s wave %d (%s), timestamp v%d", self.state.group, self.state.wave,
                 self.state.document_state, version)
        self.state.signed = self.state.wanted
        self._save()

    def _publish_status(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._status_sent < STATUS_EVERY_S:
            return
        self._save()  # the latest figures, for `rollout status` from another terminal
        payload = json.dumps(status_json(self.state), sort_keys=True).encode()
        self.client.publish(self.topics.rollout(self.state.group), payload, retain=True, wait=True, timeout=15)
        self._status_sent = now

    def _transition(self, status: st.Status, reason: str) -> None:
        self.state.note(status, reason, self.clock())
        self._save()
        log.info("rollout %s wave %d: %s (%s)", self.state.name, self.state.wave, status, reason)
        self.emit(self.state)

    def _start_wave(self) -> None:
        self.state.wave_started_at = self.clock()
        self.state.soak_started_at = None
        self._save()
        self._reset_windows()

    def _reset_windows(self) -> None:
        self.windows = {d: DeviceWindow(d, version_at_start=r.version) for d, r in self.view.rows.items()}

    # -- watching ----------------------------------------------------------------------------------------------

    def _feed(self, topic: str, payload: bytes) -> None:
        skipped = sum(self.view.skipped.values())
        event = self.view.feed(topic, payload)
        if sum(self.view.skipped.values()) != skipped or not payload:
            return
        leaf = topic.rsplit("/", 1)[-1]
        device = topic.split("/")[-2]
        if device in self.view.ignored:
            return
        if leaf == "telemetry":
            window = self.windows.get(device)
            if window is None:
                row = self.view.rows.get(device)
                window = self.windows[device] = DeviceWindow(device, row.version if row else None)
            window.feed(json.loads(payload))
        elif event is not None:
            b = event.body
            raw = b.get("bundle")
            bundle: dict[str, Any] = raw if isinstance(raw, dict) else {}
            # a reason the device does not blame on the bundle (no grant or key yet, superseded) is no verdict on it
            if (b.get("to") == "rollback" and b.get("event") in ROLLBACK_EVENTS and b.get("reason") not in NOT_BLAMED
                    and bundle.get("name") == self.state.bundle_name and bundle.get("version") == self.state.version
                    and device not in self.state.rolled_back):
                log.warning("%s rolled %s v%d back: %s", device, self.state.bundle_name, self.state.version,
                            b.get("reason"))
                self.state.rolled_back.append(device)  # events are not retained: remember them across restarts
                self._save()

    def evaluate(self) -> Decision:
        group = self.state.group
        rows = self.view.devices(group)
        online = {r.device_id: r.online for r in rows}
        canary, control = split([r.device_id for r in rows], group, self.state.percent)
        rolled = set(self.state.rolled_back)
        c = figures([self.windows.get(d) or DeviceWindow(d) for d in canary], online, rolled, self.state.version)
        prev_version = self.state.previous.get("version") if self.state.previous else None
        b = figures([self.windows.get(d) or DeviceWindow(d) for d in control], online, set(), prev_version)
        if control:
            self.state.baseline.update({k: v for k, v in b.items() if v is not None})
        else:  # the wave reaching 100% leaves no control: compare with what the control showed last
            b = {k: self.state.baseline.get(k) for k in b}
        now = self.clock()
        if self.state.soak_started_at is None:
            versions = {r.device_id: r.version for r in rows}
            deployed = all(versions.get(d) == self.state.version or d in rolled or online.get(d) is not True
                           for d in canary)
            if deployed:  # the soak window opens: figures count from here
                self.state.soak_started_at = now
                self._save()
                self._reset_windows()
                c = figures([self.windows.get(d) or DeviceWindow(d) for d in canary], online, rolled,
                            self.state.version)
        verdicts = evaluate_all(self.gates, c, b)
        started = self.state.wave_started_at if self.state.wave_started_at is not None else now
        soaked = None if self.state.soak_started_at is None else now - self.state.soak_started_at
        decision = decide(verdicts, soak_elapsed_s=soaked, soak_s=self.state.soak_s, deploying_s=now - started,
                          deploy_timeout_s=DEPLOY_TIMEOUT_S,
                          devices=int(c["devices"] or 0), min_devices=self.state.min_devices,
                          requests=c["requests"] or 0.0, min_requests=self.state.min_requests,
                          last_wave=self.state.wave == len(self.state.waves))
        self.state.figures = {"canary": c, "control": b, "canary_devices": canary, "control_devices": control,
                              "verdicts": [v.to_json() for v in verdicts], "decision": decision.action,
                              "why": decision.reason}
        return decision

    # -- the loop ----------------------------------------------------------------------------------------------

    def _apply_request(self) -> None:
        req = st.take_request(self.repo, self.state.name)
        if req is None:
            return
        self.state.last_request = req
        if req == "abort":
            self._abort("aborted by request")
        elif req == "pause" and self.state.status == "rolling":
            self._transition("paused", "paused by request")
        elif req == "resume" and self.state.status == "paused":
            self._transition("rolling", f"resumed by request; wave {self.state.wave} soaks again")
            self._start_wave()
        else:
            self._save()  # a request that does not apply (resume while rolling): recorded, nothing else

    def _abort(self, reason: str) -> None:
        self._transition("aborted", reason)
        self._sign()

    def _act(self, decision: Decision) -> None:
        if decision.action == "abort":
            self._abort(decision.reason)
        elif decision.action == "pause":
            self._transition("paused", decision.reason)
        elif decision.action == "done":
            self._transition("done", f"wave {self.state.wave} ({self.state.percent:g}%): {decision.reason}")
            self._sign()
        elif decision.action == "advance":
            passed = self.state.wave
            self.state.wave += 1
            self._transition("rolling", f"wave {passed} passed ({decision.reason}); wave {self.state.wave}: "
                                        f"{self.state.percent:g}% of {self.state.group}")
            self._sign()
            self._start_wave()

    def run(self, until: Callable[[], bool] | None = None) -> int:
        """Run until done or aborted (or `until()`); returns EXIT_DONE or EXIT_ABORTED."""
        with st.controller_lock(self.repo, self.state.name):
            self._sign()  # a resumed controller first finishes what it may not have pushed
            if not self.state.finished:
                with self.client.subscribe_stream(self.view.filters(("state", "telemetry", "events"))) as sub:
                    self._start_wave()
                    self._publish_status(force=True)
                    self.emit(self.state)
                    while not self.state.finished and not (until is not None and until()):
                        deadline = time.monotonic() + self.tick_s
                        while (left := deadline - time.monotonic()) > 0:
                            msg = sub.get(timeout=left)
                            if msg is not None:
                                self._feed(msg.topic, msg.payload)
                        before = (self.state.status, self.state.wave)
                        self._apply_request()
                        if self.state.status == "rolling":
                            decision = self.evaluate()
                            if decision != self._last_decision:
                                log.info("wave %d: %s (%s)", self.state.wave, decision.action, decision.reason)
                                self._last_decision = decision
                            self._act(decision)
                        self._publish_status(force=(self.state.status, self.state.wave) != before)
            self._publish_status(force=True)
        return EXIT_ABORTED if self.state.status == "aborted" else EXIT_DONE
