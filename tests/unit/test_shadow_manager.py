"""ShadowManager: the daemon's shadow wiring after each CHECK, with a fake fetch client and fake loads (real files in
a temporary state directory, real ShadowRunner threads over a tiny linear session)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import TelemetrySection
from agent.deploy.fetch_client import ShadowCandidate
from agent.deploy.steps import bundle_file, release_dir
from agent.errors import BundleRejected, StopRequested
from agent.serve.holder import LoadedModel, ServeObserver
from agent.telemetry.hub import Telemetry
from agent.telemetry.shadow import ShadowRunner
from agent.telemetry.shadow_manager import LOADING_FILE, NO_SHADOW, ShadowManager
from tests.unit.test_shadow import LinearSession

S2 = ShadowCandidate("digits", 2, "2" * 64)
S3 = ShadowCandidate("digits", 3, "3" * 64)


class FakeFetch:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.last_shadow: ShadowCandidate | None = None
        self.fetched: list[str] = []
        self.error: Exception | None = None

    def fetch_shadow(self, shadow: ShadowCandidate, extract_to: Path) -> Path:
        self.fetched.append(shadow.sha256)
        if self.error is not None:
            raise self.error
        extract_to.mkdir(parents=True)
        (extract_to / "manifest.json").write_text("{}")
        bundle = bundle_file(self.state_dir, shadow.name, shadow.version)
        bundle.parent.mkdir(parents=True, exist_ok=True)
        bundle.write_bytes(b"bundle")
        return extract_to


class Loads:
    def __init__(self) -> None:
        self.calls: list[Path] = []
        self.error: Exception | None = None

    def __call__(self, release: Path) -> LoadedModel:
        self.calls.append(release)
        if self.error is not None:
            raise self.error
        return LoadedModel("digits", int(release.name.split("-")[1]), "onnx", LinearSession([np.eye(4)]))


@pytest.fixture
def parts(tmp_path: Path) -> tuple[FakeFetch, Loads, list[ServeObserver], set[str]]:
    return FakeFetch(tmp_path), Loads(), [], set()


def _manager(tmp_path: Path, parts: tuple[FakeFetch, Loads, list[ServeObserver], set[str]]) -> ShadowManager:
    fetch, load, observers, in_use = parts

    def used() -> Collection[str]:
        return in_use

    cfg = TelemetrySection(shadow_cpu_budget=1.0, shadow_sample=1.0)
    return ShadowManager(fetch, tmp_path, cfg, observers, load=load, in_use=used)


def _files(tmp_path: Path, s: ShadowCandidate) -> tuple[Path, Path]:
    return release_dir(tmp_path, s.name, s.version, s.sha256), bundle_file(tmp_path, s.name, s.version)


def test_a_named_shadow_is_fetched_loaded_observed_and_reported(tmp_path: Path, parts: Any) -> None:
    fetch, load, observers, _ = parts
    manager = _manager(tmp_path, parts)
    manager.after_check()  # no shadow named: nothing happens
    assert fetch.fetched == [] and observers == [] and manager.snapshot() == NO_SHADOW

    fetch.last_shadow = S2
    manager.after_check()
    manager.after_check()  # the same shadow again: neither fetched nor loaded twice
    assert fetch.fetched == [S2.sha256] and load.calls == [_files(tmp_path, S2)[0]]
    assert len(observers) == 1 and isinstance(observers[0], ShadowRunner)
    runner = observers[0]
    runner.answered("r1", runner.model, {"x": np.ones((1, 4), np.float32)}, [np.ones((1, 4), np.float32)], 1.0)
    assert runner.flush(5)
    snap = manager.snapshot()
    assert (snap["shadow_name"], snap["shadow_version"], snap["shadow_samples"]) == ("digits", 2, 1)
    assert set(snap) == set(NO_SHADOW)
    manager.close()
    assert observers == [] and manager.snapshot() == NO_SHADOW
    assert not (tmp_path / LOADING_FILE).exists()


def test_a_replaced_shadow_is_closed_detached_and_its_files_deleted(tmp_path: Path, parts: Any) -> None:
    fetch, _, observers, _ = parts
    manager = _manager(tmp_path, parts)
    fetch.last_shadow = S2
    manager.after_check()
    old = observers[0]
    fetch.last_shadow = S3
    manager.after_check()
    assert len(observers) == 1 and observers[0] is not old and manager.snapshot()["shadow_version"] == 3
    assert not any(p.exists() for p in _files(tmp_path, S2)) and all(p.exists() for p in _files(tmp_path, S3))
    fetch.last_shadow = None  # the deployment names no shadow any more
    manager.after_check()
    assert observers == [] and not any(p.exists() for p in _files(tmp_path, S3))


def test_a_replaced_shadow_a_deployment_uses_keeps_its_files(tmp_path: Path, parts: Any) -> None:
    fetch, _, _, in_use = parts
    manager = _manager(tmp_path, parts)
    fetch.last_shadow = S2
    manager.after_check()
    in_use.add(S2.sha256)  # say v2 got deployed meanwhile
    fetch.last_shadow = None
    manager.after_check()
    assert all(p.exists() for p in _files(tmp_path, S2))


@pytest.mark.parametrize("where", ["fetch", "load"])
def test_a_shadow_that_fails_is_logged_and_not_retried_until_another_is_named(tmp_path: Path, parts: Any,
                                                                               where: str) -> None:
    fetch, load, observers, _ = parts
    error = BundleRejected("bad", reason="hash_mismatch") if where == "fetch" else RuntimeError("no session")
    fetch.error, load.error = (error, None) if where == "fetch" else (None, error)
    manager = _manager(tmp_path, parts)
    fetch.last_shadow = S2
    manager.after_check()
    manager.after_check()
    assert fetch.fetched == [S2.sha256] and observers == [] and manager.snapshot() == NO_SHADOW
    assert not any(p.exists() for p in _files(tmp_path, S2)) and not (tmp_path / LOADING_FILE).exists()
    fetch.error = load.error = None
    fetch.last_shadow = S3
    manager.after_check()
    assert fetch.fetched == [S2.sha256, S3.sha256] and len(observers) == 1
    manager.close()


def test_a_stop_during_the_fetch_is_no_failure(tmp_path: Path, parts: Any) -> None:
    fetch, _, observers, _ = parts
    fetch.error = StopRequested("stopping")
    manager = _manager(tmp_path, parts)
    fetch.last_shadow = S2
    manager.after_check()
    fetch.error = None
    manager.after_check()
    assert fetch.fetched == [S2.sha256, S2.sha256] and len(observers) == 1
    manager.close()


def test_a_load_that_hung_the_last_run_is_not_loaded_again(tmp_path: Path, parts: Any) -> None:
    fetch, load, observers, _ = parts
    (tmp_path / LOADING_FILE).write_text(S2.sha256)  # what a load that never returned leaves behind
    manager = _manager(tmp_path, parts)
    fetch.last_shadow = S2
    manager.after_check()
    assert fetch.fetched == [] and load.calls == [] and observers == []
    fetch.last_shadow = S3
    manager.after_check()
    assert len(observers) == 1 and not (tmp_path / LOADING_FILE).exists()
    manager.close()


def test_the_hub_message_carries_the_shadow_fields(tmp_path: Path, parts: Any) -> None:
    fetch, _, _, _ = parts
    manager = _manager(tmp_path, parts)
    hub = Telemetry(TelemetrySection(), tmp_path, serving=lambda: None, release_of=lambda m: None)
    hub.shadow = manager.snapshot
    assert {k: hub.figures(0.0)[k] for k in NO_SHADOW} == NO_SHADOW
    fetch.last_shadow = S2
    manager.after_check()
    assert hub.figures(1.0)["shadow_version"] == 2
    manager.close()
