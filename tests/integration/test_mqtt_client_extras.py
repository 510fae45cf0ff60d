"""What the device daemon needs from MqttClient, against a real mosquitto: last will (and birth), MQTT 5
request/response, streams across reconnects and on close, a fire-and-forget publish that never blocks, and retained
reads that hand over each message as it is taken, overlap, and keep their byte count when a reconnect cuts them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.errors import ConnectionLost, TransportError
from agent.transport.mqtt import Message, MqttClient, Subscription, Will
from agent.transport.topics import Topics
from tests.conftest import Mosquitto

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def topics() -> Topics:
    return Topics(f"edgeship/x{uuid.uuid4().hex[:10]}/")


@pytest.fixture
def connect() -> Iterator[Callable[..., MqttClient]]:
    clients: list[MqttClient] = []

    def make(url: str, topics: Topics, name: str = "c", **kwargs: object) -> MqttClient:
        client = MqttClient(url, f"{name}-{uuid.uuid4().hex[:8]}", prefix=topics, **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client.connect(timeout=5)

    yield make
    for c in clients:
        c.close()


def next_payload(sub: Subscription, want: bytes, timeout: float = 10.0) -> Message:
    """The first message on `sub` carrying `want` (earlier ones, e.g. retained state, are skipped)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        msg = sub.get(timeout=remaining)
        if msg is not None and msg.payload == want:
            return msg
    raise AssertionError(f"no {want!r} on {sub.filters} within {timeout:g}s")


# ---- last will


def test_will_is_published_when_the_process_dies(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    state = topics.device("dev-1", "state")
    script = (
        "import sys, time\n"
        "from agent.transport.mqtt import MqttClient, Will\n"
        "c = MqttClient(sys.argv[1], 'dev-1-' + sys.argv[3], will=Will(sys.argv[2], b'lost')).connect(timeout=5)\n"
        "c.publish(sys.argv[2], b'online')\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, mosquitto.url, state, uuid.uuid4().hex[:8]],
        stdout=subprocess.PIPE, env=env, cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        observer = connect(mosquitto.url, topics, "obs")
        with observer.subscribe_stream([state]) as sub:
            assert next_payload(sub, b"online").retain
            proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the kernel just closes the socket
            proc.wait(timeout=5)
            next_payload(sub, b"lost", timeout=5)
        assert observer.get_retained([state], timeout=5) == {state: b"lost"}  # retained for later readers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_clean_close_does_not_trigger_the_will(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    state = topics.device("dev-2", "state")
    observer = connect(mosquitto.url, topics, "obs")
    device = connect(mosquitto.url, topics, "dev", will=Will(state, b"lost"))
    with observer.subscribe_stream([state]) as sub:
        device.publish(state, b"offline")  # what the daemon does before a clean shutdown
        device.close()
        next_payload(sub, b"offline")
        assert sub.get(timeout=1.0) is None  # no will after a DISCONNECT
    assert observer.get_retained([state], timeout=5) == {state: b"offline"}


def test_will_and_birth_survive_automatic_reconnects(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    state = topics.device("dev-3", "state")
    observer = connect(mosquitto.url, topics, "obs")
    with _CuttableProxy(mosquitto.port) as proxy, observer.subscribe_stream([state]) as sub:
        device = connect(proxy.url, topics, "dev", will=Will(state, b"lost"), birth=Will(state, b"online"))
        next_payload(sub, b"online")
        for _ in range(2):  # the will is set on every CONNECT paho sends, not just the first
            proxy.cut()  # the network dies: the broker sees the connection drop without DISCONNECT
            next_payload(sub, b"lost")
            assert device.wait_connected(10), "paho did not reconnect"
            next_payload(sub, b"online")  # the birth message undoes the will
        assert observer.get_retained([state], timeout=5) == {state: b"online"}


# ---- MQTT 5 request / response


def test_request_response_with_correlation(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    request_topic = topics.device("dev-4", "infer/request")
    reply_topic = topics.device("dev-4", "infer/reply/req-1")
    responder = connect(mosquitto.url, topics, "dev")
    requester = connect(mosquitto.url, topics, "app")
    assert responder.protocol == requester.protocol == "5"
    requests = responder.subscribe_stream([request_topic])
    seen: list[Message] = []

    def serve() -> None:
        for msg in requests:  # ends when the subscription is closed
            seen.append(msg)
            assert msg.response_topic is not None
            responder.publish(msg.response_topic, b"answer to " + msg.payload, retain=False,
                              correlation_data=msg.correlation_data)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    with requester.subscribe_stream([reply_topic]) as replies:
        for i in range(3):
            correlation = uuid.uuid4().bytes
            requester.publish(request_topic, b"q%d" % i, retain=False, response_topic=reply_topic,
                              correlation_data=correlation)
            reply = replies.get(timeout=5)
            assert reply == Message(reply_topic, b"answer to q%d" % i, False, None, correlation)
    requests.close()
    server.join(timeout=2)
    assert not server.is_alive()
    assert [(m.response_topic, m.retain) for m in seen] == [(reply_topic, False)] * 3


def test_request_response_fields_are_none_under_mqtt_311(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    topic = topics.device("dev-5", "infer/request")
    old = connect(mosquitto.url, topics, "old", protocol="3.1.1")
    new = connect(mosquitto.url, topics, "new", protocol="5")
    assert old.protocol == "3.1.1"
    with old.subscribe_stream([topic]) as sub:
        # a 3.1.1 publisher: the properties are ignored, not an error
        old.publish(topic, b"a", retain=False, response_topic=topic, correlation_data=b"c1")
        assert sub.get(timeout=5) == Message(topic, b"a", False)
        # an MQTT 5 publisher: the broker strips the properties for a 3.1.1 subscriber
        new.publish(topic, b"b", retain=False, response_topic=topic, correlation_data=b"c2")
        msg = sub.get(timeout=5)
        assert msg is not None and (msg.payload, msg.response_topic, msg.correlation_data) == (b"b", None, None)
    with pytest.raises(ValueError):
        new.publish(topic, b"x", response_topic="bad/+/topic")


# ---- streams across reconnects and on close


def test_stream_survives_reconnect(mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]) -> None:
    events = topics.device("dev-6", "events")
    publisher = connect(mosquitto.url, topics, "pub")
    with _CuttableProxy(mosquitto.port) as proxy:
        listener = connect(proxy.url, topics, "sub")
        with listener.subscribe_stream([topics.prefix + "devices/+/events"]) as sub:
            publisher.publish(events, b"before", retain=False)
            assert next_payload(sub, b"before").topic == events
            proxy.cut()
            assert listener.wait_connected(10), "paho did not reconnect"
            # the resubscription's SUBACK may still be on its way: publish until a live message arrives
            deadline = time.monotonic() + 10
            got = None
            while got is None and time.monotonic() < deadline:
                publisher.publish(events, b"after", retain=False)
                got = sub.get(timeout=0.2)
            assert got == Message(events, b"after", False)


@pytest.mark.parametrize("closer", ["subscription", "client"])
def test_iteration_ends_on_close(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], closer: str
) -> None:
    topic = topics.device("dev-7", "events")
    client = connect(mosquitto.url, topics, "dev")
    sub = client.subscribe_stream([topic])
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(m.payload for m in sub), daemon=True)
    reader.start()
    client.publish(topic, b"1", retain=False)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    (sub if closer == "subscription" else client).close()
    reader.join(timeout=2)
    assert not reader.is_alive(), f"iteration did not end after closing the {closer}"
    assert got == [b"1"] and sub.closed
    assert sub.get(timeout=5) is None and list(sub) == []  # at once, not after the timeout
    sub.close()  # idempotent, also after the client closed


# ---- fire-and-forget publish


def test_qos0_publish_never_blocks_when_the_broker_is_down(
    mosquitto_factory: Callable[..., Mosquitto], topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    broker = mosquitto_factory()
    telemetry = topics.device("dev-8", "telemetry")
    client = connect(broker.url, topics, "dev")
    blob = os.urandom(16 * 1024)

    def burst(n: int) -> tuple[float, int]:
        """(slowest call in seconds, calls refused with ConnectionLost)"""
        slowest, refused = 0.0, 0
        for _ in range(n):
            started = time.monotonic()
            try:
                client.publish(telemetry, blob, retain=False, qos=0, wait=False)
            except ConnectionLost:
                refused += 1
            slowest = max(slowest, time.monotonic() - started)
        return slowest, refused

    # A hung broker (TCP up, nothing read): the kernel buffers fill, paho queues the rest in memory.
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        slowest, refused = burst(2000)  # 32 MB: far beyond the socket buffers
        # a blocking publish would wait for the frozen broker forever; the bound only absorbs a loaded CI machine
        assert slowest < 3.0 and refused == 0
    finally:
        broker.proc.send_signal(signal.SIGCONT)

    # A dead broker: refused at once while paho retries in the background.
    broker.stop(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while client.is_connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not client.is_connected
    slowest, refused = burst(200)
    assert slowest < 3.0 and refused == 200
    # QoS 1 without waiting is refused just as fast; waiting for it fails rather than hanging
    started = time.monotonic()
    with pytest.raises(ConnectionLost):
        client.publish(telemetry, b"x", qos=1, wait=False)
    with pytest.raises(TransportError):
        client.publish(telemetry, b"x", qos=1, wait=True, timeout=1)
    assert time.monotonic() - started < 5.0  # failed, not hung

    # ... and the broker coming back on the same port: paho reconnects, publishing works again. What was refused
    # with ConnectionLost was not sent later behind the caller's back (it would overwrite newer retained state).
    broker.start()
    assert client.wait_connected(35)
    time.sleep(0.3)
    assert client.get_retained([telemetry], timeout=5) == {}
    client.publish(telemetry, b"back", retain=True, qos=1)
    assert client.get_retained([telemetry], timeout=5) == {telemetry: b"back"}


# ---- retained reads: per-message callback, reads open at once, bytes of a read cut short


def test_fetch_retained_hands_each_message_to_the_caller_as_it_is_taken(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    client = connect(mosquitto.url, topics, "dev")
    names = [topics.device("dev-9", f"blob/{i}") for i in range(5)]
    for i, name in enumerate(names):
        client.publish(name, bytes([i]) * (1000 + i))
    client.publish(names[4], b"x" * 5000)  # refused: larger than max_payload
    seen: list[tuple[str, int, str]] = []
    result = client.fetch_retained(
        [*names, topics.device("dev-9", "blob/none")], timeout=5, max_payload=2000,
        on_message=lambda m: seen.append((m.topic, len(m.payload), threading.current_thread().name)),
    )
    assert [(t, n) for t, n, _ in seen] == [(names[i], 1000 + i) for i in range(4)]  # in order, before the barrier
    assert {thread for _, _, thread in seen} == {threading.current_thread().name}  # the caller's thread, not paho's
    assert result.messages == {}  # handed over, not kept
    assert result.oversize == {names[4]: 5000}
    assert result.bytes_received == sum(1000 + i for i in range(4)) + 5000


def test_retained_reads_overlap_and_count_their_own_bytes(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    client = connect(mosquitto.url, topics, "dev")
    first = [topics.device("dev-10", f"a/{i}") for i in range(3)]
    second = [topics.device("dev-10", f"b/{i}") for i in range(3)]
    for name in first + second:
        client.publish(name, name.encode())
    a = client.start_retained(first, timeout=5)
    b = client.start_retained(second, timeout=5)  # subscribed while a's messages are still queued
    try:
        assert [m.topic for m in a] == first and a.done
        assert [m.topic for m in b] == second and b.done  # b's messages never went to a, nor a's barrier to b
        assert a.bytes_received == sum(len(t) for t in first) and b.bytes_received == sum(len(t) for t in second)
        assert b.get() is None  # stays finished
    finally:
        a.close()
        b.close()
    assert not client._routes  # closed reads are forgotten
    client.publish(first[0], b"new")  # and unsubscribed: a later read sees only its own messages
    assert client.fetch_retained(first[:1], timeout=5).messages == {first[0]: b"new"}


def test_connection_lost_keeps_the_bytes_already_received(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    publisher = connect(mosquitto.url, topics, "pub")
    names = [topics.device("dev-11", f"c/{i}") for i in range(40)]
    for name in names:
        publisher.publish(name, os.urandom(64 * 1024), wait=False)
    publisher.publish(topics.notify, b"done")  # PUBACKed after every earlier publish
    with _CuttableProxy(mosquitto.port) as proxy:
        device = connect(proxy.url, topics, "dev")
        seen: list[int] = []

        def cut_at_first(msg: Message) -> None:
            if not seen:
                proxy.cut()  # the network dies while the read is under way
            seen.append(len(msg.payload))

        with pytest.raises(ConnectionLost) as err:
            device.fetch_retained(names, timeout=10, on_message=cut_at_first)
        # everything that arrived before the drop was handed over, and its bytes are on the exception
        assert 0 < len(seen) < len(names)
        assert err.value.bytes_received == sum(seen) > 0
        assert device.wait_connected(10)
        assert len(device.fetch_retained(names, timeout=10).messages) == len(names)


# ---- helpers


class _CuttableProxy:
    """A TCP proxy in front of mosquitto whose `cut()` drops every connection at once, like a network failure:
    neither side sends an MQTT DISCONNECT. New connections (paho's reconnects) are accepted again."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> _CuttableProxy:
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self.cut()

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            with self._lock:
                self._sockets += [conn, upstream]
            threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


# ---- receive window (flow control for bulk reads)


def _queued(read: object) -> int:
    return read._route.queue.qsize()  # type: ignore[attr-defined]


def _wait_queued(read: object, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _queued(read) < n:
        assert time.monotonic() < deadline, f"{_queued(read)} messages queued, expected {n}"
        time.sleep(0.01)


def test_receive_window_holds_the_rest_on_the_broker_until_the_caller_acks(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    publisher = connect(mosquitto.url, topics, "pub")
    names = [topics.chunk("a" * 64, i) for i in range(8)]
    for i, t in enumerate(names):
        publisher.publish(t, bytes([i]) * 1000)

    # Without a window the broker pushes them all at once, whether the caller is ready or not.
    eager = connect(mosquitto.url, topics, "eager")
    with eager.start_retained(names, timeout=10) as read:
        _wait_queued(read, len(names) + 1)  # and the barrier token

    device = connect(mosquitto.url, topics, "dev", receive_window=1)
    with device.start_retained(names, timeout=10) as read:
        first = read.get()
        assert first is not None and first.payload == b"\0" * 1000
        time.sleep(0.5)  # the broker could send the other seven now, if it were allowed to
        assert _queued(read) == 0
        first.ack()
        _wait_queued(read, 1)
        assert [m.payload[0] for m in read] == list(range(1, 8))  # get() acknowledges the one taken before
    # what a window client leaves unread does not keep its window shut: the next read gets everything
    assert device.get_retained(names, timeout=10) == {t: bytes([i]) * 1000 for i, t in enumerate(names)}


def test_receive_window_acks_stream_messages_on_arrival_and_works_under_mqtt_311(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    publisher = connect(mosquitto.url, topics, "pub")
    names = [topics.tuf(f"{i}.root.json") for i in range(5)]
    for t in names:
        publisher.publish(t, t.encode())
    for protocol in ("5", "3.1.1"):
        device = connect(mosquitto.url, topics, "dev", receive_window=1, protocol=protocol)
        with device.subscribe_stream([topics.prefix + "live/#"]) as sub:
            for i in range(3):  # nobody acks these: the client does on arrival, or the retained read below stalls
                publisher.publish(topics.prefix + f"live/{i}", b"x", retain=False)
            assert next_payload(sub, b"x").topic == topics.prefix + "live/0"
            assert device.get_retained(names, timeout=10) == {t: t.encode() for t in names}


# ---- subscribing at QoS 0 (`?subscribe_qos=0`, for NATS 2.9 clusters: docs/scaling.md)


def test_subscribe_qos_0_reads_retained_state_and_streams(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]
) -> None:
    writer = connect(mosquitto.url, topics, "w")
    names = [topics.device("d1", f"part-{i}") for i in range(3)]
    for i, t in enumerate(names):
        writer.publish(t, b"v%d" % i)
    reader = connect(mosquitto.url + "?subscribe_qos=0", topics, "r", receive_window=1)
    with reader.start_retained(names) as read:
        got = list(read)
    assert {m.topic: m.payload for m in got} == {t: b"v%d" % i for i, t in enumerate(names)}
    assert all(m.acker is None for m in got)  # delivered at QoS 0: nothing to acknowledge, window or not
    assert reader.get_retained([topics.device("d1", "absent")]) == {}  # the barrier works at QoS 0 too
    with reader.subscribe_stream([topics.notify]) as sub:
        writer.publish(topics.notify, b"poke", retain=False)
        assert next_payload(sub, b"poke").acker is None
