"""Shared fixtures: a real mosquitto on a free port (never the system broker on 1883), and `broker`: the same test
on every broker kind edgeship supports (examples/brokers.py: Mosquitto MQTT 5 and 3.1.1, RabbitMQ, NATS)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from examples.brokers import KINDS, Broker, BrokerMissing, NatsCluster, launch
from examples.local_broker import Mosquitto, MosquittoMissing

# The packager's private keys are encrypted at rest (packager/keystore.py); every packager the tests start, in
# process or as a child, finds its passphrase here, whatever the caller exported (a root passphrase or a systemd
# credentials directory of the caller's would change which passphrase opens what).
os.environ["EDGESHIP_KEY_PASSPHRASE"] = "edgeship-tests-passphrase"
for _name in ("EDGESHIP_ROOT_KEY_PASSPHRASE", "CREDENTIALS_DIRECTORY"):
    os.environ.pop(_name, None)


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--brokers", default=",".join(KINDS),
                     help=f"comma-separated broker kinds the `broker` tests run on (default: {','.join(KINDS)})")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "broker_kind" in metafunc.fixturenames:
        chosen = [k.strip() for k in str(metafunc.config.getoption("--brokers")).split(",") if k.strip()]
        unknown = sorted(set(chosen) - set(KINDS))
        if unknown:
            raise pytest.UsageError(f"--brokers: unknown kind {unknown[0]!r} (known: {', '.join(KINDS)})")
        metafunc.parametrize("broker_kind", chosen, scope="session")


class _BrokerPool:
    """One broker process per kind for the whole session, started on first use (RabbitMQ boots in ~5-20 s)."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._brokers: dict[str, Broker] = {}

    def get(self, kind: str) -> Broker:
        if kind not in self._brokers:
            try:
                self._brokers[kind] = launch(kind, self._factory.mktemp(kind.replace(".", "")))
            except BrokerMissing as e:
                pytest.fail(f"{e} — the broker tests need every broker kind (.ci/run installs them)", pytrace=False)
        return self._brokers[kind]

    def close(self) -> None:
        for broker in self._brokers.values():
            broker.close()


@pytest.fixture(scope="session")
def _broker_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_BrokerPool]:
    pool = _BrokerPool(tmp_path_factory)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def broker(broker_kind: str, _broker_pool: _BrokerPool) -> Broker:
    """A running broker of each kind (`--brokers` picks them), shared by the session: tests put their topics under
    their own prefix (`fleet_name`) and must not stop it (use `broker_factory` for that)."""
    return _broker_pool.get(broker_kind)


@pytest.fixture
def broker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Broker]]:
    """Brokers of a test's own by kind (it may stop, kill or restart them; retained messages survive a restart on
    every kind); all stopped after the test."""
    brokers: list[Broker] = []

    def make(kind: str, mosquitto_conf: str = "") -> Broker:
        try:
            b = launch(kind, tmp_path_factory.mktemp(kind.replace(".", "")), persistent=True,
                       mosquitto_conf=mosquitto_conf)
        except BrokerMissing as e:
            pytest.fail(str(e), pytrace=False)
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.close()


@pytest.fixture
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three NATS nodes (routes, clustered JetStream, MQTT on each, MQTT streams on all three) of this test's own."""
    try:
        cluster = NatsCluster(tmp_path_factory.mktemp("nats-cluster"))
    except BrokerMissing as e:
        pytest.fail(str(e), pytrace=False)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def fleet_name() -> str:
    """A fleet of this test's own (its topic prefix `edgeship/<fleet>/`), legal on every broker."""
    return f"t{uuid.uuid4().hex[:12]}"


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
