"""Shared fixtures: a real mosquitto on a free port (never the system broker on 1883)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from examples.local_broker import Mosquitto, MosquittoMissing


def _start(workdir: Path, *, persistent: bool = False, extra_conf: str = "") -> Mosquitto:
    try:
        broker = Mosquitto(workdir, persistent=persistent, extra_conf=extra_conf)
    except MosquittoMissing as e:
        pytest.fail(f"{e} — the MQTT tests need a real broker", pytrace=False)
    broker.start()
    return broker


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One non-persistent broker shared by the session; tests use their own topic prefix."""
    broker = _start(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Mosquitto]]:
    """Brokers of a test's own (e.g. `mosquitto_factory(persistent=True)` to survive restarts); all stopped after."""
    brokers: list[Mosquitto] = []

    def make(*, persistent: bool = False, extra_conf: str = "") -> Mosquitto:
        broker = _start(tmp_path_factory.mktemp("mosquitto"), persistent=persistent, extra_conf=extra_conf)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


def _partial(state_dir: Path, sha256: str) -> Path:
    return state_dir / "chunks" / f"{sha256}.partial"  # MqttFetcher.partial_path under the agent's state dir


def stored_chunks(state_dir: Path, sha256: str, chunk_size: int = 128 * 1024) -> dict[int, bytes]:
    """What an agent's MQTT fetcher holds of a target: the written slots of `chunks/<sha256>.partial` (index ->
    bytes); never-written slots read as zeros and are left out."""
    try:
        data = _partial(state_dir, sha256).read_bytes()
    except FileNotFoundError:
        return {}
    slots = (data[i : i + chunk_size] for i in range(0, len(data), chunk_size))
    return {index: slot for index, slot in enumerate(slots) if slot.count(0) != len(slot)}


def chunk_written(state_dir: Path, sha256: str, index: int, chunk_size: int = 128 * 1024) -> bool:
    """A cheap progress probe for a download in progress: has chunk `index` (and, as chunks are fetched in order,
    every one before it) reached the partial file?"""
    try:
        with open(_partial(state_dir, sha256), "rb") as f:
            f.seek(index * chunk_size)
            slot = f.read(chunk_size)
    except FileNotFoundError:
        return False
    return bool(slot) and slot.count(0) != len(slot)
