"""The driver of the deployment state machine: recover at start, then persist, then act, one transition at a time.

    ds = deployer.start()        # on_restart's recovery saved, and exactly the old or the new model serving
    ds = deployer.drive(ds)      # each state's handler (agent/deploy/steps.py) -> Outcome -> advance -> save
    ds = deployer.check(ds)      # in IDLE when a check is due: the precheck, IDLE -> CHECK, drive
    deployer.stop(ds)            # last, once nothing serves: the clean-stop marker (the next start is not counted)

Every transition is saved before the next handler runs, then published through the `Link` (one event, and the
retained state when it changed), and only then are files no saved state refers to deleted. A stop request
(`StopRequested` from a handler) ends driving without a transition: the persisted state resumes after the restart.
This module imports no transport: the `Link` is implemented over MQTT by the daemon.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from agent.deploy.machine import (
    DEFAULT_KEEP,
    DEFAULT_MAX_RESTARTS,
    DeployState,
    Event,
    Outcome,
    State,
    advance,
    begin_check,
    bundles_to_delete,
    no_deployment,
    on_clean_stop,
    on_restart,
    serving_after_restart,
)
from agent.deploy.rollout import Membership, rollout_fields
from agent.deploy.steps import Steps
from agent.errors import StopRequested
from agent.runtime.probe import unusable_json
from agent.serve.holder import LoadedModel

log = logging.getLogger(__name__)


class Link(Protocol):
    """Where transitions are published: `devices/<id>/events` and the retained `devices/<id>/state`."""

    def event(self, payload: dict[str, Any]) -> None: ...
    def state(self, payload: dict[str, Any], *, online: bool) -> None: ...


class Store(Protocol):
    """The persisted deployment state (agent.deploy.store.StateStore)."""

    def load(self) -> DeployState: ...
    def save(self, ds: DeployState) -> None: ...


class Deployer:
    def __init__(self, steps: Steps, store: Store, link: Link, *, device_id: str, group: str, agent_version: str,
                 stopping: threading.Event, clock: Callable[[], float], keep: int = DEFAULT_KEEP,
                 max_restarts: int = DEFAULT_MAX_RESTARTS) -> None:
        self.steps = steps
        self.store = store
        self.link = link
        self.device_id = device_id
        self.group = group
        self.agent_version = agent_version
        self.stopping = stopping
        self.clock = clock
        self.keep = keep
        self.max_restarts = max_restarts
        self._last_state_key: str | None = None  # the retained state last published, but for its timestamps
        self._last_no_update: str | None = None  # the reason of the last transition if it was no_update

    # --- running ---------------------------------------------------------------------------------------------

    def start(self) -> DeployState:
        """Recover from whatever the last run left and serve exactly the old or the new model."""
        ds = self.store.load()
        recovered = on_restart(ds, at=self.clock(), max_restarts=self.max_restarts)
        if recovered is not ds:
            self.save(ds, recovered)
        ds = recovered
        serving = serving_after_restart(ds)
        try:
            self.steps.serve(serving)
        except Exception as e:
            log.error("could not load %s after restart: %s", serving, e)
            if ds.candidate is not None and serving == ds.candidate and ds.state is not State.ROLLBACK:
                ds = self.save(ds, advance(ds, Outcome(Event.FAILED, "load_failed"), at=self.clock()))
                self.steps.serve_current_quietly(ds)
        return ds

    def check(self, ds: DeployState) -> DeployState:
        """A check is due: in IDLE run the precheck (IDLE stays persisted meanwhile), then IDLE -> CHECK; drive."""
        if ds.state is State.IDLE:
            try:
                self.steps.precheck()
            except StopRequested:
                return ds  # nothing was persisted for this check
            ds = begin_check(ds, at=self.clock())
        return self.drive(ds)

    def drive(self, ds: DeployState) -> DeployState:
        """Run transitions until the machine rests in IDLE, or the agent is asked to stop."""
        self.store.save(ds)  # persist, then act
        while ds.state is not State.IDLE and not self.stopping.is_set():
            try:
                ds = self.step(ds)
            except StopRequested:
                break  # the step was abandoned, not failed: its persisted state resumes after the restart
        return ds

    def step(self, ds: DeployState) -> DeployState:
        """One transition: `ds.state`'s work, its outcome applied and saved."""
        outcome = self.steps.run(ds)
        return self.save(ds, advance(ds, outcome, at=self.clock(), keep=self.keep), outcome.extra)

    def stop(self, ds: DeployState) -> None:
        """The normal stop, last, once nothing serves: a model that crashes the agent before this still counts."""
        try:
            self.store.save(on_clean_stop(ds))
        except OSError as e:  # the next start then counts this stop as a crash: the safe side
            log.warning("could not record the clean stop: %s", e)
            return
        log.info("stopped cleanly in %s; the next start does not count as a restart", ds.state.value)

    # --- persistence and publishing ---------------------------------------------------------------------------

    def save(self, old: DeployState, new: DeployState, extra: Mapping[str, Any] | None = None) -> DeployState:
        """Persist `new`, publish the transition, then delete the files `new` no longer refers to."""
        self.store.save(new)
        if new.last_event is not None and new.last_event is not old.last_event:
            self._emit(old.state, new, extra)
        for ref in bundles_to_delete(old, new):
            self.steps.discard(ref)  # only after the new state is durable
        return new

    def _emit(self, old_state: State, ds: DeployState, extra: Mapping[str, Any] | None) -> None:
        le = ds.last_event
        assert le is not None
        # every poll that finds nothing new says the same: log it once, then only when the answer changes
        quiet = le.event is Event.NO_UPDATE and le.reason == self._last_no_update
        self._last_no_update = le.reason if le.event is Event.NO_UPDATE else None
        log.log(logging.DEBUG if quiet else logging.INFO, "%s -> %s (%s%s)", old_state.value, ds.state.value,
                le.event.value, f": {le.reason}" if le.reason else "")
        if old_state is State.STAGE:  # STAGE's event says which runtimes it skipped, whether it passed or not
            extra = {**(extra or {}), "unusable_runtimes": self.unusable_runtimes()}
        self.link.event(event_payload(self.device_id, old_state, ds, extra, rollout=self.rollout()))
        if _state_key(self.state_payload(ds)) != self._last_state_key:
            self.announce(ds)  # the retained state follows every transition (a periodic no_update changes nothing)

    def state_payload(self, ds: DeployState, status: str = "online") -> dict[str, Any]:
        cur, cand = ds.current, ds.candidate
        payload: dict[str, Any] = {
            "status": status, "device": self.device_id, "group": self.group,
            "agent_version": self.agent_version, "state": ds.state.value,
            "bundle": None if cur is None else {"name": cur.name, "version": cur.version, "format": cur.format},
            "candidate": None if cand is None else {"name": cand.name, "version": cand.version,
                                                    "format": cand.format},
            "serving": _describe(self.steps.holder.get()),
            # the last check found nothing signed for this group: a mistyped [agent] group shows here
            "no_deployment": no_deployment(ds),
            # the group's rollout as it concerns this device, from the latest check (None: no rollout)
            **rollout_fields(self.rollout()),
            "since": ds.updated_at,  # when the state machine last moved (None on a fresh device)
            "at": self.clock(),  # when this message was made
        }
        unusable = self.unusable_runtimes()
        if unusable:  # only then: the message stays as fleets read it on a device whose runtimes all work
            payload["unusable_runtimes"] = unusable
        return payload

    def unusable_runtimes(self) -> list[dict[str, Any]]:
        """The runtime probe's unusable verdicts, read from the state directory (`runtimes.json`)."""
        return unusable_json(self.steps.state_dir)

    def rollout(self) -> Membership | None:
        """This device's place in the rollout the latest check read (the FetchClient keeps it in memory; a
        restarted agent reports none until its first check, which it runs at start)."""
        return self.steps.fetch.last_rollout

    def announce(self, ds: DeployState, status: str = "online") -> None:
        """Publish the retained state: at start, on every transition that changes it, at a clean stop ("offline")
        and after a late first connection."""
        payload = self.state_payload(ds, status)
        self._last_state_key = _state_key(payload)
        self.link.state(payload, online=status == "online")


def event_payload(device_id: str, old_state: State, ds: DeployState, extra: Mapping[str, Any] | None = None,
                  *, rollout: Membership | None = None) -> dict[str, Any]:
    """The `devices/<id>/events` message of the transition from `old_state` into `ds` (`rollout`: the device's
    place in the rollout the latest check read, as `rollout_id`/`rollout_wave`)."""
    le = ds.last_event
    assert le is not None
    bundle = ds.candidate or ds.current
    event = {"device": device_id, "from": old_state.value, "to": ds.state.value,
             "event": le.event.value, "reason": le.reason, "at": le.at,
             "bundle": None if bundle is None else {"name": bundle.name, "version": bundle.version,
                                                    "sha256": bundle.sha256, "format": bundle.format},
             **rollout_fields(rollout)}
    if extra:
        event.update(extra)
    return event


def _state_key(payload: dict[str, Any]) -> str:
    """What makes a state message news: everything but its timestamps."""
    return json.dumps({k: v for k, v in payload.items() if k not in ("at", "since")}, sort_keys=True)


def _describe(model: LoadedModel | None) -> dict[str, Any] | None:
    return None if model is None else {"name": model.name, "version": model.version, "format": model.fmt}
