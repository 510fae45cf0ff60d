"""The rollout controller takes each device's group from the repository's device registry (packager/devices.py)
when there is one: a certified device that claims another group in its state cannot become that group's canary or
control device, and unregistered or revoked ids count for nothing; without a registry the state's group counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from packager import devices
from packager.rollout import state as st
from packager.rollout.controller import Controller
from tests.unit.test_fleet_view import state, telemetry

FLEET = "f1"
P = f"edgeship/{FLEET}/"


def _register(repo: Path, device_id: str, group: str) -> None:
    key = X25519PrivateKey.generate().public_key()
    devices.register(repo, devices.DeviceRecord(device_id, group, 1, devices.public_b64(key), devices.now_iso()))


def _controller(repo: Path) -> Controller:
    rollout = st.RolloutState(name="r1", group="g2", fleet=FLEET, bundle="bundles/m-2.bundle", bundle_name="m",
                              version=2, sha256="ab" * 32, previous=None, waves=[50.0, 100.0], soak_s=60.0,
                              gate="error_rate <= 0.05", min_devices=1, min_requests=0)
    client: Any = None  # feeding and grouping touch no broker
    return Controller(repo, rollout, client)


def _feed_all(c: Controller) -> None:
    for dev, group in (("a", "g2"), ("b", "g2"), ("x", "g2")):  # a is registered in g1 but claims g2
        c._feed(f"{P}devices/{dev}/state", state(dev, group=group))
        c._feed(f"{P}devices/{dev}/telemetry", telemetry(dev, 1))


def test_a_device_cannot_join_another_groups_rollout_when_there_is_a_registry(tmp_path: Path) -> None:
    _register(tmp_path, "a", "g1")
    _register(tmp_path, "b", "g2")
    _register(tmp_path, "r", "g2")
    devices.mark_revoked(tmp_path, "r")
    c = _controller(tmp_path)
    _feed_all(c)
    c._feed(f"{P}devices/r/state", state("r", group="g2"))
    assert [r.device_id for r in c.view.devices("g2")] == ["b"]
    assert c.view.ignored == {"x", "r"} and set(c.windows) == {"a", "b"}


def test_without_a_registry_the_devices_state_names_its_group(tmp_path: Path) -> None:
    c = _controller(tmp_path)
    _feed_all(c)
    assert [r.device_id for r in c.view.devices("g2")] == ["a", "b", "x"]


def test_only_a_rollback_the_device_blames_on_the_bundle_counts_against_the_rollout(tmp_path: Path) -> None:
    c = _controller(tmp_path)
    _feed_all(c)

    seqs = iter(range(1, 100))

    def rollback(dev: str, reason: str) -> None:
        body = {"schema": 1, "seq": next(seqs), "ts": 0, "device": dev, "from": "verify", "to": "rollback",
                "event": "failed", "reason": reason, "bundle": {"name": "m", "version": 2}}
        c._feed(f"{P}devices/{dev}/events", json.dumps(body).encode())

    rollback("a", "key_unavailable")  # the device's key file, not the bundle: retried at its next poll
    rollback("b", "not_granted")
    assert c.state.rolled_back == []
    rollback("b", "hash_mismatch")
    assert c.state.rolled_back == ["b"]
