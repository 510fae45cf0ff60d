"""The daemon's step loop with fakes (Mender's StateTransitionsTestCase style): `Steps` (each state's work) driven by
`Deployer`, with an in-memory store, fetch client, stager, holder, probation watch and link. No broker, no
subprocess, no socket, no runtime.

For each state and each outcome of its work (success, each failure family, a stop request): the next persisted
state, exactly one save per transition, the published event, and what the holder serves. Then every restart path
(counted, clean stop, crash loop, the candidate failing to load again) and whole runs of the loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from agent.deploy.driver import Deployer
from agent.deploy.fetch_client import Candidate
from agent.deploy.machine import (
    BundleRef,
    DeployState,
    Event,
    State,
    apply,
    begin_check,
    on_clean_stop,
    on_staged,
    on_update_found,
)
from agent.deploy.rollout import Membership
from agent.deploy.steps import RELOAD_RUNS, STAGE_RUNS, Staged, Steps, bundle_file, release_dir
from agent.errors import (
    BundleRejected,
    FetchWorkerError,
    ProbationFailed,
    RuntimeUnavailable,
    StopRequested,
    TransportError,
)
from agent.serve.holder import LoadedModel

NOW = 1000.0
MAX_RESTARTS = 3
REPORT = {"format": "onnx", "choice_reason": "the only runnable artifact"}


def sha(version: int) -> str:
    return f"{version:064x}"


@dataclass
class FakeSession:
    inputs: tuple[Any, ...] = ()
    outputs: tuple[Any, ...] = ()


def model_of(ref: BundleRef) -> LoadedModel:
    return LoadedModel(ref.name, ref.version, "onnx", FakeSession())  # type: ignore[arg-type]


@dataclass
class FakeFetch:
    found: Candidate | None = None
    fail: dict[str, BaseException] = field(default_factory=dict)  # step -> what it raises
    calls: list[str] = field(default_factory=list)
    remembered: Candidate | None = None
    last_rollout: Membership | None = None

    def _call(self, step: str) -> None:
        self.calls.append(step)
        if step in self.fail:
            raise self.fail[step]

    def precheck(self) -> None:
        self._call("precheck")

    def check(self) -> Candidate | None:
        self._call("check")
        return self.found

    def remember(self, cand: Candidate | None) -> None:
        self.remembered = cand

    def candidate_for(self, ref: BundleRef) -> Candidate:
        self._call("candidate_for")
        return Candidate(ref.name, ref.version, ref.sha256)

    def download(self, cand: Candidate) -> Path:
        self._call("download")
        return Path("/nonexistent") / cand.sha256

    def verify(self, cand: Candidate, extract_to: Path) -> None:
        self._call("verify")


@dataclass
class FakeStager:
    broken: dict[str, BaseException] = field(default_factory=dict)  # sha256 -> what staging it raises
    calls: list[tuple[int, int]] = field(default_factory=list)  # (version, warm-up runs)

    def stage(self, ref: BundleRef, *, warm_runs: int, timing_runs: int) -> Staged:
        self.calls.append((ref.version, warm_runs))
        if ref.sha256 in self.broken:
            raise self.broken[ref.sha256]
        return Staged(model_of(ref), REPORT)


@dataclass
class FakeHolder:
    model: LoadedModel | None = None
    swaps: list[LoadedModel | None] = field(default_factory=list)

    def get(self) -> LoadedModel | None:
        return self.model

    def swap(self, new: LoadedModel | None) -> LoadedModel | None:
        old, self.model = self.model, new
        self.swaps.append(new)
        return old


@dataclass
class FakeWatch:
    error: BaseException | None = None
    watched: list[tuple[int | None, str]] = field(default_factory=list)

    def __call__(self, model: LoadedModel | None, release: Path, fmt: str) -> None:
        self.watched.append((None if model is None else model.version, fmt))
        if self.error is not None:
            raise self.error


@dataclass
class FakeStore:
    ds: DeployState = field(default_factory=DeployState)
    saves: list[DeployState] = field(default_factory=list)
    fail: OSError | None = None

    def load(self) -> DeployState:
        return self.ds

    def save(self, ds: DeployState) -> None:
        if self.fail is not None:
            raise self.fail
        self.saves.append(ds)
        self.ds = ds


@dataclass
class FakeLink:
    events: list[dict[str, Any]] = field(default_factory=list)
    states: list[tuple[dict[str, Any], bool]] = field(default_factory=list)

    def event(self, payload: dict[str, Any]) -> None:
        self.events.append(payload)

    def state(self, payload: dict[str, Any], *, online: bool) -> None:
        self.states.append((payload, online))


class Rig:
    """The parts of one daemon, faked, around the real Steps and Deployer."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.fetch, self.stager, self.holder = FakeFetch(), FakeStager(), FakeHolder()
        self.watch, self.store, self.link = FakeWatch(), FakeStore(), FakeLink()
        self.stopping = threading.Event()
        self.steps = Steps(fetch=self.fetch, stager=self.stager, holder=self.holder, watch=self.watch,
                           state_dir=tmp, group="lab")
        self.deployer = Deployer(self.steps, self.store, self.link, device_id="dev-1", group="lab",
                                 agent_version="0.test", stopping=self.stopping, clock=lambda: NOW, keep=1,
                                 max_restarts=MAX_RESTARTS)
        self.cur, self.new, self.old = self.ref(1, "onnx"), self.ref(2), self.ref(0, "onnx")
        self.handled: list[DeployState] = []  # the state each handler was given ...
        self.persisted: list[DeployState] = []  # ... and what the store held at that moment
        run = self.steps.run

        def spy(ds: DeployState) -> Any:
            self.handled.append(ds)
            self.persisted.append(self.store.ds)
            return run(ds)

        self.steps.run = spy  # type: ignore[method-assign]

    def ref(self, version: int, fmt: str | None = None) -> BundleRef:
        return BundleRef("digits", version, sha(version), str(release_dir(self.dir, "digits", version, sha(version))),
                         fmt)

    def cand(self, ref: BundleRef) -> Candidate:
        return Candidate(ref.name, ref.version, ref.sha256)

    def at(self, state: State) -> DeployState:
        """A deployment of v2 over v1 (v0 kept) that reached `state` through the machine's own functions."""
        ds = begin_check(DeployState(current=self.cur, previous=(self.old,)), at=1)
        if state is State.IDLE:
            return apply(ds, Event.NO_UPDATE, "current", at=2)
        chain: list[Callable[[DeployState], DeployState]] = [
            lambda d: on_update_found(d, self.new, at=2), lambda d: apply(d, Event.OK, at=3),
            lambda d: apply(d, Event.OK, at=4), lambda d: on_staged(d, "onnx", at=5),
            lambda d: apply(d, Event.OK, at=6), lambda d: apply(d, Event.PASSED, at=7)]
        for advance in chain:
            if ds.state is state:
                return ds
            if state is State.ROLLBACK and ds.state is State.PROBATION:
                return apply(ds, Event.FAILED, "latency", at=8)
            ds = advance(ds)
        assert ds.state is state
        return ds

    def serving_as_in_this_run(self, ds: DeployState) -> None:
        """What serves while `ds.state`'s work starts, in a run that went through the earlier states."""
        cur, new = model_of(self.cur), model_of(self.new)
        self.steps.models = {self.cur.sha256: cur}
        if ds.state in (State.PROBATION, State.COMMIT, State.ROLLBACK):
            self.steps.models[self.new.sha256] = new
            self.holder.model = new
        else:
            self.holder.model = cur
        if ds.state is State.ACTIVATE:
            self.steps.staged = (self.new.sha256, new)
        self.store.ds = ds

    def serves(self) -> int | None:
        return None if self.holder.model is None else self.holder.model.version


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def _set(**what: Any) -> Callable[[Rig], None]:
    """A setup: fetch.found=..., fetch.fail={...}, broken=<version whose staging raises>, watch=<error>, staged=None."""
    def setup(r: Rig) -> None:
        if "found" in what:
            r.fetch.found = None if what["found"] is None else r.cand(r.ref(what["found"]))
        r.fetch.fail.update(what.get("fail", {}))
        if "broken" in what:
            version, error = what["broken"]
            r.stager.broken[sha(version)] = error
        r.watch.error = what.get("watch")
        if what.get("staged", True) is None:
            r.steps.staged = None
    return setup


# (state, what its work meets) -> (next state, event, reason, the version served afterwards)
STEP_TABLE: list[tuple[str, State, Callable[[Rig], None], State, Event, str, int | None]] = [
    ("check finds v2", State.CHECK, _set(found=2), State.DOWNLOAD, Event.UPDATE_AVAILABLE, "", 1),
    ("check finds nothing", State.CHECK, _set(found=None), State.IDLE, Event.NO_UPDATE, "no_deployment", 1),
    ("check finds current", State.CHECK, _set(found=1), State.IDLE, Event.NO_UPDATE, "current", 1),
    ("check transport", State.CHECK, _set(fail={"check": TransportError("down", reason="timeout")}),
     State.IDLE, Event.NO_UPDATE, "check_failed: timeout", 1),
    ("check rejected", State.CHECK, _set(fail={"check": BundleRejected("bad", reason="signature")}),
     State.IDLE, Event.NO_UPDATE, "check_failed: signature", 1),
    ("check worker", State.CHECK, _set(fail={"check": FetchWorkerError("boom", type_name="KeyError")}),
     State.IDLE, Event.NO_UPDATE, "check_failed: KeyError", 1),
    ("download ok", State.DOWNLOAD, _set(), State.VERIFY, Event.OK, "", 1),
    ("download transport", State.DOWNLOAD, _set(fail={"download": TransportError("x", reason="hash_mismatch")}),
     State.ROLLBACK, Event.ABORTED, "hash_mismatch", 1),
    ("download superseded", State.DOWNLOAD,
     _set(fail={"candidate_for": BundleRejected("changed", reason="superseded")}),
     State.ROLLBACK, Event.FAILED, "superseded", 1),
    ("download worker", State.DOWNLOAD, _set(fail={"download": FetchWorkerError("x", type_name="OSError")}),
     State.ROLLBACK, Event.FAILED, "OSError", 1),
    ("verify ok", State.VERIFY, _set(), State.STAGE, Event.OK, "", 1),
    ("verify rejected", State.VERIFY, _set(fail={"verify": BundleRejected("arch", reason="target")}),
     State.ROLLBACK, Event.FAILED, "target", 1),
    ("verify transport", State.VERIFY, _set(fail={"verify": TransportError("x")}),
     State.ROLLBACK, Event.ABORTED, "transport", 1),  # verifying refreshes the metadata: not the bundle's fault
    ("stage ok", State.STAGE, _set(), State.ACTIVATE, Event.OK, "", 1),
    ("stage parity", State.STAGE, _set(broken=(2, BundleRejected("parity", reason="parity"))),
     State.ROLLBACK, Event.FAILED, "parity", 1),
    ("stage runtime", State.STAGE, _set(broken=(2, RuntimeUnavailable("no tflite"))),
     State.ROLLBACK, Event.FAILED, "runtime_unavailable", 1),
    ("stage crash", State.STAGE, _set(broken=(2, ValueError("x"))), State.ROLLBACK, Event.FAILED, "ValueError", 1),
    ("activate ok", State.ACTIVATE, _set(), State.PROBATION, Event.OK, "", 2),
    ("activate loads", State.ACTIVATE, _set(staged=None), State.PROBATION, Event.OK, "", 2),
    ("activate load fails", State.ACTIVATE, _set(staged=None, broken=(2, MemoryError())),
     State.ROLLBACK, Event.FAILED, "MemoryError", 1),
    ("probation passes", State.PROBATION, _set(), State.COMMIT, Event.PASSED, "", 2),
    ("probation latency", State.PROBATION, _set(watch=ProbationFailed("slow", "latency")),
     State.ROLLBACK, Event.FAILED, "latency", 1),
    ("probation unreadable", State.PROBATION, _set(watch=BundleRejected("gone", reason="unreadable")),
     State.ROLLBACK, Event.FAILED, "unreadable", 2),  # ROLLBACK serves v1 again
    ("commit", State.COMMIT, _set(), State.IDLE, Event.OK, "", 2),
    ("rollback", State.ROLLBACK, _set(), State.IDLE, Event.OK, "", 1),
]


@pytest.mark.parametrize("state, setup, to, event, reason, serves", [row[1:] for row in STEP_TABLE],
                         ids=[row[0] for row in STEP_TABLE])
def test_each_outcome_of_each_state(rig: Rig, state: State, setup: Callable[[Rig], None], to: State, event: Event,
                                    reason: str, serves: int | None) -> None:
    ds = rig.at(state)
    rig.serving_as_in_this_run(ds)
    setup(rig)
    new = rig.deployer.step(ds)
    assert (new.state, new.last_event and new.last_event.event, new.last_event and new.last_event.reason) == (
        to, event, reason)
    assert rig.store.saves == [new]  # one save per transition, for every state (STAGE included)
    [published] = rig.link.events
    assert {k: published[k] for k in ("device", "from", "to", "event", "reason", "at")} == {
        "device": "dev-1", "from": state.value, "to": to.value, "event": event.value, "reason": reason, "at": NOW}
    assert rig.serves() == serves
    if event is Event.FAILED and reason != "superseded":
        assert new.rejected[sha(2)] == reason  # blamed: not deployed again
    if event is Event.ABORTED or reason == "superseded":
        assert sha(2) not in new.rejected  # not blamed: retried at the next check (superseded: a rollout moved on)


def test_stage_publishes_its_figures_and_the_format(rig: Rig) -> None:
    ds = rig.at(State.STAGE)
    rig.serving_as_in_this_run(ds)
    new = rig.deployer.step(ds)
    assert new.candidate is not None and new.candidate.format == "onnx"
    assert rig.link.events[0]["staging"] == REPORT
    assert rig.stager.calls == [(2, STAGE_RUNS[0])]
    assert "staging" not in rig.link.states[-1][0]  # the figures go with the event only


def test_stop_request_abandons_the_step_without_a_transition(rig: Rig) -> None:
    cases: list[tuple[State, Callable[[Rig], None]]] = [
        (State.CHECK, _set(fail={"check": StopRequested("stop")})),
        (State.DOWNLOAD, _set(fail={"download": StopRequested("stop")})),
        (State.VERIFY, _set(fail={"verify": StopRequested("stop")})),
        (State.PROBATION, _set(watch=StopRequested("stop"))),
    ]
    for state, setup in cases:
        r = Rig(rig.dir / state.value)
        ds = r.at(state)
        r.serving_as_in_this_run(ds)
        setup(r)
        assert r.deployer.drive(ds) is ds
        assert r.store.saves == [ds] and r.link.events == [], state  # the persisted state resumes after restart


def test_stop_requested_before_a_step_runs_none(rig: Rig) -> None:
    ds = rig.at(State.DOWNLOAD)
    rig.stopping.set()
    assert rig.deployer.drive(ds) is ds
    assert rig.handled == [] and rig.store.saves == [ds]


def test_a_rollback_that_cannot_load_the_current_bundle_propagates_unsaved(rig: Rig) -> None:
    """ROLLBACK finishes a deployment and the table has no failure edge from it: an error there is
    raised as itself (the agent exits and its restart retries the persisted step), not as an InvalidTransition,
    and nothing is saved."""
    ds = rig.at(State.ROLLBACK)
    rig.serving_as_in_this_run(ds)
    rig.steps.models = {}
    rig.stager.broken[sha(1)] = OSError("disk")
    with pytest.raises(OSError, match="disk"):
        rig.deployer.step(ds)
    assert rig.store.saves == [] and rig.link.events == []


def test_files_are_deleted_only_after_the_state_that_drops_them_is_saved(rig: Rig) -> None:
    ds = rig.at(State.COMMIT)
    rig.serving_as_in_this_run(ds)
    for ref in (rig.old, rig.cur, rig.new):
        Path(ref.path).mkdir(parents=True)
        bundle_file(rig.dir, ref.name, ref.version).parent.mkdir(exist_ok=True)
        bundle_file(rig.dir, ref.name, ref.version).write_bytes(b"x")
    saved_before: list[int] = []
    discard = rig.steps.discard
    rig.steps.discard = lambda ref: (saved_before.append(len(rig.store.saves)), discard(ref))  # type: ignore
    new = rig.deployer.step(ds)
    assert (new.current, new.previous) == (replace(rig.new, format="onnx"), (rig.cur,))  # keep=1: v0 goes
    assert saved_before == [1]
    assert not Path(rig.old.path).exists() and not bundle_file(rig.dir, "digits", 0).exists()
    assert Path(rig.cur.path).exists() and Path(rig.new.path).exists()
    assert set(rig.steps.models) == {sha(2)}  # only the serving model stays loaded


# --- restarts ---------------------------------------------------------------------------------------------------

COUNTED_STATES = [State.CHECK, State.DOWNLOAD, State.VERIFY, State.STAGE, State.ACTIVATE, State.PROBATION]
RESUMES = {State.ACTIVATE: State.PROBATION}  # the candidate serves after a restart in ACTIVATE


@pytest.mark.parametrize("state", COUNTED_STATES)
@pytest.mark.parametrize("how", ["crash", "clean_stop", "crash_loop"])
def test_restart_in_a_counted_state(rig: Rig, state: State, how: str) -> None:
    ds = rig.at(state)
    if how == "clean_stop":
        ds = on_clean_stop(replace(ds, restarts=1))
    if how == "crash_loop":
        ds = replace(ds, restarts=MAX_RESTARTS - 1)
    rig.store.ds = ds
    new = rig.deployer.start()
    le = new.last_event
    assert le is not None and rig.store.saves == [new] and len(rig.link.events) == 1
    if how == "crash_loop":
        assert (new.state, le.event, le.reason) == (State.ROLLBACK, Event.CRASH_LOOP, "crash_loop")
        assert rig.serves() == 1
        return
    assert new.state is RESUMES.get(state, state) and le.event is Event.RESTARTED
    assert (new.restarts, le.reason) == ((1, "clean_stop") if how == "clean_stop" else (1, "restart 1 of 3"))
    assert not new.clean_stop
    assert rig.serves() == (2 if new.state is State.PROBATION else 1)
    assert rig.stager.calls == [(rig.serves() or 0, RELOAD_RUNS[0])]


@pytest.mark.parametrize("state, serves", [(State.IDLE, 1), (State.COMMIT, 2), (State.ROLLBACK, 1)])
@pytest.mark.parametrize("clean", [False, True])
def test_restart_in_an_uncounted_state(rig: Rig, state: State, serves: int, clean: bool) -> None:
    ds = rig.at(state)
    rig.store.ds = on_clean_stop(ds) if clean else ds
    new = rig.deployer.start()
    assert new == ds  # unchanged but for the clean-stop marker, which is cleared and saved
    assert rig.store.saves == ([ds] if clean else []) and rig.link.events == []
    assert rig.serves() == serves


@pytest.mark.parametrize("state", [State.ACTIVATE, State.PROBATION])
def test_candidate_that_fails_to_load_after_a_restart_is_rolled_back(rig: Rig, state: State) -> None:
    rig.store.ds = rig.at(state)
    rig.stager.broken[sha(2)] = RuntimeUnavailable("gone")
    new = rig.deployer.start()
    assert new.last_event is not None
    assert (new.state, new.last_event.event, new.last_event.reason) == (State.ROLLBACK, Event.FAILED, "load_failed")
    assert [s.state for s in rig.store.saves] == [State.PROBATION, State.ROLLBACK]
    assert [(e["from"], e["to"], e["event"]) for e in rig.link.events] == [
        (state.value, "probation", "restarted"), ("probation", "rollback", "failed")]
    assert rig.serves() == 1  # the current bundle serves at once, before ROLLBACK's work runs


def test_committing_candidate_that_fails_to_load_after_a_restart_is_rolled_back(rig: Rig) -> None:
    """A restart in COMMIT whose candidate no longer loads: rejected and rolled back, not a restart loop."""
    rig.store.ds = rig.at(State.COMMIT)
    rig.stager.broken[sha(2)] = RuntimeUnavailable("gone")
    new = rig.deployer.start()
    assert new.last_event is not None
    assert (new.state, new.last_event.event, new.last_event.reason) == (State.ROLLBACK, Event.FAILED, "load_failed")
    assert [(e["from"], e["to"], e["event"]) for e in rig.link.events] == [("commit", "rollback", "failed")]
    assert rig.serves() == 1
    final = rig.deployer.drive(new)
    assert final.state is State.IDLE and final.current is not None and final.current.sha256 == sha(1)


def test_current_that_fails_to_load_after_a_restart_serves_nothing_and_blames_nothing(rig: Rig) -> None:
    rig.store.ds = rig.at(State.IDLE)
    rig.stager.broken[sha(1)] = RuntimeUnavailable("gone")
    assert rig.deployer.start() == rig.at(State.IDLE)
    assert rig.serves() is None and rig.store.saves == []


# --- the loop ---------------------------------------------------------------------------------------------------


def test_a_deployment_from_idle_to_idle(rig: Rig) -> None:
    idle = rig.at(State.IDLE)
    rig.serving_as_in_this_run(idle)
    rig.steps.staged = None
    rig.fetch.found = rig.cand(rig.new)
    final = rig.deployer.check(idle)
    assert final.state is State.IDLE and final.current == replace(rig.new, format="onnx")
    assert rig.fetch.calls[:2] == ["precheck", "check"]
    transitions = [(e["from"], e["to"], e["event"]) for e in rig.link.events]
    assert transitions == [("check", "download", "update_available"), ("download", "verify", "ok"),
                           ("verify", "stage", "ok"), ("stage", "activate", "ok"), ("activate", "probation", "ok"),
                           ("probation", "commit", "passed"), ("commit", "idle", "ok")]
    # IDLE -> CHECK saved (not published) before CHECK's work, then one save per transition
    assert [s.state for s in rig.store.saves] == [State.CHECK, State.DOWNLOAD, State.VERIFY, State.STAGE,
                                                  State.ACTIVATE, State.PROBATION, State.COMMIT, State.IDLE]
    assert rig.persisted == rig.handled  # every handler ran on the state the store held
    assert rig.serves() == 2 and rig.watch.watched == [(2, "onnx")]
    assert [p["state"] for p, online in rig.link.states] == [t for _, t, _ in transitions] and all(
        online for _, online in rig.link.states)


def test_a_check_finding_nothing_publishes_the_state_once(rig: Rig) -> None:
    ds = rig.at(State.IDLE)
    rig.serving_as_in_this_run(ds)
    for _ in range(3):
        ds = rig.deployer.check(ds)
    assert [e["reason"] for e in rig.link.events] == ["no_deployment"] * 3
    assert len(rig.link.states) == 1 and rig.link.states[0][0]["no_deployment"] is True


def test_a_stop_during_the_precheck_leaves_idle_unsaved(rig: Rig) -> None:
    ds = rig.at(State.IDLE)
    rig.fetch.fail["precheck"] = StopRequested("stop")
    assert rig.deployer.check(ds) is ds
    assert rig.store.saves == [] and rig.handled == []


def test_messages_keep_their_fields_in_order(rig: Rig) -> None:
    """The events and retained state are byte-compatible with what fleets already read."""
    ds = rig.at(State.CHECK)
    rig.serving_as_in_this_run(ds)
    rig.fetch.found = rig.cand(rig.new)
    new = rig.deployer.step(ds)
    event = rig.link.events[0]
    assert list(event) == ["device", "from", "to", "event", "reason", "at", "bundle", "rollout_id", "rollout_wave"]
    assert event["bundle"] == {"name": "digits", "version": 2, "sha256": sha(2), "format": None}
    payload, online = rig.link.states[0]
    assert online and list(payload) == ["status", "device", "group", "agent_version", "state", "bundle",
                                        "candidate", "serving", "no_deployment", "rollout_id", "rollout_wave",
                                        "since", "at"]
    assert (payload["state"], payload["serving"], payload["since"]) == (
        "download", {"name": "digits", "version": 1, "format": "onnx"}, new.updated_at)
    rig.deployer.announce(new, status="offline")
    assert rig.link.states[-1][1] is False and rig.link.states[-1][0]["status"] == "offline"


def test_clean_stop_marks_the_state_and_survives_a_failing_disk(rig: Rig) -> None:
    ds = rig.at(State.PROBATION)
    rig.deployer.stop(ds)
    assert rig.store.saves == [on_clean_stop(ds)]
    rig.store.fail = OSError("read-only")
    rig.deployer.stop(ds)  # logged: the next start counts this stop as a crash, the safe side
