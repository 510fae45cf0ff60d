"""Each deployment state's work, as one table: `Steps.table` maps a `State` to its handler.

A handler does the state's I/O through injected ports (the fetch client, a stager, the serving holder, the
probation watch) and returns an `Outcome`: the event the state machine is fed. It never applies it: the driver
(`agent/deploy/driver.py`) saves the next state before the next handler runs. `Steps.run` maps a handler's errors
to events (`failure_event`), except `StopRequested`, which it lets through: a stop abandons the step, and the
persisted state resumes after the restart.

    CHECK      the group's deployment (a precheck's outcome when IDLE ran one) -> update_available / no_update
    DOWNLOAD   fetch the candidate's bundle (in a fetch worker)
    VERIFY     verify it against its signed target and this device, extracting it into its release directory
    STAGE      load it beside the serving model, warm it up, golden parity, time it -> ok with the served format
    ACTIVATE   swap the serving reference to the staged model (a failure serves the current bundle again)
    PROBATION  watch it serve -> passed, or failed with ProbationFailed's reason (the current bundle serves again)
    COMMIT     drop every loaded model but the serving one (a rollback to an older bundle reloads it from disk)
    ROLLBACK   serve the current bundle again
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from agent.deploy.fetch_client import Candidate
from agent.deploy.machine import (
    NOT_IN_WAVE,
    TRANSITIONS,
    BundleRef,
    DeployState,
    Event,
    InvalidTransition,
    Outcome,
    State,
    failure_event,
)
from agent.deploy.rollout import Membership
from agent.errors import ProbationFailed, StopRequested
from agent.serve.holder import LoadedModel, release_memory

log = logging.getLogger(__name__)

STAGE_RUNS = 20, 100  # warm-up and timing runs when STAGE measures a candidate
RELOAD_RUNS = 5, 20  # ... and when a bundle that already served is loaded again (restart, rollback)


class FetchPort(Protocol):
    """CHECK, DOWNLOAD and VERIFY (agent.deploy.fetch_client.FetchClient)."""

    def precheck(self) -> None: ...
    def check(self) -> Candidate | None: ...
    def remember(self, cand: Candidate | None) -> None: ...
    def candidate_for(self, ref: BundleRef) -> Candidate: ...
    def download(self, cand: Candidate) -> Path: ...
    def verify(self, cand: Candidate, extract_to: Path) -> None: ...

    @property
    def last_rollout(self) -> Membership | None:
        """This device's place in the rollout the latest CHECK read (None: no rollout)."""
        ...


@dataclass(frozen=True)
class Staged:
    """A staged model ready to serve, and the figures STAGE's transition publishes (`StagedModel.to_event()`)."""

    model: LoadedModel
    report: Mapping[str, Any]


class Stager(Protocol):
    """Loads an extracted release into a fresh runtime session beside the serving one (a model that hangs the
    process is the stager's to handle: it cannot be interrupted from here)."""

    def stage(self, ref: BundleRef, *, warm_runs: int, timing_runs: int) -> Staged: ...


class Holder(Protocol):
    """The one serving reference (agent.serve.holder.ModelHolder)."""

    def get(self) -> LoadedModel | None: ...
    def swap(self, new: LoadedModel | None) -> LoadedModel | None: ...


class ProbationWatch(Protocol):
    """Returns when `model` passed probation; raises ProbationFailed, or StopRequested (agent.deploy.probation)."""

    def __call__(self, model: LoadedModel | None, release: Path, fmt: str) -> None: ...


# States whose work has no failure edge (ROLLBACK: it finishes a deployment): an error there is raised as itself
NO_FAILURE_EVENT = frozenset(s for s in State if (s, Event.FAILED) not in TRANSITIONS)

Handler = Callable[[DeployState], Outcome]


def release_dir(state_dir: Path, name: str, version: int, sha256: str) -> Path:
    """Where a bundle is extracted (its BundleRef.path)."""
    return state_dir / "releases" / f"{name}-{version}-{sha256[:12]}"


def bundle_file(state_dir: Path, name: str, version: int) -> Path:
    """Where the fetch worker downloads a bundle."""
    return state_dir / "bundles" / f"{name}-{version}.bundle"


def fetched_files(state_dir: Path, name: str, version: int) -> list[Path]:
    """Every file the fetch worker may leave for a bundle: the verified bundle and, for an encrypted one, its
    ciphertext (until decrypted) and a decryption cut short (agent/trust/fetch.py names them)."""
    plain = bundle_file(state_dir, name, version)
    return [plain, state_dir / "encrypted" / plain.name, plain.with_name(f".{plain.name}.decrypting")]


class Steps:
    def __init__(self, *, fetch: FetchPort, stager: Stager, holder: Holder, watch: ProbationWatch, state_dir: Path,
                 group: str) -> None:
        self.fetch = fetch
        self.stager = stager
        self.holder = holder
        self.watch = watch
        self.state_dir = state_dir
        self.group = group
        self.models: dict[str, LoadedModel] = {}  # sha256 -> loaded, for an instant rollback swap
        self.staged: tuple[str, LoadedModel] | None = None  # STAGE's model (by sha256) until ACTIVATE swaps it in
        self._warned_no_deployment = False
        self.table: Mapping[State, Handler] = MappingProxyType({
            State.CHECK: self.check, State.DOWNLOAD: self.download, State.VERIFY: self.verify,
            State.STAGE: self.stage, State.ACTIVATE: self.activate, State.PROBATION: self.probation,
            State.COMMIT: self.commit, State.ROLLBACK: self.rollback,
        })

    def run(self, ds: DeployState) -> Outcome:
        """Do `ds.state`'s work; its errors become its failure event. StopRequested propagates."""
        handler = self.table.get(ds.state)
        if handler is None:
            raise InvalidTransition(ds.state, "work", "no work in this state")
        try:
            return handler(ds)
        except StopRequested:
            raise
        except ProbationFailed as e:
            self.serve_current_quietly(ds)
            return Outcome(Event.FAILED, e.reason)
        except Exception as e:
            event, reason = failure_event(ds.state, e)
            if ds.state in NO_FAILURE_EVENT:
                raise  # nothing to fall back to: the agent exits, and its restart retries the persisted step
            log.warning("%s failed: %s (%s)", ds.state.value, e, reason)
            if ds.state is State.CHECK:
                # nothing was being deployed: a failed check is "no update this time", not a rollback
                return Outcome(Event.NO_UPDATE, f"check_failed: {reason}")
            if ds.state is State.ACTIVATE:
                self.serve_current_quietly(ds)
            return Outcome(event, reason)

    def precheck(self) -> None:
        """While IDLE is still persisted: run CHECK's worker now, CHECK then only takes its outcome."""
        self.fetch.precheck()

    # --- the handlers -----------------------------------------------------------------------------------------

    def check(self, ds: DeployState) -> Outcome:
        cand = self.fetch.check()
        self.fetch.remember(cand)
        self.staged = None
        if cand is None:
            rollout = self.fetch.last_rollout
            if rollout is not None and rollout.follows == "none":
                return Outcome.checked(None, NOT_IN_WAVE)  # outside the rollout's wave: not a missing deployment
            if not self._warned_no_deployment:  # once, and again only after a deployment was found meanwhile
                log.warning("no deployment is signed for group %r (deployments/%s.json): nothing to deploy; "
                            "check [agent] group", self.group, self.group)
                self._warned_no_deployment = True
            return Outcome.checked(None)
        if self._warned_no_deployment:
            log.info("group %r has a deployment now: %s v%s", self.group, cand.name, cand.version)
            self._warned_no_deployment = False
        path = release_dir(self.state_dir, cand.name, cand.version, cand.sha256)
        return Outcome.checked(BundleRef(cand.name, cand.version, cand.sha256, str(path)))

    def download(self, ds: DeployState) -> Outcome:
        assert ds.candidate is not None  # DeployState validates: DOWNLOAD has one
        self.fetch.download(self.fetch.candidate_for(ds.candidate))
        return Outcome(Event.OK)

    def verify(self, ds: DeployState) -> Outcome:
        assert ds.candidate is not None
        self.fetch.verify(self.fetch.candidate_for(ds.candidate), Path(ds.candidate.path))
        return Outcome(Event.OK)

    def stage(self, ds: DeployState) -> Outcome:
        assert ds.candidate is not None
        warm, timing = STAGE_RUNS
        staged = self.stager.stage(ds.candidate, warm_runs=warm, timing_runs=timing)
        self.staged = (ds.candidate.sha256, staged.model)
        return Outcome(Event.OK, fmt=staged.model.fmt, extra={"staging": dict(staged.report)})

    def activate(self, ds: DeployState) -> Outcome:
        cand = ds.candidate
        assert cand is not None
        if self.staged is not None and self.staged[0] == cand.sha256:
            self.models[cand.sha256] = self.staged[1]
            self.holder.swap(self.staged[1])
        else:
            self.serve(cand)
        return Outcome(Event.OK)

    def probation(self, ds: DeployState) -> Outcome:
        assert ds.candidate is not None
        self.watch(self.holder.get(), Path(ds.candidate.path), ds.candidate.format or "")
        return Outcome(Event.PASSED)

    def commit(self, ds: DeployState) -> Outcome:
        # only the serving model stays loaded; a rollback to an older kept bundle reloads it from disk
        serving = self.holder.get()
        self.models = {k: m for k, m in self.models.items() if m is serving}
        self.staged = None
        release_memory()  # glibc keeps what staging and the dropped sessions freed (1.8 MiB idle RSS for digits)
        return Outcome(Event.OK)

    def rollback(self, ds: DeployState) -> Outcome:
        self.serve(ds.current)
        self.staged = None
        release_memory()
        return Outcome(Event.OK)

    # --- serving and files ------------------------------------------------------------------------------------

    def serve(self, ref: BundleRef | None) -> None:
        """Make `ref` the serving model (None: serve nothing), loading it unless it is loaded already."""
        if ref is None:
            self.holder.swap(None)
            return
        model = self.models.get(ref.sha256)
        if model is not None and self.holder.get() is model:
            return  # already serving it: no swap, the request stats keep their window
        if model is None:
            warm, timing = RELOAD_RUNS
            model = self.stager.stage(ref, warm_runs=warm, timing_runs=timing).model
            self.models[ref.sha256] = model
        self.holder.swap(model)

    def serve_current_quietly(self, ds: DeployState) -> None:
        try:
            self.serve(ds.current)
        except Exception as e:  # ROLLBACK retries; the candidate keeps serving meanwhile rather than nothing
            log.error("could not reload %s: %s", ds.current, e)

    def discard(self, ref: BundleRef) -> None:
        """Delete a bundle no saved state refers to any more: its release, its downloaded files, its session."""
        shutil.rmtree(ref.path, ignore_errors=True)
        for path in fetched_files(self.state_dir, ref.name, ref.version):
            path.unlink(missing_ok=True)
        self.models.pop(ref.sha256, None)
        log.info("deleted %s v%s", ref.name, ref.version)
