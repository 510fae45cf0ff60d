"""The agent's deployment state machine (Mender-style): a pure core, no I/O, no MQTT, no clock.

    IDLE -check-> CHECK -update_available-> DOWNLOAD -ok-> VERIFY -ok-> STAGE -ok-> ACTIVATE -ok-> PROBATION
         -passed-> COMMIT -ok-> IDLE;   CHECK -no_update-> IDLE;   every failure -> ROLLBACK -ok-> IDLE

Everything the machine may do is one declarative table, `TRANSITIONS`; the functions here only look a transition up
and do the bookkeeping (which bundle is current, which are kept, which versions were rejected, the crash counter).
Times (`at`) are values the caller passes in. Every `DeployState` is validated on construction, so a function here
can never hand back a state that would not load again.

The driver (the I/O edge, not this module) runs it like this, and the order is the point:

    ds = on_restart(store.load(), at=now())   # a fresh agent first resumes from the persisted state
    store.save(ds)                             # persist BEFORE acting
    serve(serving_after_restart(ds))           # exactly the old or the new model, never none
    while not stop_requested():
        event, reason = work(ds)               # each state's work returns an event (failure_event() maps errors)
        new = apply(ds, event, reason, at=now())
        store.save(new)                        # persist the new state BEFORE doing its work ...
        delete(bundles_to_delete(ds, new))     # ... and delete files only once no saved state refers to them
        ds = new
    stop_serving()
    store.save(on_clean_stop(ds))              # a normal shutdown is not a crash: the next start is not counted

A crash at any point therefore restarts in the state whose work was under way, and `on_restart` decides what that
work may be trusted with: states before ACTIVATE retry (the old model still serves), ACTIVATE/PROBATION continue
probation on the candidate (it was, or was about to be, serving), COMMIT and ROLLBACK finish. A crash counter in
the persisted state turns a crash loop into a rollback with reason `crash_loop`. A clean stop is not a crash: the
driver's normal shutdown (SIGTERM, after it stopped serving) saves `on_clean_stop(ds)`, and the next on_restart
resumes without counting and clears that marker, so a crash after it counts again. A stop that never reached that
save (SIGKILL, a crash, a power cut, the hung-stage exit) leaves no marker and counts.

What each state's work is (for the driver):
    CHECK      refresh trust, read the group's deployment -> on_update_found(ds, ref or None)
    DOWNLOAD   fetch the candidate (transport errors -> `aborted`: retried at the next check, not blamed)
    VERIFY     verify the bundle and its target constraints against this device
    STAGE      load it in a fresh runtime session beside the serving one, warm up, golden parity -> on_staged()
    ACTIVATE   swap the serving reference to the staged session
    PROBATION  watch error rate, latency p95 against the budget, parity (a full window again after a restart)
    COMMIT     report `committed`; `ok` makes the candidate current and trims the kept bundles
    ROLLBACK   serve `current` again, drop the candidate's session, report `rolled_back` with the reason
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeVar

from agent.errors import (
    BundleRejected,
    FetchWorkerError,
    InvalidState,
    InvalidTransition,
    RuntimeUnavailable,
    TransportError,
)
from agent.errors import DeployStateError as DeployStateError  # re-exported: agent.cli catches it from here

SCHEMA_VERSION = 1
DEFAULT_KEEP = 2  # known-good bundles kept besides the current one
MAX_KEEP = 64
DEFAULT_MAX_RESTARTS = 3
MAX_REJECTED = 32  # oldest rejections are forgotten first
MAX_REASON = 200  # characters; longer reasons are clipped by apply()
CRASH_LOOP = "crash_loop"
CLEAN_STOP = "clean_stop"  # the reason of a `restarted` event that was not counted
NO_DEPLOYMENT = "no_deployment"  # CHECK's no_update reason when nothing is signed for the device's group
NOT_IN_WAVE = "not_in_wave"  # CHECK's no_update reason: outside a rollout's wave, no previous bundle named
# Failures that roll back without putting the candidate on the rejected list: the group's signed deployment moved
# on (a rollout aborted or advanced meanwhile), which is the controller's decision, not this device's verdict on
# the bundle; a later deployment of the same bundle must reach the device again. An encrypted bundle not (yet)
# granted to this device is no verdict on the bundle either: `packager device add` grants it later; nor is a
# device key file that cannot be used or does not open its grant ("key_unavailable": the device's own problem,
# fixed on the device and retried at the next poll).
NOT_BLAMED = frozenset({"superseded", "not_granted", "key_unavailable"})

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_T = TypeVar("_T", bound=StrEnum)


class State(StrEnum):
    IDLE = "idle"
    CHECK = "check"
    DOWNLOAD = "download"
    VERIFY = "verify"
    STAGE = "stage"
    ACTIVATE = "activate"
    PROBATION = "probation"
    COMMIT = "commit"
    ROLLBACK = "rollback"


class Event(StrEnum):
    CHECK = "check"  # a check is due (timer, or a `notify` poke)
    UPDATE_AVAILABLE = "update_available"  # CHECK found a bundle to deploy (carries the candidate)
    NO_UPDATE = "no_update"  # nothing new, or only what is current or was rejected
    OK = "ok"  # the state's work succeeded
    PASSED = "passed"  # the probation window passed
    FAILED = "failed"  # the state's work failed: the candidate is rejected (reason recorded)
    ABORTED = "aborted"  # a transport failure before the candidate is verified: rolled back, not rejected
    RESTARTED = "restarted"  # the agent restarted in this state (counted unless it stopped cleanly; on_restart)
    CRASH_LOOP = "crash_loop"  # the agent restarted max_restarts times during this deployment


_S, _E = State, Event

# The whole machine. (state, event) -> next state; anything not listed is an InvalidTransition.
TRANSITIONS: Mapping[tuple[State, Event], State] = MappingProxyType({
    (_S.IDLE, _E.CHECK): _S.CHECK,

    (_S.CHECK, _E.UPDATE_AVAILABLE): _S.DOWNLOAD,
    (_S.CHECK, _E.NO_UPDATE): _S.IDLE,
    (_S.CHECK, _E.FAILED): _S.ROLLBACK,
    (_S.CHECK, _E.ABORTED): _S.ROLLBACK,
    (_S.CHECK, _E.RESTARTED): _S.CHECK,
    (_S.CHECK, _E.CRASH_LOOP): _S.ROLLBACK,

    (_S.DOWNLOAD, _E.OK): _S.VERIFY,
    (_S.DOWNLOAD, _E.FAILED): _S.ROLLBACK,
    (_S.DOWNLOAD, _E.ABORTED): _S.ROLLBACK,
    (_S.DOWNLOAD, _E.RESTARTED): _S.DOWNLOAD,
    (_S.DOWNLOAD, _E.CRASH_LOOP): _S.ROLLBACK,

    (_S.VERIFY, _E.OK): _S.STAGE,
    (_S.VERIFY, _E.FAILED): _S.ROLLBACK,
    (_S.VERIFY, _E.ABORTED): _S.ROLLBACK,  # verifying refreshes the metadata: a broker lost meanwhile is no verdict
    (_S.VERIFY, _E.RESTARTED): _S.VERIFY,
    (_S.VERIFY, _E.CRASH_LOOP): _S.ROLLBACK,

    (_S.STAGE, _E.OK): _S.ACTIVATE,
    (_S.STAGE, _E.FAILED): _S.ROLLBACK,
    (_S.STAGE, _E.RESTARTED): _S.STAGE,
    (_S.STAGE, _E.CRASH_LOOP): _S.ROLLBACK,

    (_S.ACTIVATE, _E.OK): _S.PROBATION,
    (_S.ACTIVATE, _E.FAILED): _S.ROLLBACK,
    (_S.ACTIVATE, _E.RESTARTED): _S.PROBATION,  # the candidate serves after a restart: probation starts over
    (_S.ACTIVATE, _E.CRASH_LOOP): _S.ROLLBACK,

    (_S.PROBATION, _E.PASSED): _S.COMMIT,
    (_S.PROBATION, _E.FAILED): _S.ROLLBACK,
    (_S.PROBATION, _E.RESTARTED): _S.PROBATION,
    (_S.PROBATION, _E.CRASH_LOOP): _S.ROLLBACK,

    (_S.COMMIT, _E.OK): _S.IDLE,
    # the candidate passed probation, but after a restart in COMMIT it no longer loads (a corrupt release): reject it
    (_S.COMMIT, _E.FAILED): _S.ROLLBACK,
    (_S.ROLLBACK, _E.OK): _S.IDLE,
})

# States in which the candidate is (or may already be) the serving model.
CANDIDATE_SERVES = frozenset({State.ACTIVATE, State.PROBATION, State.COMMIT})
# States a restart counts against the deployment in progress (COMMIT and ROLLBACK are finished, not counted).
COUNTED = frozenset({State.CHECK, State.DOWNLOAD, State.VERIFY, State.STAGE, State.ACTIVATE, State.PROBATION})
_NEEDS_CANDIDATE = frozenset({State.DOWNLOAD, State.VERIFY, State.STAGE, *CANDIDATE_SERVES})
_NO_CANDIDATE = frozenset({State.IDLE, State.CHECK})
_REJECTING = frozenset({Event.FAILED, Event.CRASH_LOOP})


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_time(v: object, what: str) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise InvalidState(f"{what} must be a finite, non-negative number of seconds, not {v!r}")
    return float(v)


def _check_reason(v: object, what: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_REASON:
        raise InvalidState(f"{what} must be a string of at most {MAX_REASON} characters")
    return v


@dataclass(frozen=True)
class BundleRef:
    """One bundle as the state machine knows it. `format` is the artifact served ("onnx", "tflite"), None until
    STAGE has chosen one. The sha256 is the bundle's identity; `path` is where its file lives."""

    name: str
    version: int
    sha256: str
    path: str
    format: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidState(f"bundle name must be a non-empty string, not {self.name!r}")
        if not _is_int(self.version) or self.version < 0:
            raise InvalidState(f"bundle version must be a non-negative integer, not {self.version!r}")
        if not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256):
            raise InvalidState(f"bundle sha256 must be 64 lowercase hex digits, not {self.sha256!r}")
        if not isinstance(self.path, str) or not self.path:
            raise InvalidState(f"bundle path must be a non-empty string, not {self.path!r}")
        if self.format is not None and (not isinstance(self.format, str) or not self.format):
            raise InvalidState(f"bundle format must be a non-empty string or None, not {self.format!r}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "path": self.path,
                "format": self.format}

    @classmethod
    def from_json(cls, obj: object, where: str = "bundle") -> BundleRef:
        d = _exact_keys(obj, {"name", "version", "sha256", "path", "format"}, where)
        try:
            return cls(d["name"], d["version"], d["sha256"], d["path"], d["format"])
        except InvalidState as e:
            raise InvalidState(f"{where}: {e}") from e


@dataclass(frozen=True)
class LastEvent:
    """The last event applied: in which state it happened, what it was, why, and when (caller's clock)."""

    state: State
    event: Event
    reason: str
    at: float

    def __post_init__(self) -> None:
        if not isinstance(self.state, State) or not isinstance(self.event, Event):
            raise InvalidState(f"last_event needs a State and an Event, not {self.state!r}, {self.event!r}")
        _check_reason(self.reason, "last_event.reason")
        object.__setattr__(self, "at", _check_time(self.at, "last_event.at"))

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "event": self.event.value, "reason": self.reason, "at": self.at}

    @classmethod
    def from_json(cls, obj: object) -> LastEvent:
        d = _exact_keys(obj, {"state", "event", "reason", "at"}, "last_event")
        return cls(_enum(State, d["state"], "last_event.state"), _enum(Event, d["event"], "last_event.event"),
                   d["reason"], d["at"])


@dataclass(frozen=True)
class DeployState:
    """What the agent persists. `current` is the committed, known-good bundle (None on a fresh device);
    `candidate` the bundle being deployed; `previous` older known-good bundles kept on disk, newest first;
    `restarts` the crash counter of the deployment in progress; `rejected` sha256 -> reason for bundles rolled back,
    which CHECK ignores until a different one is published; `clean_stop` is set by on_clean_stop (the agent shut
    down normally and has not started since) and cleared by the next on_restart or transition."""

    state: State = State.IDLE
    current: BundleRef | None = None
    candidate: BundleRef | None = None
    previous: tuple[BundleRef, ...] = ()
    restarts: int = 0
    rejected: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    last_event: LastEvent | None = None
    updated_at: float | None = None
    clean_stop: bool = False

    def __post_init__(self) -> None:
        # freeze the containers: a frozen dataclass holding a dict or list would still be mutable
        object.__setattr__(self, "previous", tuple(self.previous))
        object.__setattr__(self, "rejected", MappingProxyType(dict(self.rejected)))
        if self.updated_at is not None:
            object.__setattr__(self, "updated_at", _check_time(self.updated_at, "updated_at"))
        self._validate()

    def _validate(self) -> None:
        s, cur, cand = self.state, self.current, self.candidate
        if not isinstance(s, State):
            raise InvalidState(f"state must be a State, not {s!r}")
        for ref in (cur, cand, *self.previous):
            if ref is not None and not isinstance(ref, BundleRef):
                raise InvalidState(f"bundles must be BundleRef, not {ref!r}")
        if self.last_event is not None and not isinstance(self.last_event, LastEvent):
            raise InvalidState(f"last_event must be a LastEvent, not {self.last_event!r}")
        if not _is_int(self.restarts) or self.restarts < 0:
            raise InvalidState(f"restarts must be a non-negative integer, not {self.restarts!r}")
        if s is State.IDLE and self.restarts:
            raise InvalidState("restarts must be 0 in idle")
        if not isinstance(self.clean_stop, bool):
            raise InvalidState(f"clean_stop must be a boolean, not {self.clean_stop!r}")
        if s in _NEEDS_CANDIDATE and cand is None:
            raise InvalidState(f"state {s} needs a candidate")
        if s in _NO_CANDIDATE and cand is not None:
            raise InvalidState(f"state {s} cannot have a candidate")
        if s in CANDIDATE_SERVES and cand is not None and cand.format is None:
            raise InvalidState(f"state {s} needs the candidate's served format (set by STAGE)")
        for ref, what in [(cur, "current"), *((p, "previous") for p in self.previous)]:
            if ref is not None and ref.format is None:
                raise InvalidState(f"{what} bundle {ref.name} v{ref.version} has no format: it never served")
        if len(self.previous) > MAX_KEEP:
            raise InvalidState(f"previous holds {len(self.previous)} bundles, more than {MAX_KEEP}")
        kept = [r for r in (cur, *self.previous) if r is not None]
        if len({r.sha256 for r in kept}) != len(kept):
            raise InvalidState("current and previous must be distinct bundles")
        if cand is not None and cur is not None and cand.sha256 == cur.sha256:
            raise InvalidState("the candidate is already current")
        paths: dict[str, str] = {}
        for ref in (*kept, *([cand] if cand is not None else [])):
            if paths.setdefault(ref.path, ref.sha256) != ref.sha256:
                raise InvalidState(f"two different bundles share the path {ref.path!r}")
        if len(self.rejected) > MAX_REJECTED:
            raise InvalidState(f"rejected holds {len(self.rejected)} entries, more than {MAX_REJECTED}")
        for sha, reason in self.rejected.items():
            if not isinstance(sha, str) or not _SHA256_RE.match(sha):
                raise InvalidState(f"rejected key must be a sha256, not {sha!r}")
            _check_reason(reason, "rejected reason")
        if cand is not None and cand.sha256 in self.rejected and s is not State.ROLLBACK:
            raise InvalidState("the candidate was rejected")
        if any(r.sha256 in self.rejected for r in kept):
            raise InvalidState("a kept known-good bundle cannot be rejected")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "state": self.state.value,
            "current": self.current.to_json() if self.current else None,
            "candidate": self.candidate.to_json() if self.candidate else None,
            "previous": [p.to_json() for p in self.previous],
            "restarts": self.restarts,
            "rejected": dict(self.rejected),
            "last_event": self.last_event.to_json() if self.last_event else None,
            "updated_at": self.updated_at,
        }
        # Written only while set: every other file stays exactly what agents without the marker write and read
        # (one downgraded past a clean stop falls back to the .bak, which never holds it).
        if self.clean_stop:
            doc["clean_stop"] = True
        return doc

    @classmethod
    def from_json(cls, obj: object) -> DeployState:
        d = _exact_keys(obj, {"schema", "state", "current", "candidate", "previous", "restarts", "rejected",
                              "last_event", "updated_at"}, "deployment state", optional={"clean_stop"})
        if d["schema"] != SCHEMA_VERSION or not _is_int(d["schema"]):
            raise InvalidState(f"unsupported deployment state schema {d['schema']!r} (this agent reads "
                               f"{SCHEMA_VERSION})")
        if not isinstance(d["previous"], list):
            raise InvalidState("previous must be a list")
        if not isinstance(d["rejected"], dict):
            raise InvalidState("rejected must be an object")
        return cls(
            state=_enum(State, d["state"], "state"),
            current=None if d["current"] is None else BundleRef.from_json(d["current"], "current"),
            candidate=None if d["candidate"] is None else BundleRef.from_json(d["candidate"], "candidate"),
            previous=tuple(BundleRef.from_json(p, f"previous[{i}]") for i, p in enumerate(d["previous"])),
            restarts=d["restarts"],
            rejected=d["rejected"],
            last_event=None if d["last_event"] is None else LastEvent.from_json(d["last_event"]),
            updated_at=d["updated_at"],
            clean_stop=d.get("clean_stop", False),  # absent in files written before the marker existed
        )


def _exact_keys(obj: object, keys: set[str], where: str, optional: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidState(f"{where} must be a JSON object")
    allowed = keys | (optional or set())
    if not keys <= set(obj) <= allowed:
        missing, extra = sorted(keys - set(obj)), sorted(set(obj) - allowed)
        raise InvalidState(f"{where}: missing {missing}, unexpected {extra}")
    return obj


def _enum(kind: type[_T], v: object, what: str) -> _T:
    try:
        if isinstance(v, str):
            return kind(v)
    except ValueError:
        pass
    raise InvalidState(f"{what}: unknown value {v!r}")


def _reject_constant(name: str) -> Any:
    raise InvalidState(f"{name} is not valid JSON here")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise InvalidState("duplicate key in JSON object")
    return d


def encode(ds: DeployState) -> bytes:
    """The persisted form: UTF-8 JSON, keys sorted, one trailing newline."""
    return (json.dumps(ds.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def decode(data: bytes) -> DeployState:
    """Parse and validate the persisted form; anything off (bad UTF-8 or JSON, NaN, duplicate keys, unknown or
    missing fields, an inconsistent state) raises InvalidState."""
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_pairs)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidState(f"not valid JSON: {e}") from e
    return DeployState.from_json(obj)


def initial_state() -> DeployState:
    """A fresh device: idle, nothing deployed."""
    return DeployState()


def next_state(state: State, event: Event | str) -> State:
    """Look the transition up in TRANSITIONS; not there -> InvalidTransition."""
    try:
        return TRANSITIONS[(State(state), Event(event))]
    except (KeyError, ValueError):
        raise InvalidTransition(str(state), str(event)) from None


def allowed_events(state: State) -> frozenset[Event]:
    return frozenset(e for (s, e) in TRANSITIONS if s is state)


def _clip(reason: str) -> str:
    if not isinstance(reason, str):
        raise InvalidState(f"reason must be a string, not {reason!r}")
    return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 1] + "…"


def apply(ds: DeployState, event: Event | str, reason: str = "", *, at: float, keep: int = DEFAULT_KEEP,
          candidate: BundleRef | None = None) -> DeployState:
    """Take one transition of the table from `ds` and do its bookkeeping; returns the new state to persist.

    - update_available: `candidate` is the bundle to deploy; the crash counter starts at 0.
    - any other event may pass `candidate` to refine the candidate's ref (same sha256), e.g. STAGE's format.
    - restarted / crash_loop (see on_restart) count a restart, unless `ds.clean_stop` (the agent stopped cleanly).
    - every transition clears `clean_stop`: a crash after it counts again.
    - entering ROLLBACK on failed/crash_loop records the candidate in `rejected` with the reason (and drops it
      from `previous`: it is no longer known-good); `aborted`, and a failure whose reason is in NOT_BLAMED
      ("superseded": the deployment moved on, e.g. a rollout was aborted), roll back without blaming it.
    - COMMIT -ok-> IDLE: the candidate becomes current, the old current goes first in `previous`, which is trimmed
      to `keep`; use bundles_to_delete(ds, new) for the files no longer needed.
    - entering IDLE clears the candidate and the crash counter.
    """
    if not _is_int(keep) or not 0 <= keep <= MAX_KEEP:
        raise ValueError(f"keep must be an integer in [0, {MAX_KEEP}], not {keep!r}")
    nxt = next_state(ds.state, event)
    event = Event(event)
    reason = _clip(reason)
    cand = ds.candidate
    restarts = ds.restarts
    if event is Event.UPDATE_AVAILABLE:
        if candidate is None:
            raise InvalidTransition(ds.state, event, "the candidate bundle is missing")
        cand, restarts = candidate, 0
    elif candidate is not None:
        if cand is None or candidate.sha256 != cand.sha256:
            raise InvalidTransition(ds.state, event, "a step may refine the candidate's ref, never replace it")
        cand = candidate
    current, previous, rejected = ds.current, ds.previous, dict(ds.rejected)
    if event in (Event.RESTARTED, Event.CRASH_LOOP) and ds.state in COUNTED and not ds.clean_stop:
        restarts += 1
    if nxt is State.ROLLBACK and ds.state is not State.ROLLBACK and cand is not None and event in _REJECTING \
            and reason not in NOT_BLAMED:
        rejected.pop(cand.sha256, None)  # re-inserted as the newest
        rejected[cand.sha256] = reason or event.value
        while len(rejected) > MAX_REJECTED:
            del rejected[next(iter(rejected))]
        previous = tuple(p for p in previous if p.sha256 != cand.sha256)
    if ds.state is State.COMMIT and nxt is State.IDLE:
        assert cand is not None  # a COMMIT state always has one (validated)
        older = (current, *previous) if current is not None else previous
        previous = tuple(p for p in older if p.sha256 != cand.sha256)[:keep]
        current = cand
    if nxt is State.IDLE:
        cand, restarts = None, 0
    return DeployState(state=nxt, current=current, candidate=cand, previous=previous, restarts=restarts,
                       rejected=rejected, last_event=LastEvent(ds.state, event, reason, at), updated_at=at)


def begin_check(ds: DeployState, *, at: float) -> DeployState:
    """IDLE -> CHECK (a check is due)."""
    return apply(ds, Event.CHECK, at=at)


def on_update_found(ds: DeployState, ref: BundleRef | None, *, at: float) -> DeployState:
    """CHECK's outcome: `ref` is the bundle the group's deployment names (None: no deployment for this device).
    The current bundle, or one rejected on this device, is not deployed again (-> IDLE); a bundle whose path is
    taken by a different kept bundle fails the check (it would overwrite a known-good file)."""
    if ds.state is not State.CHECK:
        raise InvalidTransition(ds.state, Event.UPDATE_AVAILABLE)
    if ref is None:
        return apply(ds, Event.NO_UPDATE, NO_DEPLOYMENT, at=at)
    if ds.current is not None and ref.sha256 == ds.current.sha256:
        return apply(ds, Event.NO_UPDATE, "current", at=at)
    if ref.sha256 in ds.rejected:
        return apply(ds, Event.NO_UPDATE, f"rejected: {ds.rejected[ref.sha256]}", at=at)
    if any(r.path == ref.path and r.sha256 != ref.sha256 for r in referenced(ds)):
        return apply(ds, Event.FAILED, "path_conflict", at=at)
    return apply(ds, Event.UPDATE_AVAILABLE, at=at, candidate=ref)


def no_deployment(ds: DeployState) -> bool:
    """Whether the last check found no deployment signed for this device's group (a mistyped group looks so)."""
    le = ds.last_event
    return le is not None and le.event is Event.NO_UPDATE and le.reason == NO_DEPLOYMENT


def on_staged(ds: DeployState, fmt: str, *, at: float) -> DeployState:
    """STAGE -ok-> ACTIVATE, recording which artifact ("onnx", "tflite") the candidate serves."""
    if ds.state is not State.STAGE or ds.candidate is None:
        raise InvalidTransition(ds.state, Event.OK, "on_staged is STAGE's outcome")
    return apply(ds, Event.OK, at=at, candidate=replace(ds.candidate, format=fmt))


def on_clean_stop(ds: DeployState) -> DeployState:
    """The state to save when the agent shuts down normally, after it stopped serving: `ds` marked `clean_stop`, so
    the next on_restart does not count that restart. Not a transition: state, last event and time are unchanged."""
    return ds if ds.clean_stop else replace(ds, clean_stop=True)


def on_restart(ds: DeployState, *, at: float, max_restarts: int = DEFAULT_MAX_RESTARTS) -> DeployState:
    """What a freshly started agent does with the state it persisted before it stopped (or crashed).

    IDLE: nothing. COMMIT / ROLLBACK: unchanged: the driver finishes that step (both are idempotent).
    CHECK .. STAGE: count a restart and retry the persisted step (the old model serves; STAGE loading a model may
    be what crashed). ACTIVATE / PROBATION: the candidate was serving: count a restart (a crash is a probation
    failure signal) and continue in PROBATION. Once the count reaches `max_restarts`: ROLLBACK, reason crash_loop.
    After a clean stop (`ds.clean_stop`) the same happens without counting (reason clean_stop), never a
    crash_loop, and the marker is cleared in every state, so a crash after this start counts again.
    Returns `ds` itself when nothing changes, so `new is ds` tells the driver there is nothing to save."""
    if not _is_int(max_restarts) or max_restarts < 1:
        raise ValueError(f"max_restarts must be a positive integer, not {max_restarts!r}")
    if ds.state not in COUNTED:
        return replace(ds, clean_stop=False) if ds.clean_stop else ds
    if ds.clean_stop:
        return apply(ds, Event.RESTARTED, CLEAN_STOP, at=at)  # not counted: apply() sees the marker
    n = ds.restarts + 1
    if n >= max_restarts:
        return apply(ds, Event.CRASH_LOOP, CRASH_LOOP, at=at)
    return apply(ds, Event.RESTARTED, f"restart {n} of {max_restarts}", at=at)


def serving_after_restart(ds: DeployState) -> BundleRef | None:
    """The bundle that must serve when the agent starts in `ds` (call it on on_restart's result): the candidate
    in ACTIVATE, PROBATION and COMMIT, the current bundle otherwise (None only on a device that never committed)."""
    return ds.candidate if ds.state in CANDIDATE_SERVES else ds.current


def referenced(ds: DeployState) -> tuple[BundleRef, ...]:
    """Every bundle `ds` refers to (current, candidate, previous): the files that must stay on disk."""
    return tuple(r for r in (ds.current, ds.candidate, *ds.previous) if r is not None)


def bundles_to_delete(old: DeployState, new: DeployState) -> tuple[BundleRef, ...]:
    """Bundles `old` referred to whose files `new` no longer needs (trimmed by COMMIT, a finished rollback's
    candidate). Delete them only after `new` is saved."""
    keep = {r.path for r in referenced(new)}
    out: dict[str, BundleRef] = {}
    for r in referenced(old):
        if r.path not in keep:
            out.setdefault(r.path, r)
    return tuple(out.values())


def failure_event(state: State, exc: BaseException) -> tuple[Event, str]:
    """The event and reason for an error raised by `state`'s work. Transport errors while checking, downloading or
    verifying abort without blaming the candidate (retried at the next check); everything else fails it."""
    if isinstance(exc, TransportError):
        if (state, Event.ABORTED) in TRANSITIONS:
            return Event.ABORTED, exc.reason
        return Event.FAILED, exc.reason
    if isinstance(exc, BundleRejected):
        return Event.FAILED, exc.reason
    if isinstance(exc, FetchWorkerError):
        return Event.FAILED, exc.type_name
    if isinstance(exc, RuntimeUnavailable):
        return Event.FAILED, "runtime_unavailable"
    return Event.FAILED, type(exc).__name__


# --- what a state's work reports, and the one way the driver applies it ------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one state's work found (agent/deploy/steps.py returns these; they never call apply themselves).

    `event`/`reason` as for apply(); `found` is CHECK's bundle (with Event.UPDATE_AVAILABLE: on_update_found decides
    whether it is deployed); `fmt` is STAGE's served format (with Event.OK); `extra` is added to the transition's
    published event (e.g. STAGE's `staging` figures) and never persisted."""

    event: Event
    reason: str = ""
    found: BundleRef | None = None
    fmt: str | None = None
    extra: Mapping[str, Any] | None = None

    @classmethod
    def checked(cls, found: BundleRef | None, none_reason: str = NO_DEPLOYMENT) -> Outcome:
        """CHECK's outcome: the bundle the group's deployment names for this device, or None when nothing is
        signed for it (`none_reason`: NO_DEPLOYMENT, or NOT_IN_WAVE outside a rollout's wave)."""
        if found is None:
            return cls(Event.NO_UPDATE, none_reason)
        return cls(Event.UPDATE_AVAILABLE, found=found)


def advance(ds: DeployState, outcome: Outcome, *, at: float, keep: int = DEFAULT_KEEP) -> DeployState:
    """The state after `ds` given what its work found: CHECK's find goes through on_update_found, STAGE's success
    through on_staged, everything else straight to apply()."""
    if ds.state is State.CHECK and outcome.event is Event.UPDATE_AVAILABLE:
        if outcome.found is None:
            raise InvalidTransition(ds.state, outcome.event, "the candidate bundle is missing")
        return on_update_found(ds, outcome.found, at=at)
    if ds.state is State.STAGE and outcome.event is Event.OK:
        if outcome.fmt is None:
            raise InvalidTransition(ds.state, outcome.event, "STAGE's success names the served format")
        return on_staged(ds, outcome.fmt, at=at)
    return apply(ds, outcome.event, outcome.reason, at=at, keep=keep)
