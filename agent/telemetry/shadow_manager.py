"""Which shadow bundle runs: follows what the latest CHECK answer named (agent/telemetry/shadow.py runs it).

The daemon calls `after_check()` on its main thread after every `Deployer.check` (the fetch worker must be started
from that thread):

    shadows = ShadowManager(fetch_client, state_dir, cfg.telemetry, stats.observers, load=bounded_load_shadow,
                            in_use=lambda: deployment_sha256s)
    shadows.after_check()     # start, replace or end the shadow runner
    shadows.snapshot()        # the shadow_* fields of the telemetry message (null while no shadow runs)
    shadows.close()           # at stop

A shadow the deployment no longer names is closed and taken off the serve observers, and its release directory and
downloaded bundle are deleted unless a deployment (current, candidate, kept) uses the same bundle. A shadow that
cannot be fetched or loaded is logged and its sha256 remembered, so it is not fetched again at every check (a new
shadow, or an agent restart, tries again). A load that hangs exits the agent (the daemon bounds it); the sha256
being loaded is written to `state_dir/shadow-loading` first, so after that restart the same shadow is not loaded
again (until the deployment names another).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

from agent.config import TelemetrySection
from agent.deploy.fetch_client import ShadowCandidate
from agent.deploy.steps import fetched_files, release_dir
from agent.errors import StopRequested
from agent.serve.holder import LoadedModel, ServeObserver
from agent.telemetry.shadow import ShadowRunner, agreement_kind

log = logging.getLogger(__name__)

LOADING_FILE = "shadow-loading"  # the sha256 of the shadow being loaded; left behind by a load that hung

# the shadow fields of every telemetry message while no shadow runs: null, "does not apply"
NO_SHADOW: dict[str, Any] = {
    "shadow_name": None, "shadow_version": None, "shadow_agreement": None, "shadow_agreement_kind": None,
    "shadow_samples": None, "shadow_rows": None, "shadow_latency_ms_p50": None, "shadow_latency_ms_p95": None,
    "shadow_skipped_total": None, "shadow_errors_total": None, "shadow_cpu_seconds_total": None,
    "shadow_cpu_budget": None,
}


class ShadowFetch(Protocol):
    """What the manager needs of `agent.deploy.fetch_client.FetchClient`."""

    @property
    def last_shadow(self) -> ShadowCandidate | None: ...
    def fetch_shadow(self, shadow: ShadowCandidate, extract_to: Path) -> Path: ...


class ShadowManager:
    """Starts, replaces and ends the one ShadowRunner. Not thread-safe: the daemon's main thread calls
    `after_check` and `close`; `snapshot` (the publisher's thread) only reads the current runner reference."""

    def __init__(self, fetch: ShadowFetch, state_dir: Path, cfg: TelemetrySection,
                 observers: list[ServeObserver], *, load: Callable[[Path], LoadedModel],
                 in_use: Callable[[], Collection[str]]) -> None:
        """`load`: loads an unpacked shadow release (the daemon bounds `load_shadow` in time); `in_use`: the
        sha256s of the bundles the deployment state refers to (their files are never deleted here)."""
        self.fetch = fetch
        self.state_dir = state_dir
        self.cfg = cfg
        self.observers = observers
        self.load = load
        self.in_use = in_use
        self.shadow: ShadowCandidate | None = None  # what the runner runs
        self.runner: ShadowRunner | None = None
        self.failed: str | None = None  # the sha256 of a shadow that could not be fetched or loaded
        self.loading = state_dir / LOADING_FILE
        try:
            self.failed = self.loading.read_text().strip() or None
            log.warning("the last run ended while loading the shadow bundle %s: not loading it again", self.failed)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot read %s: %s", self.loading, e)

    def after_check(self) -> None:
        """Follow the latest CHECK answer: end a shadow no longer named, start a newly named one."""
        wanted = self.fetch.last_shadow
        if self.shadow is not None and (wanted is None or wanted.sha256 != self.shadow.sha256):
            self._end()
        if wanted is None or self.shadow is not None or wanted.sha256 == self.failed:
            return
        release = release_dir(self.state_dir, wanted.name, wanted.version, wanted.sha256)
        try:
            self.fetch.fetch_shadow(wanted, release)
            self.loading.write_text(wanted.sha256)
            model = self.load(release)
            self.loading.unlink(missing_ok=True)
            runner = ShadowRunner(model, agreement_kind(model.manifest.parity if model.manifest else None,
                                                        model.manifest.task if model.manifest else None),
                                  self.cfg.shadow_cpu_budget, self.cfg.shadow_sample)
        except StopRequested:
            return  # not a failure: tried again after the restart
        except Exception as e:
            self.loading.unlink(missing_ok=True)
            log.warning("shadow %s v%s not started: %s: %s (not retried until the deployment names another)",
                        wanted.name, wanted.version, type(e).__name__, e)
            self.failed = wanted.sha256
            self._delete_files(wanted)
            return
        self.failed = None
        self.shadow, self.runner = wanted, runner
        self.observers.append(runner)
        log.info("running %s v%s in shadow (%s agreement, %.0f%% of requests, %.0f%% of one core)", wanted.name,
                 wanted.version, runner.kind, 100 * runner.sample, 100 * runner.cpu_budget)

    def snapshot(self) -> dict[str, Any]:
        runner = self.runner
        return {**NO_SHADOW, **runner.snapshot()} if runner is not None else dict(NO_SHADOW)

    def close(self) -> None:
        """At stop: end the runner's thread (its files stay for the next run)."""
        runner, self.runner, self.shadow = self.runner, None, None
        if runner is not None:
            self._detach(runner)
            runner.close()

    def _end(self) -> None:
        old = self.shadow
        self.close()
        if old is not None:
            log.info("shadow %s v%s ended", old.name, old.version)
            self._delete_files(old)

    def _detach(self, runner: ShadowRunner) -> None:
        # by identity: ServeObservers need not be comparable
        self.observers[:] = [o for o in self.observers if o is not runner]

    def _delete_files(self, shadow: ShadowCandidate) -> None:
        if shadow.sha256 in self.in_use():
            return  # a deployment uses the same bundle: its files are the deployment's to delete
        shutil.rmtree(release_dir(self.state_dir, shadow.name, shadow.version, shadow.sha256), ignore_errors=True)
        for path in fetched_files(self.state_dir, shadow.name, shadow.version):
            path.unlink(missing_ok=True)


__all__ = ["NO_SHADOW", "ShadowFetch", "ShadowManager"]
