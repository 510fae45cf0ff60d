"""End to end: `packager publish --shadow` signs a deployment naming a shadow bundle on a real mosquitto; the daemon's
FetchClient runs the real fetch worker (a child process with its own MQTT client) to CHECK it and to download,
verify and unpack the shadow, and the deployment state (deployments/) never hears of it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.bundle import sha256_file
from agent.config import load_config
from agent.deploy.fetch_client import FetchClient, ShadowCandidate
from agent.deploy.probation import read_manifest
from agent.deploy.steps import release_dir
from agent.errors import BundleRejected
from examples.local_broker import Mosquitto
from tests.e2e.test_signed_fetch import Fleet, chunk_count, make_bundle, make_fleet

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(mosquitto: Mosquitto, tmp_path: Path) -> Fleet:
    """A fresh repository and device on the shared broker (each test its own fleet prefix)."""
    return make_fleet(tmp_path, mosquitto.url)


def _client(fleet: Fleet) -> FetchClient:
    fleet.state.mkdir(parents=True, exist_ok=True)  # the daemon creates it at start
    return FetchClient(load_config(fleet.config, env={}), stopping=threading.Event(), connected=lambda: True)


def test_a_signed_shadow_is_reported_fetched_and_verified_beside_the_deployment(fleet: Fleet) -> None:
    v1 = make_bundle(fleet.tmp / "build", "digits", 1)
    v2 = make_bundle(fleet.tmp / "build", "digits", 2)
    out = fleet.publish(v1, "--shadow", str(v2))
    assert "runs bundles/digits-2.bundle in shadow" in out

    client = _client(fleet)
    cand = client.check()
    assert cand is not None and (cand.name, cand.version, cand.sha256) == ("digits", 1, sha256_file(v1))
    shadow = ShadowCandidate("digits", 2, sha256_file(v2), chunk_count(v2))
    assert cand.shadow == shadow and client.last_shadow == shadow

    release = release_dir(fleet.state, shadow.name, shadow.version, shadow.sha256)
    assert client.fetch_shadow(shadow, release) == release
    manifest = read_manifest(release)
    assert (manifest.name, manifest.version) == ("digits", 2)
    assert (fleet.state / "bundles" / "digits-2.bundle").read_bytes() == v2.read_bytes()
    # a shadow is no deployment: nothing was recorded for the state machine, and the serving bundle was not fetched
    assert not (fleet.state / "deployments").exists() or not any((fleet.state / "deployments").iterdir())
    assert not (fleet.state / "bundles" / "digits-1.bundle").exists()

    # the group's next publish without --shadow ends it; a worker asked for the old shadow refuses
    fleet.publish(v1)
    cand = client.check()
    assert cand is not None and cand.shadow is None and client.last_shadow is None
    with pytest.raises(BundleRejected) as e:
        client.fetch_shadow(shadow, release)
    assert e.value.reason == "not_found"


def test_a_shadow_replaced_meanwhile_is_superseded(fleet: Fleet) -> None:
    v1 = make_bundle(fleet.tmp / "build", "digits", 1)
    v2 = make_bundle(fleet.tmp / "build", "digits", 2)
    v3 = make_bundle(fleet.tmp / "build", "digits", 3)
    fleet.publish(v1, "--shadow", str(v2))
    client = _client(fleet)
    cand = client.check()
    assert cand is not None and cand.shadow is not None
    fleet.publish(v1, "--shadow", str(v3))
    with pytest.raises(BundleRejected) as e:
        client.fetch_shadow(cand.shadow, fleet.state / "releases" / "x")
    assert e.value.reason == "superseded"
    assert not (fleet.state / "bundles" / "digits-2.bundle").exists()
