"""Several brokers for one client (`MqttClient([url_a, url_b])`, `[mqtt] urls`): fail over when the broker in use
dies, come back when the other one dies in turn; subscriptions, birth message and will follow; a download cut by a
failover goes on from the chunks already stored. Two real mosquitto processes, each holding the same retained state
(published to both), like two nodes of a cluster."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.errors import TransportError
from agent.transport.mqtt import MqttClient, Will, parse_broker_url, split_broker_urls
from agent.transport.topics import Topics
from agent.trust.chunks import chunk_hashes
from agent.trust.mqtt_fetcher import MqttFetcher
from examples.brokers import TcpRelay
from examples.local_broker import free_port
from packager.mqtt_publish import TargetSpec, publish_tree
from tests.conftest import Mosquitto

CHUNK = 128 * 1024
LENGTH = 1_000_000  # 8 chunks
NAME = "digits-3.bundle"


@pytest.fixture
def topics() -> Topics:
    return Topics(f"edgeship/t{uuid.uuid4().hex[:10]}/")


@pytest.fixture
def pair(mosquitto_factory: Callable[..., Mosquitto]) -> tuple[Mosquitto, Mosquitto]:
    return mosquitto_factory(), mosquitto_factory()


@pytest.fixture
def clients() -> Iterator[list[MqttClient]]:
    made: list[MqttClient] = []
    yield made
    for c in made:
        c.close()


def _client(clients: list[MqttClient], urls: str | list[str], topics: Topics, name: str, **kw: object) -> MqttClient:
    c = MqttClient(urls, f"{name}-{uuid.uuid4().hex[:8]}", prefix=topics, **kw)  # type: ignore[arg-type]
    clients.append(c)
    return c


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def _on(client: MqttClient, url: str, timeout: float = 30.0) -> None:
    """Wait until `client` is connected to the broker at `url` (paho reconnects on its own)."""
    _wait(lambda: client.is_connected and client.url == url, timeout, f"the client to be on {url}")


def test_broker_lists_are_checked() -> None:
    assert split_broker_urls("mqtt://a:1, mqtt://b:2") == ["mqtt://a:1", "mqtt://b:2"]
    assert split_broker_urls(["mqtt://a:1"]) == ["mqtt://a:1"]
    for bad in ("", "mqtt://a,", "mqtt://a,mqtts://b", "mqtt://a,mqtt://a", "mqtt://a,http://b", []):
        with pytest.raises(ValueError):
            split_broker_urls(bad)
    with pytest.raises(ValueError):
        MqttClient("mqtt://a:1,mqtt://a:1", "c")
    assert parse_broker_url("mqtt://a:1").subscribe_qos == 1
    assert parse_broker_url("mqtt://a:1?subscribe_qos=0").subscribe_qos == 0
    assert parse_broker_url("mqtt://a:1/?subscribe_qos=1").subscribe_qos == 1
    for bad in ("mqtt://a:1?subscribe_qos=2", "mqtt://a:1?qos=0", "mqtt://a:1?subscribe_qos=0&x=1"):
        with pytest.raises(ValueError):
            parse_broker_url(bad)


def test_connect_takes_the_first_broker_that_answers(
    pair: tuple[Mosquitto, Mosquitto], topics: Topics, clients: list[MqttClient],
) -> None:
    a, _ = pair
    dead = f"mqtt://127.0.0.1:{free_port()}"
    client = _client(clients, [dead, a.url], topics, "c").connect(timeout=5)
    assert client.url == a.url
    with pytest.raises(TransportError, match="no broker of 2 answered"):
        _client(clients, [dead, f"mqtt://127.0.0.1:{free_port()}"], topics, "d").connect(timeout=2)


def test_fails_over_and_comes_back_with_subscriptions_birth_and_will(
    pair: tuple[Mosquitto, Mosquitto], topics: Topics, clients: list[MqttClient], caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = pair
    state = topics.device("dev-1", "state")
    device = _client(clients, f"{a.url},{b.url}", topics, "dev",
                     will=Will(state, b"offline"), birth=Will(state, b"online"))
    device.connect(timeout=5)
    assert device.url == a.url
    sub = device.subscribe_stream([topics.notify])
    watch_a = _client(clients, a.url, topics, "wa").connect(timeout=5)
    _wait(lambda: watch_a.get_retained([state]) == {state: b"online"}, 10, "the birth message on A")

    caplog.set_level(logging.INFO, logger="agent.transport.mqtt")
    first_id, barrier = device.client_id, device.barrier_topic
    a.kill()
    _on(device, b.url)
    assert any(b.url in r.getMessage() and "next attempt" in r.getMessage() for r in caplog.records)
    # a fresh client id on B (clean start: the old session is of no use), the barrier topic with it (an ACL may grant
    # each client only its own, docs/security.md), and retained reads, which wait for that barrier, work there
    assert device.client_id != first_id and device.client_id.startswith(first_id + "-")
    assert barrier == topics.barrier(first_id) and device.barrier_topic == topics.barrier(device.client_id)
    _wait(lambda: device.get_retained([state]) == {state: b"online"}, 10, "the device's own read on B")
    watch_b = _client(clients, b.url, topics, "wb").connect(timeout=5)
    _wait(lambda: watch_b.get_retained([state]) == {state: b"online"}, 10, "the birth message on B")
    # the subscription was restored on B: a poke published there reaches the device
    watch_b.publish(topics.notify, b"7", retain=False)
    msg = sub.get(timeout=10)
    assert msg is not None and (msg.topic, msg.payload) == (topics.notify, b"7")
    device.publish(topics.device("dev-1", "events"), b"{}", retain=False)  # and publishing works there

    # A returns (empty: not persistent), B dies: the device comes back to A, birth and subscription with it
    a.start()
    b.kill()
    _on(device, a.url)
    watch_a = _client(clients, a.url, topics, "wa2").connect(timeout=5)
    _wait(lambda: watch_a.get_retained([state]) == {state: b"online"}, 10, "the birth message on A again")
    watch_a.publish(topics.notify, b"8", retain=False)
    while (msg := sub.get(timeout=10)) is not None and msg.payload != b"8":
        pass  # retained copies re-delivered on resubscribe may come first
    assert msg is not None and msg.payload == b"8"

    # the will is set on the new connection too: a connection that dies without DISCONNECT leaves "offline" on A,
    # then the reconnect's birth says "online" again
    with watch_a.subscribe_stream([state]) as states:
        first = states.get(timeout=10)
        assert first is not None and first.payload == b"online"
        device._paho.socket().close()  # type: ignore[union-attr]  # the network is gone: no DISCONNECT sent
        seen = []
        while (m := states.get(timeout=30)) is not None and m.payload != b"online":
            seen.append(m.payload)
        assert seen == [b"offline"] and m is not None
    _on(device, a.url)


def test_download_cut_by_failover_goes_on_without_refetching(
    pair: tuple[Mosquitto, Mosquitto], topics: Topics, clients: list[MqttClient], tmp_path: Path,
) -> None:
    a, b = pair
    data = os.urandom(LENGTH)
    path = tmp_path / NAME
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    target = TargetSpec(sha, path, CHUNK, chunk_hashes(data, CHUNK), f"bundles/{NAME}")
    metadata = {"1.root.json": b'{"signed": {"version": 1}}', "timestamp.json": b"{}"}
    for broker in (a, b):  # both hold the same retained state, as the nodes of a cluster do
        publish_tree(_client(clients, broker.url, topics, "pub").connect(timeout=5), topics, metadata, [target])

    device = _client(clients, [a.url, b.url], topics, "dev", receive_window=1).connect(timeout=5)
    fetcher = MqttFetcher(device, tmp_path / "chunks", timeout=30, batch_size=2)
    fetcher.expect(sha, LENGTH, CHUNK, target.chunk_hashes)
    stream = fetcher.fetch(f"mqtt:///targets/bundles/{sha}.{NAME}")
    head = [next(stream), next(stream)]
    a.kill()  # mid-download: the rest comes from B
    got = b"".join(head) + b"".join(stream)
    assert hashlib.sha256(got).hexdigest() == sha
    assert device.url == b.url
    # every chunk came over the wire once: those stored before the failover were not asked for again
    assert fetcher.chunks_stored == 8
    assert fetcher.bytes_received == LENGTH


def test_connect_walks_the_list_again_while_a_broker_drops_the_connect(
    pair: tuple[Mosquitto, Mosquitto], topics: Topics, clients: list[MqttClient],
) -> None:
    a, _ = pair
    dead = f"mqtt://127.0.0.1:{free_port()}"
    # the first walk: both CONNECTs to the dropper (MQTT 5, then 3.1.1) are dropped, the other broker is down
    dropper = TcpRelay(int(a.url.rsplit(":", 1)[1]), drop=2)
    client = _client(clients, [dropper.url, dead], topics, "c").connect(timeout=5)
    assert client.url == dropper.url and dropper.accepted == 3
    # a node that never takes a CONNECT: given up within the bound, every failure named
    never = TcpRelay(int(a.url.rsplit(":", 1)[1]), drop=10**9)
    with pytest.raises(TransportError, match=r"no broker of 2 answered: .*closed the connection before CONNACK"):
        _client(clients, [never.url, dead], topics, "d").connect(timeout=2)
    assert never.accepted > 2  # more than one walk
