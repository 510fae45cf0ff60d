"""The deployment state machine (agent.deploy.machine) and its store (agent.deploy.store).

Table-driven in the style of Mender's StateTransitionsTestCase: every state is reached by the real happy path,
persisted through a real StateStore, then a failure or a restart is injected and the resulting state, the serving
bundle and the persisted fields are checked. An exhaustive walk of the reachable states checks the invariants.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import deque
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from agent.deploy import machine as dsm
from agent.deploy.machine import (
    CLEAN_STOP,
    CRASH_LOOP,
    MAX_REJECTED,
    TRANSITIONS,
    BundleRef,
    DeployState,
    Event,
    State,
    allowed_events,
    apply,
    begin_check,
    bundles_to_delete,
    decode,
    encode,
    failure_event,
    next_state,
    on_clean_stop,
    on_restart,
    on_staged,
    on_update_found,
    serving_after_restart,
)
from agent.deploy.store import StateStore
from agent.errors import (
    BundleRejected,
    InvalidState,
    InvalidTransition,
    RuntimeUnavailable,
    StateFileError,
    TransportError,
)

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


def ref(version: int, fmt: str | None = None) -> BundleRef:
    return BundleRef("digits", version, f"{version:x}" * 64 if version < 16 else f"{version:064x}",
                     f"bundles/digits-{version}.bundle", fmt)


OLD = ref(1, "onnx")
NEW = ref(2)
NEWER = ref(3)
BASE = DeployState(current=OLD)  # a device serving OLD, idle

HAPPY = [State.IDLE, State.CHECK, State.DOWNLOAD, State.VERIFY, State.STAGE, State.ACTIVATE, State.PROBATION,
         State.COMMIT]


def step(ds: DeployState, at: float, target: BundleRef = NEW, *, keep: int = 2) -> DeployState:
    """One happy-path step from any state (ROLLBACK finishes its rollback)."""
    match ds.state:
        case State.IDLE:
            return begin_check(ds, at=at)
        case State.CHECK:
            return on_update_found(ds, target, at=at)
        case State.STAGE:
            return on_staged(ds, "onnx", at=at)
        case State.PROBATION:
            return apply(ds, Event.PASSED, at=at)
        case _:
            return apply(ds, Event.OK, at=at, keep=keep)


def drive(to: State, start: DeployState = BASE, target: BundleRef = NEW) -> DeployState:
    """The persisted state at `to`, reached by the real happy path (ROLLBACK: probation failing on parity)."""
    ds, at = start, T0
    for _ in HAPPY[1:]:
        if ds.state is to:
            return ds
        at += 1
        ds = step(ds, at, target)
    if to is State.COMMIT:
        return ds
    assert to is State.ROLLBACK
    return apply(drive(State.PROBATION, start, target), Event.FAILED, "parity", at=at + 1)


def finish(ds: DeployState, target: BundleRef = NEW, *, keep: int = 2) -> list[DeployState]:
    """Run the happy path from `ds` until IDLE (at most one deployment); the states passed through."""
    out, at = [ds], T0 + 100
    while True:
        at += 1
        out.append(step(out[-1], at, target, keep=keep))
        if out[-1].state is State.IDLE:
            return out


def persisted(store: StateStore, ds: DeployState) -> DeployState:
    """Save through the real store and read it back, as a restarted agent would."""
    store.save(ds)
    loaded = store.load()
    assert loaded == ds
    return loaded


# --- the table ---------------------------------------------------------------------------------------------------

def test_table_shape() -> None:
    assert set(TRANSITIONS.values()) | {s for s, _ in TRANSITIONS} == set(State)
    for (s, e), nxt in TRANSITIONS.items():
        if e in (Event.FAILED, Event.ABORTED, Event.CRASH_LOOP):
            assert nxt is State.ROLLBACK, (s, e)
    # every state in flight can fail, be restarted and crash-loop; IDLE and ROLLBACK cannot fail, COMMIT only when
    # its candidate no longer loads after a restart
    for s in State:
        in_flight = s not in (State.IDLE, State.COMMIT, State.ROLLBACK)
        assert ((s, Event.FAILED) in TRANSITIONS) == (in_flight or s is State.COMMIT)
        assert ((s, Event.RESTARTED) in TRANSITIONS) == in_flight
        assert ((s, Event.CRASH_LOOP) in TRANSITIONS) == in_flight
    assert TRANSITIONS[(State.ROLLBACK, Event.OK)] is State.IDLE
    assert {s for (s, e) in TRANSITIONS if e is Event.ABORTED} == {State.CHECK, State.DOWNLOAD, State.VERIFY}
    with pytest.raises(TypeError):
        TRANSITIONS[(State.IDLE, Event.OK)] = State.CHECK  # type: ignore[index]

    def reachable(start: State, edges: dict[State, set[State]]) -> set[State]:
        seen, todo = {start}, [start]
        while todo:
            for n in edges.get(todo.pop(), set()) - seen:
                seen.add(n)
                todo.append(n)
        return seen

    fwd: dict[State, set[State]] = {}
    back: dict[State, set[State]] = {}
    for (s, _), n in TRANSITIONS.items():
        fwd.setdefault(s, set()).add(n)
        back.setdefault(n, set()).add(s)
    assert reachable(State.IDLE, fwd) == set(State)  # every state is reachable from IDLE ...
    assert reachable(State.IDLE, back) == set(State)  # ... and leads back to it


@pytest.mark.parametrize(("state", "event"), [(s, e) for s in State for e in Event if (s, e) not in TRANSITIONS])
def test_invalid_transitions_raise(state: State, event: Event) -> None:
    with pytest.raises(InvalidTransition) as info:
        next_state(state, event)
    assert (info.value.state, info.value.event) == (state, event)
    with pytest.raises(InvalidTransition):
        apply(drive(state), event, "x", at=T0)


def test_invalid_transition_misc() -> None:
    with pytest.raises(InvalidTransition):
        next_state(State.IDLE, "reboot")
    assert next_state(State.DOWNLOAD, "ok") is State.VERIFY  # plain strings are accepted
    assert allowed_events(State.COMMIT) == {Event.OK, Event.FAILED}
    with pytest.raises(InvalidTransition):
        on_update_found(BASE, NEW, at=T0)  # not in CHECK
    with pytest.raises(InvalidTransition):
        on_staged(drive(State.VERIFY), "onnx", at=T0)
    with pytest.raises(InvalidTransition):
        apply(drive(State.CHECK), Event.UPDATE_AVAILABLE, at=T0)  # without the candidate
    with pytest.raises(InvalidTransition):
        apply(drive(State.VERIFY), Event.OK, at=T0, candidate=NEWER)  # a step cannot swap the candidate
    with pytest.raises(ValueError):
        apply(drive(State.VERIFY), Event.OK, at=T0, keep=-1)
    with pytest.raises(ValueError):
        on_restart(drive(State.STAGE), at=T0, max_restarts=0)


# --- happy path ----------------------------------------------------------------------------------------------------

def test_happy_path(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    states = [persisted(store, s) for s in finish(BASE)]
    assert [s.state for s in states] == [*HAPPY, State.IDLE]
    check, download, _verify, _stage, activate, _probation, commit, idle = states[1:]
    assert check.candidate is None and download.candidate == NEW and download.restarts == 0
    assert activate.candidate == replace(NEW, format="onnx")
    # the old model serves until ACTIVATE; the candidate from then until COMMIT; after COMMIT it is current
    assert [serving_after_restart(s) for s in states] == [OLD] * 5 + [activate.candidate] * 3 + [idle.current]
    assert commit.current == OLD and commit.candidate == activate.candidate
    assert idle.current == replace(NEW, format="onnx") and idle.candidate is None and idle.previous == (OLD,)
    assert idle.rejected == {} and idle.restarts == 0
    assert idle.last_event == dsm.LastEvent(State.COMMIT, Event.OK, "", T0 + 108)
    assert idle.updated_at == T0 + 108
    assert all(bundles_to_delete(a, b) == () for a, b in pairwise(states))


def test_check_outcomes() -> None:
    check = drive(State.CHECK)
    assert on_update_found(check, None, at=T0).state is State.IDLE
    same = on_update_found(check, replace(OLD, format=None), at=T0)
    assert (same.state, same.current, same.last_event and same.last_event.reason) == (State.IDLE, OLD, "current")
    conflict = on_update_found(check, BundleRef("digits", 9, "9" * 64, OLD.path), at=T0)
    assert conflict.state is State.ROLLBACK and conflict.rejected == {}
    assert conflict.last_event is not None and conflict.last_event.reason == "path_conflict"
    assert finish(conflict)[-1].current == OLD


# --- injected failures ----------------------------------------------------------------------------------------------

FAILURES = [
    # state            event           reason              candidate rejected?
    (State.CHECK, Event.FAILED, "malformed", False),  # no candidate yet: nothing to blame
    (State.CHECK, Event.ABORTED, "transport", False),
    (State.DOWNLOAD, Event.FAILED, "hash_mismatch", True),
    (State.DOWNLOAD, Event.ABORTED, "transport", False),  # a network glitch does not blacklist the version
    (State.VERIFY, Event.FAILED, "target_mismatch", True),
    (State.STAGE, Event.FAILED, "parity", True),
    (State.ACTIVATE, Event.FAILED, "swap_failed", True),
    (State.PROBATION, Event.FAILED, "latency_p95", True),
]


@pytest.mark.parametrize(("state", "event", "reason", "blamed"), FAILURES, ids=lambda v: str(v))
def test_failure_in_each_state(tmp_path: Path, state: State, event: Event, reason: str, blamed: bool) -> None:
    store = StateStore(tmp_path / "state.json")
    before = persisted(store, drive(state))
    rb = persisted(store, apply(before, event, reason, at=T0 + 50))
    assert rb.state is State.ROLLBACK
    assert rb.candidate == before.candidate  # kept through ROLLBACK so its work knows what to drop
    assert serving_after_restart(rb) == OLD  # rolling back means the old model serves
    assert rb.last_event == dsm.LastEvent(state, event, reason, T0 + 50)
    assert rb.rejected == ({NEW.sha256: reason} if blamed else {})
    # a restart in the middle of the rollback finishes it, serving OLD
    assert on_restart(store.load(), at=T0 + 51) == rb
    idle = persisted(store, apply(rb, Event.OK, at=T0 + 52))
    assert (idle.state, idle.current, idle.candidate, idle.previous, idle.restarts) == (State.IDLE, OLD, None, (), 0)
    assert idle.rejected == rb.rejected
    assert bundles_to_delete(rb, idle) == ((before.candidate,) if before.candidate else ())
    # the next check skips a rejected bundle, retries one that was only aborted, and takes a newer one
    again = on_update_found(begin_check(idle, at=T0 + 60), NEW, at=T0 + 61)
    assert again.state is (State.IDLE if blamed else State.DOWNLOAD)
    if blamed:
        assert again.last_event is not None and again.last_event.reason == f"rejected: {reason}"
    newer = finish(begin_check(idle, at=T0 + 70), NEWER)[-1]
    assert (newer.current, newer.previous) == (replace(NEWER, format="onnx"), (OLD,))


@pytest.mark.parametrize("state", [State.IDLE, State.ROLLBACK])
def test_no_failure_edge(state: State) -> None:
    with pytest.raises(InvalidTransition):
        apply(drive(state), Event.FAILED, "x", at=T0)


# --- injected restarts ----------------------------------------------------------------------------------------------

RESTARTS = [
    # persisted     resumes in        serves  restarts  final current after finishing
    (State.IDLE, State.IDLE, "old", 0, "new"),  # the next check deploys it
    (State.CHECK, State.CHECK, "old", 1, "new"),
    (State.DOWNLOAD, State.DOWNLOAD, "old", 1, "new"),
    (State.VERIFY, State.VERIFY, "old", 1, "new"),
    (State.STAGE, State.STAGE, "old", 1, "new"),
    (State.ACTIVATE, State.PROBATION, "new", 1, "new"),  # the swap may have happened: serve the staged candidate
    (State.PROBATION, State.PROBATION, "new", 1, "new"),
    (State.COMMIT, State.COMMIT, "new", 0, "new"),  # finish committing
    (State.ROLLBACK, State.ROLLBACK, "old", 0, "old"),  # finish rolling back
]


@pytest.mark.parametrize(("state", "resumes", "serves", "restarts", "final"), RESTARTS, ids=lambda v: str(v))
def test_restart_in_each_state(tmp_path: Path, state: State, resumes: State, serves: str, restarts: int,
                               final: str) -> None:
    store = StateStore(tmp_path / "state.json")
    before = persisted(store, drive(state))
    after = on_restart(store.load(), at=T0 + 50)
    if resumes is state and restarts == 0:
        assert after is before or after == before  # nothing to record
    after = persisted(store, after)
    assert after.state is resumes and after.restarts == restarts
    staged = replace(NEW, format="onnx")
    assert serving_after_restart(after) == {"old": OLD, "new": staged}[serves]
    assert serving_after_restart(after) in (before.current, before.candidate)  # exactly the old or the new
    assert after.candidate == before.candidate and after.current == before.current
    if restarts:
        assert after.last_event == dsm.LastEvent(state, Event.RESTARTED, "restart 1 of 3", T0 + 50)
    # the deployment carries on from where it was and ends as it would have without the crash
    end = finish(after)[-1]
    assert end.current == {"old": OLD, "new": staged}[final]
    assert end.restarts == 0 and end.candidate is None


@pytest.mark.parametrize("state", [State.CHECK, State.DOWNLOAD, State.VERIFY, State.STAGE, State.ACTIVATE,
                                   State.PROBATION])
def test_crash_loop_rolls_back(tmp_path: Path, state: State) -> None:
    store = StateStore(tmp_path / "state.json")
    ds = persisted(store, drive(state))
    seen = []
    for i in range(3):  # the agent dies in this state three times
        ds = persisted(store, on_restart(store.load(), at=T0 + i))
        seen.append((ds.state, ds.restarts))
    resumed = State.PROBATION if state is State.ACTIVATE else state
    assert seen == [(resumed, 1), (resumed, 2), (State.ROLLBACK, 3)]
    assert ds.last_event == dsm.LastEvent(resumed, Event.CRASH_LOOP, CRASH_LOOP, T0 + 2)
    assert serving_after_restart(ds) == OLD
    blamed = state is not State.CHECK  # CHECK had no candidate to blame
    assert ds.rejected == ({NEW.sha256: CRASH_LOOP} if blamed else {})
    idle = persisted(store, apply(ds, Event.OK, at=T0 + 10))
    assert (idle.state, idle.current, idle.candidate, idle.restarts) == (State.IDLE, OLD, None, 0)
    retry = on_update_found(begin_check(idle, at=T0 + 11), NEW, at=T0 + 12)
    assert retry.state is (State.IDLE if blamed else State.DOWNLOAD)


def test_crash_then_probation_passes() -> None:
    ds = on_restart(drive(State.PROBATION), at=T0)
    assert ds.restarts == 1
    end = finish(ds)
    assert [s.state for s in end] == [State.PROBATION, State.COMMIT, State.IDLE]
    assert end[-1].restarts == 0 and end[-1].current == replace(NEW, format="onnx")


def test_max_restarts_one_rolls_back_at_once() -> None:
    ds = on_restart(drive(State.STAGE), at=T0, max_restarts=1)
    assert ds.state is State.ROLLBACK and ds.rejected == {NEW.sha256: CRASH_LOOP}


def test_restart_counter_is_per_deployment() -> None:
    ds = on_restart(on_restart(drive(State.DOWNLOAD), at=T0), at=T0)
    assert ds.restarts == 2
    ds = finish(ds)[-1]  # the deployment completes; the next one starts from 0
    nxt = on_update_found(begin_check(ds, at=T0), NEWER, at=T0)
    assert nxt.restarts == 0
    assert on_restart(nxt, at=T0).state is State.DOWNLOAD


def test_first_deployment_on_a_fresh_device() -> None:
    fresh = dsm.initial_state()
    assert serving_after_restart(on_restart(fresh, at=T0)) is None
    path = finish(fresh)
    assert path[-1].current == replace(NEW, format="onnx") and path[-1].previous == ()
    rb = on_restart(on_restart(on_restart(drive(State.PROBATION, fresh), at=T0), at=T0), at=T0)
    assert rb.state is State.ROLLBACK and serving_after_restart(rb) is None  # nothing known-good to go back to


# --- clean stops vs crashes -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("state", "resumes", "serves", "restarts", "final"), RESTARTS, ids=lambda v: str(v))
def test_clean_stop_in_each_state(tmp_path: Path, state: State, resumes: State, serves: str, restarts: int,
                                  final: str) -> None:
    """A clean stop resumes exactly as a crash would (same state, same serving bundle) but is not counted, and the
    marker is gone after the start, so a crash after it counts again."""
    store = StateStore(tmp_path / "state.json")
    before = persisted(store, drive(state))
    stopped = persisted(store, on_clean_stop(before))
    assert stopped.clean_stop and not before.clean_stop
    assert replace(stopped, clean_stop=False) == before  # the marker is all a clean stop changes
    after = persisted(store, on_restart(store.load(), at=T0 + 50))
    crashed = on_restart(before, at=T0 + 50)
    assert (after.state, serving_after_restart(after)) == (resumes, serving_after_restart(crashed))
    assert after.restarts == 0 and crashed.restarts == restarts  # a crash here counts `restarts`, a clean stop 0
    assert not after.clean_stop
    if restarts:  # in a deployment: reported, with why it was not counted
        assert after.last_event == dsm.LastEvent(state, Event.RESTARTED, CLEAN_STOP, T0 + 50)
    else:  # nothing to resume: only the marker is cleared
        assert after == before
    again = on_restart(after, at=T0 + 60)
    assert again.restarts == restarts
    assert finish(after)[-1].current == {"old": OLD, "new": replace(NEW, format="onnx")}[final]


P, S, RB = State.PROBATION, State.STAGE, State.ROLLBACK

# "term": the daemon shut down normally (on_clean_stop saved), then started; "kill": SIGKILL, a crash, a power
# cut or the hung-stage exit 70 (nothing saved), then started. max_restarts is 3.
STOP_SEQUENCES = [
    # persisted in      stops, each followed by a start        (state, restarts) after each start
    (P, "term term term term term", [(P, 0)] * 5),  # more clean stops than max_restarts: never a crash loop
    (S, "term term term term term", [(S, 0)] * 5),
    (State.ACTIVATE, "term term", [(P, 0), (P, 0)]),
    (P, "kill term kill term", [(P, 1), (P, 1), (P, 2), (P, 2)]),  # a clean stop neither counts nor resets
    (P, "term kill kill kill", [(P, 0), (P, 1), (P, 2), (RB, 3)]),  # crashes after a clean stop still count
    (S, "kill kill term kill", [(S, 1), (S, 2), (S, 2), (RB, 3)]),
    (P, "kill kill kill", [(P, 1), (P, 2), (RB, 3)]),  # as before: crashes alone
]


@pytest.mark.parametrize(("state", "stops", "expected"), STOP_SEQUENCES,
                         ids=[f"{s.value}: {stops}" for s, stops, _ in STOP_SEQUENCES])
def test_clean_stops_and_crashes(tmp_path: Path, state: State, stops: str, expected: list[tuple[State, int]]
                                 ) -> None:
    store = StateStore(tmp_path / "state.json")
    persisted(store, drive(state))
    seen = []
    for i, stop in enumerate(stops.split()):
        if stop == "term":
            persisted(store, on_clean_stop(store.load()))
        ds = persisted(store, on_restart(store.load(), at=T0 + i, max_restarts=3))
        assert not ds.clean_stop
        seen.append((ds.state, ds.restarts))
    assert seen == expected
    if seen[-1][0] is RB:
        assert ds.last_event is not None and ds.last_event.reason == CRASH_LOOP
        assert ds.rejected == {NEW.sha256: CRASH_LOOP} and serving_after_restart(ds) == OLD
    else:
        assert ds.rejected == {} and finish(ds)[-1].current == replace(NEW, format="onnx")


def test_clean_stop_is_cleared_by_any_transition() -> None:
    stopped = on_clean_stop(drive(State.DOWNLOAD))
    assert on_clean_stop(stopped) is stopped
    assert not apply(stopped, Event.OK, at=T0).clean_stop
    assert not apply(stopped, Event.ABORTED, "transport", at=T0).clean_stop
    # a crash_loop can only come from counted restarts: applied after a clean stop it does not count one more
    assert apply(stopped, Event.CRASH_LOOP, CRASH_LOOP, at=T0).restarts == stopped.restarts


def test_lost_clean_stop_marker_counts(tmp_path: Path) -> None:
    """The marker is saved like any state: if that save is lost (the latest file found corrupt, so the backup from
    before the stop is used), the restart counts, as it did before clean stops were told apart."""
    store = StateStore(tmp_path / "state.json")
    before = persisted(store, drive(State.PROBATION))
    persisted(store, on_clean_stop(before))
    assert decode(store.backup.read_bytes()) == before
    store.path.write_bytes(b"{half")
    assert on_restart(store.load(), at=T0).restarts == 1


# --- keep N, deletion, rejected ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 1, 2, 3])
def test_keep_n_and_bundles_to_delete(keep: int) -> None:
    ds, deleted = BASE, []
    for v in range(2, 7):
        path = finish(ds, ref(v), keep=keep)
        for a, b in pairwise(path):
            deleted += [r.version for r in bundles_to_delete(a, b)]
        ds = path[-1]
        assert ds.current is not None and ds.current.version == v
        assert [p.version for p in ds.previous] == list(range(v - 1, 0, -1))[:keep]
    assert deleted == list(range(1, 6 - keep))  # oldest first, each exactly once, never a kept one


def test_redeploying_a_previous_bundle() -> None:
    v2 = finish(BASE)[-1]
    v3 = finish(v2, NEWER)[-1]
    assert [p.version for p in v3.previous] == [2, 1]
    back = finish(v3, replace(v3.previous[0], format=None), keep=2)  # the operator moves the group back to v2
    assert back[-1].current is not None and back[-1].current.version == 2
    assert [p.version for p in back[-1].previous] == [3, 1]
    assert all(bundles_to_delete(a, b) == () for a, b in pairwise(back))
    # a previous bundle that now fails is no longer known-good: dropped from previous, its file deleted
    probation = drive(State.PROBATION, v3, replace(v3.previous[0], format=None))
    rb = apply(probation, Event.FAILED, "error_rate", at=T0)
    assert [p.version for p in rb.previous] == [1]
    idle = apply(rb, Event.OK, at=T0)
    assert [r.version for r in bundles_to_delete(rb, idle)] == [2]


def test_rejected_is_bounded_oldest_first() -> None:
    ds = BASE
    for v in range(2, MAX_REJECTED + 7):
        ds = apply(apply(drive(State.STAGE, ds, ref(v)), Event.FAILED, f"bad {v}", at=T0), Event.OK, at=T0)
    assert len(ds.rejected) == MAX_REJECTED
    reasons = list(ds.rejected.values())
    assert (reasons[0], reasons[-1]) == ("bad 7", f"bad {MAX_REJECTED + 6}")


def test_long_reasons_are_clipped() -> None:
    ds = apply(drive(State.VERIFY), Event.FAILED, "x" * 1000, at=T0)
    assert len(ds.rejected[NEW.sha256]) == dsm.MAX_REASON
    assert decode(encode(ds)) == ds


@pytest.mark.parametrize(("state", "exc", "expected"), [
    (State.DOWNLOAD, TransportError("timeout", reason="timeout"), (Event.ABORTED, "timeout")),
    (State.CHECK, TransportError("down"), (Event.ABORTED, "transport")),
    (State.VERIFY, TransportError("?"), (Event.ABORTED, "transport")),
    (State.DOWNLOAD, BundleRejected("bad", reason="hash_mismatch"), (Event.FAILED, "hash_mismatch")),
    (State.STAGE, RuntimeUnavailable("no ort"), (Event.FAILED, "runtime_unavailable")),
    (State.STAGE, MemoryError(), (Event.FAILED, "MemoryError")),
])
def test_failure_event(state: State, exc: BaseException, expected: tuple[Event, str]) -> None:
    assert failure_event(state, exc) == expected
    assert (state, expected[0]) in TRANSITIONS


# --- JSON ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("state", list(State))
def test_json_round_trip(state: State) -> None:
    ds = drive(state)
    assert decode(encode(ds)) == ds
    assert DeployState.from_json(json.loads(json.dumps(ds.to_json()))) == ds
    doc = json.loads(encode(ds))
    assert doc["schema"] == dsm.SCHEMA_VERSION and doc["state"] == state.value
    assert encode(decode(encode(ds))) == encode(ds)  # canonical bytes


def test_clean_stop_json_and_files_without_it() -> None:
    ds = drive(State.PROBATION)
    assert "clean_stop" not in ds.to_json()  # written only while set: other files are what older agents wrote
    stopped = on_clean_stop(ds)
    assert json.loads(encode(stopped))["clean_stop"] is True
    assert decode(encode(stopped)) == stopped
    assert encode(decode(encode(stopped))) == encode(stopped)
    explicit = {**ds.to_json(), "clean_stop": False}
    assert DeployState.from_json(explicit) == ds


def test_state_file_written_before_clean_stops_loads(tmp_path: Path) -> None:
    """A deploy-state.json as agents wrote it before the marker existed: it loads, and its restart counts."""
    bundle = {"name": "digits", "version": 2, "sha256": "2" * 64, "path": "bundles/digits-2.bundle",
              "format": "onnx"}
    old_file = {"schema": 1, "state": "probation", "current": {**bundle, "version": 1, "sha256": "1" * 64,
                                                                "path": "bundles/digits-1.bundle"},
                "candidate": bundle, "previous": [], "restarts": 1, "rejected": {},
                "last_event": {"state": "activate", "event": "ok", "reason": "", "at": T0}, "updated_at": T0}
    store = StateStore(tmp_path / "deploy-state.json")
    store.path.write_text(json.dumps(old_file, indent=2, sort_keys=True) + "\n")
    ds = store.load()
    assert (ds.state, ds.restarts, ds.clean_stop) == (State.PROBATION, 1, False)
    assert encode(ds) == store.path.read_bytes()  # the format is unchanged unless a clean stop is marked
    assert on_restart(ds, at=T0 + 1).restarts == 2


def _probation_json() -> dict[str, Any]:
    return drive(State.PROBATION).to_json()


def _set(path: str, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return mutate


@pytest.mark.parametrize(("mutation", "why"), [
    (_set("schema", 2), "future schema"),
    (_set("schema", True), "bool schema"),
    (_set("state", "reboot"), "unknown state"),
    (_set("state", "idle"), "candidate in idle"),
    (_set("candidate", None), "probation without a candidate"),
    (_set("candidate.format", None), "serving candidate without a format"),
    (_set("candidate.sha256", "A" * 64), "uppercase sha"),
    (_set("candidate.version", True), "bool version"),
    (_set("candidate.version", -1), "negative version"),
    (_set("candidate.name", ""), "empty name"),
    (_set("candidate.extra", 1), "unknown bundle field"),
    (_set("candidate.path", KeyError), "missing bundle field"),
    (_set("current.format", None), "current never served"),
    (_set("current.sha256", "2" * 64), "candidate already current"),
    (_set("candidate.path", "bundles/digits-1.bundle"), "two bundles on one path"),
    (_set("restarts", -1), "negative restarts"),
    (_set("restarts", 1.5), "float restarts"),
    (_set("rejected", {"2" * 64: "bad"}), "rejected candidate outside rollback"),
    (_set("rejected", {"nope": "bad"}), "bad rejected key"),
    (_set("rejected", []), "rejected not an object"),
    (_set("previous", {}), "previous not a list"),
    (_set("previous", [{"name": "digits", "version": 1, "sha256": "1" * 64, "path": "p", "format": "onnx"}]),
     "current repeated in previous"),
    (_set("last_event.event", "boom"), "unknown event"),
    (_set("last_event.at", -1), "negative time"),
    (_set("updated_at", "yesterday"), "string time"),
    (_set("updated_at", KeyError), "missing field"),
    (_set("surprise", 1), "unknown field"),
    (_set("clean_stop", 1), "int clean_stop"),
    (_set("clean_stop", "true"), "string clean_stop"),
    (_set("clean_stop", None), "null clean_stop"),
])
def test_from_json_is_strict(mutation: Any, why: str) -> None:
    doc = _probation_json()
    mutation(doc)
    with pytest.raises(InvalidState):
        DeployState.from_json(doc)


@pytest.mark.parametrize("data", [b"", b"[]", b"null", b"\xff\xfe", b'{"schema": 1, "schema": 1}',
                                  encode(drive(State.PROBATION)).replace(b"1700000006.0", b"NaN"),
                                  encode(drive(State.PROBATION))[:-40]])
def test_decode_rejects_bad_bytes(data: bytes) -> None:
    with pytest.raises(InvalidState):
        decode(data)


def test_state_is_immutable() -> None:
    ds = drive(State.ROLLBACK)
    with pytest.raises(TypeError):
        ds.rejected[NEWER.sha256] = "x"  # type: ignore[index]
    src = {NEW.sha256: "parity"}
    copy = DeployState(state=State.IDLE, current=OLD, rejected=src)
    src["x"] = "y"
    assert dict(copy.rejected) == {NEW.sha256: "parity"}


# --- exhaustive walk: invariants of every reachable state ---------------------------------------------------------

def _successors(ds: DeployState, pool: list[BundleRef], keep: int) -> list[DeployState]:
    out = [on_restart(ds, at=T0, max_restarts=3), on_restart(on_clean_stop(ds), at=T0, max_restarts=3)]
    for e in allowed_events(ds.state):
        if e is Event.UPDATE_AVAILABLE:
            out += [on_update_found(ds, r, at=T0) for r in pool]
        elif ds.state is State.STAGE and e is Event.OK:
            out += [on_staged(ds, f, at=T0) for f in ("onnx", "tflite")]
        elif e not in (Event.RESTARTED, Event.CRASH_LOOP):
            out.append(apply(ds, e, "bad", at=T0, keep=keep))
    return out


def _key(ds: DeployState) -> str:
    return json.dumps({**ds.to_json(), "last_event": None, "updated_at": None}, sort_keys=True)


@pytest.mark.parametrize("start", [BASE, dsm.initial_state()], ids=["serving", "fresh"])
def test_every_reachable_state_keeps_the_invariants(start: DeployState) -> None:
    keep = 1
    pool = [ref(1), ref(2), ref(3)]
    seen, todo, edges = {_key(start)}, deque([start]), 0
    while todo:
        ds = todo.popleft()
        assert decode(encode(ds)) == ds
        assert len(ds.previous) <= keep
        # whatever the crash, the restarted agent serves exactly the old or the new bundle, and something if the
        # device had a known-good bundle
        after = on_restart(ds, at=T0)
        serving = serving_after_restart(after)
        assert serving in (ds.current, ds.candidate)
        if ds.current is not None:
            assert serving is not None
        if ds.state in (State.ACTIVATE, State.PROBATION, State.COMMIT) and after.state is not State.ROLLBACK:
            assert serving == ds.candidate
        # after a clean stop: resumed as after a crash, but never counted and never a crash loop; the marker is gone
        clean = on_restart(on_clean_stop(ds), at=T0)
        assert not clean.clean_stop and clean.restarts == ds.restarts
        assert (clean.state is State.ROLLBACK) == (ds.state is State.ROLLBACK)
        assert serving_after_restart(clean) in (ds.current, ds.candidate)
        if after.state is clean.state:
            assert serving_after_restart(clean) == serving
        for nxt in _successors(ds, pool, keep):
            edges += 1
            live = {r.path for r in dsm.referenced(nxt)}
            assert all(r.path not in live for r in bundles_to_delete(ds, nxt))
            # a known-good bundle is never deleted while it could still be needed
            if ds.current is not None and nxt.state is not State.IDLE:
                assert ds.current not in bundles_to_delete(ds, nxt)
            k = _key(nxt)
            if k not in seen:
                seen.add(k)
                todo.append(nxt)
    assert len(seen) > 100 and edges > len(seen)


# --- StateStore ----------------------------------------------------------------------------------------------------

def test_store_missing_file_is_a_fresh_device(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "nested" / "state.json").load() == dsm.initial_state()
    store = StateStore.in_dir(tmp_path / "nested")
    store.save(BASE)
    assert store.load() == BASE and store.path.name == "deploy-state.json"


def test_store_keeps_the_previous_good_copy(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    a, b, c = drive(State.CHECK), drive(State.DOWNLOAD), drive(State.VERIFY)
    store.save(a)
    assert not store.backup.exists()
    store.save(b)
    assert decode(store.backup.read_bytes()) == a and store.load() == b
    store.save(b)  # unchanged: nothing rewritten, the backup stays one step behind
    assert decode(store.backup.read_bytes()) == a
    store.save(c)
    assert decode(store.backup.read_bytes()) == b and store.load() == c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.bak"]


@pytest.mark.parametrize("damage", [b"", b"{not json", b"\x00" * 64, b"half"], ids=["empty", "garbage", "zeros",
                                                                                    "truncated"])
def test_store_corrupt_latest_falls_back_to_backup(tmp_path: Path, damage: bytes, caplog: Any) -> None:
    store = StateStore(tmp_path / "state.json")
    a, b = drive(State.STAGE), drive(State.ACTIVATE)
    store.save(a)
    store.save(b)
    good = store.path.read_bytes()
    store.path.write_bytes(good[: len(good) // 2] if damage == b"half" else damage)
    assert store.load() == a
    assert str(store.path) in caplog.text
    # resuming from the older copy is safe: STAGE is redone
    assert on_restart(store.load(), at=T0).state is State.STAGE
    # saving over a corrupt latest must not overwrite the good backup with it
    c = drive(State.PROBATION)
    store.save(c)
    assert store.load() == c and decode(store.backup.read_bytes()) == a


def test_store_corrupt_without_backup_names_the_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.path.write_bytes(b'{"schema": 99}')
    with pytest.raises(StateFileError) as info:
        store.load()
    assert info.value.path == store.path and str(store.path) in str(info.value)
    store.backup.write_bytes(b"junk")
    with pytest.raises(StateFileError) as info:
        store.load()
    assert str(store.path) in str(info.value) and str(store.backup) in str(info.value)


def test_store_missing_latest_uses_backup(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.save(drive(State.CHECK))
    store.save(drive(State.DOWNLOAD))
    store.path.unlink()
    assert store.load() == drive(State.CHECK)


def test_store_failed_rename_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path / "state.json")
    a, b = drive(State.ACTIVATE), drive(State.PROBATION)
    store.save(a)
    real_replace = os.replace

    def replace_fails_for_latest(src: Any, dst: Any) -> None:
        if Path(dst) == store.path:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_for_latest)
    with pytest.raises(OSError):
        store.save(b)
    monkeypatch.undo()
    assert store.load() == a
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_store_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path / "state.json")
    a = drive(State.ACTIVATE)
    store.save(a)

    def fsync_fails(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError):
        store.save(drive(State.PROBATION))
    monkeypatch.undo()
    assert store.load() == a
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_store_survives_sigkill_mid_save(tmp_path: Path) -> None:
    """A real process saving in a loop, killed with SIGKILL at random moments: the file always loads."""
    path = tmp_path / "state.json"
    states = [drive(s) for s in State]
    script = textwrap.dedent(f"""
        from pathlib import Path
        from agent.deploy.machine import decode
        from agent.deploy.store import StateStore
        states = [decode(bytes.fromhex(h)) for h in {[encode(s).hex() for s in states]!r}]
        store = StateStore(Path({str(path)!r}))
        i = 0
        while True:
            store.save(states[i % len(states)])
            i += 1
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(7)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
        try:
            deadline = time.monotonic() + 20
            while not path.with_name(path.name + ".bak").exists():
                assert proc.poll() is None, "the saving process died"
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.1))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert StateStore(path).load() in states
        assert decode(path.read_bytes()) in states  # the latest itself, not only the backup
