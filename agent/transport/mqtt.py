"""The one module that imports paho: a small synchronous facade over paho's network thread.

paho callbacks run on paho's network thread. They only turn a paho message into our frozen `Message` and put it on
the thread-safe queue of every route that wants it (or record an acknowledgement); all waiting happens in the
caller's thread. paho and socket failures become `TransportError` (one line, `raise ... from e`).

Topic names, their validation and the pure matching rule live in `agent.transport.topics` (docs/transport.md).

For a device daemon: a last `Will` (sent by the broker when the connection dies without DISCONNECT; a clean
`close()` does not trigger it, so publish your own "offline" first), an optional `birth` message republished on every
(re)connect, and MQTT 5 request/response (`publish(response_topic=..., correlation_data=...)`, the same fields on
`Message`; both are ignored / None under MQTT 3.1.1).

Flow control for bulk reads (`receive_window`): MQTT 5's Receive Maximum caps the QoS 1 messages the broker has in
flight to us, and a message is acknowledged only once the caller is done with it (`Message.ack()`, or its next
`RetainedRead.get()`). The broker holds the rest, so a process killed mid-download loses at most `receive_window`
messages it had received but not yet stored, instead of whatever the socket buffers held. A read's `on_arrival`
hook can store each message on the network thread, which then acknowledges it at once: the round trip to the next
message no longer waits for the caller's thread to wake up.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.errors import ConnectionLost, TransportError
from agent.limits import MAX_MESSAGE_BYTES
from agent.transport.topics import DEFAULT_PREFIX, Topics, is_client_id, matches, validate_filter, validate_topic

log = logging.getLogger(__name__)

# TUF's default targets-metadata bound is 5 MB; chunks are <= 128 KiB; an inference request is at most
# MAX_MESSAGE_BYTES, the same number as the HTTP body limit. Anything bigger is refused (MQTT 5 tells the broker so it
# never sends it: the broker drops it, unanswered; with 3.1.1 the callback drops it).
DEFAULT_MAX_PACKET = MAX_MESSAGE_BYTES
# Subscribe / get_retained in slices: mosquitto silently drops QoS 1 messages queued for a client beyond
# max_inflight_messages + max_queued_messages (20 + 1000 by default, 20 + 100 in 1.x), retained ones included.
MAX_TOPICS_PER_SUBSCRIBE = 64
_UNSUPPORTED_PROTOCOL = (1, 0x84)
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # 3.1.1 CONNACK code 1 / MQTT 5 reason 0x84
# paho's automatic reconnect after a lost connection: it waits min_delay, then doubles the wait per failed attempt up
# to max_delay, and starts again at min_delay after a successful CONNACK. paho has no jitter, so each client draws its
# own min_delay: a fleet that lost its broker at the same moment then retries spread out, not in lockstep.
RECONNECT_MIN_DELAY_S = (0.5, 1.5)
RECONNECT_MAX_DELAY_S = 120.0
# How long a retained read still waits for topics that had not arrived when its barrier echoed, before they count as
# absent. MQTT orders messages per topic only: a broker may hand out retained messages after a later message on
# another topic (our barrier). Mosquitto, RabbitMQ 3.10 and NATS 2.9 never did in our trials (docs/transport.md), so
# this only bounds what a reordering broker costs; the price is that every "not found" takes this long, which is why
# the one frequent not-found lookup (is there a newer root?) answers from tuf/root/latest instead.
DEFAULT_RETAINED_GRACE_S = 0.5


def reconnect_min_delay(rng: random.Random | None = None) -> float:
    """A random first reconnect wait in RECONNECT_MIN_DELAY_S (seconds)."""
    low, high = RECONNECT_MIN_DELAY_S
    return (rng or _RNG).uniform(low, high)


_RNG = random.SystemRandom()  # os.urandom: no shared seed, not even between forked processes


@dataclass(frozen=True)
class Message:
    """One received MQTT message, already detached from paho.

    `response_topic` / `correlation_data` are the MQTT 5 request/response properties when the sender set them;
    always None on an MQTT 3.1.1 connection.
    """

    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    acker: _Ack | None = field(default=None, compare=False, repr=False)

    def ack(self) -> None:
        """Done with this message: let the broker send the next one (only a client with a `receive_window` defers
        acknowledgements; otherwise paho acknowledged it on arrival). Idempotent."""
        if self.acker is not None:
            self.acker.send()


class _Ack:
    """The deferred PUBACK of one received QoS 1 message: sent once, and only on the connection it came on."""

    def __init__(self, client: MqttClient, paho_client: paho.Client, mid: int, qos: int, generation: int) -> None:
        self._client, self._paho, self.mid, self.qos, self._generation = client, paho_client, mid, qos, generation
        self._sent = False

    def send(self) -> None:
        # Under the lock, so a reconnect cannot slip in between the check and the PUBACK (message ids start again
        # on a new connection). paho's ack() only queues the packet and wakes its thread: safe to call here.
        with self._client._lock:
            if self._sent:
                return
            self._sent = True
            if self._client._paho is self._paho and self._client._generation == self._generation:
                self._paho.ack(self.mid, self.qos)  # else the broker forgot this message (clean start)


@dataclass(frozen=True)
class Will:
    """A message the broker publishes for us: as last will when our connection dies without DISCONNECT (process
    killed, network gone, keepalive missed), or as `birth` message on every successful (re)connect."""

    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1

    def __post_init__(self) -> None:
        validate_topic(self.topic)
        if not isinstance(self.payload, bytes):
            raise TypeError(f"will payload must be bytes, not {type(self.payload).__name__}")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"will QoS must be 0, 1 or 2: {self.qos!r}")


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    subscribe_qos: int = 1  # `?subscribe_qos=0` in the URL: see parse_broker_url


def unique_client_id(base: str) -> str:
    """`base-<pid>-<random>`: a client id no other process uses. The broker disconnects a client when another
    connects with its id, so two processes sharing one (a fetch worker left over beside a new one, `edge-agent
    fetch` beside the daemon's worker) knock each other off in turn. Characters of `base` outside the client id
    rule (agent/ids.py: it is a level of our barrier topic) become `-`."""
    suffix = f"-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    clean = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "-" for c in base)
    return clean[:128 - len(suffix)] + suffix


def split_broker_urls(urls: str | Sequence[str]) -> list[str]:
    """A broker list as given: a list of URLs, or one string of comma-separated URLs (`--broker`, EDGESHIP_BROKER,
    `[mqtt] url`; a comma inside a password is written %2C). Each is checked (`parse_broker_url`); they must all be
    mqtt:// or all mqtts:// (one TLS setup for the client). ValueError names the bad one."""
    items = [u.strip() for u in urls.split(",")] if isinstance(urls, str) else [str(u).strip() for u in urls]
    if not items or any(not u for u in items):
        raise ValueError(f"empty broker URL in {urls!r}")
    schemes = {parse_broker_url(u).tls for u in items}
    if len(schemes) > 1:
        raise ValueError(f"broker URLs must be all mqtt:// or all mqtts://: {', '.join(items)}")
    if len(set(items)) != len(items):
        raise ValueError(f"a broker URL is listed twice: {', '.join(items)}")
    return items


SUBSCRIBE_QOS_QUERIES = ("subscribe_qos=0", "subscribe_qos=1")  # the one query a broker URL may carry


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user:pass@]host[:port]` (1883) or `mqtts://...` (8883), optionally `?subscribe_qos=0`: subscribe
    at QoS 0 instead of 1 on that broker. For NATS 2.9 clusters (docs/scaling.md): a QoS 1 subscription costs a
    JetStream consumer that 2.9.10 may place on a dead node, a QoS 0 one costs none. Our connections start clean,
    so QoS 1 buys no redelivery; what QoS 0 gives up is the broker pacing deliveries by our acknowledgements
    (`receive_window`, which NATS 2.9, MQTT 3.1.1 only, does not offer anyway)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"broker URL must start with mqtt:// or mqtts://: {url!r}")
    if not parts.hostname:
        raise ValueError(f"broker URL has no host: {url!r}")
    if parts.path not in ("", "/") or parts.query not in ("", *SUBSCRIBE_QOS_QUERIES) or parts.fragment:
        raise ValueError(f"broker URL must be just mqtt[s]://host:port[?subscribe_qos=0]: {url!r}")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as e:
        raise ValueError(f"bad port in broker URL {url!r}") from e
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return BrokerAddress(parts.hostname, port, tls, user, password, 0 if parts.query == "subscribe_qos=0" else 1)


# --------------------------------------------------------------------------------------------------------------
# The client


@dataclass
class _Route:
    """Where the network thread delivers messages: one queue per get_retained call or stream."""

    exact: frozenset[str]
    wild: tuple[str, ...]
    queue: queue.SimpleQueue[Message | TransportError | None]  # None: connection dropped or closed
    max_payload: int | None = None
    defers_ack: bool = False  # a retained read: its messages are acknowledged when taken, not on arrival
    on_arrival: Callable[[Message], None] | None = None  # run on the network thread before the message is queued
    closed: bool = False  # set by MqttClient.close(): streams on it end
    oversize: dict[str, int] = field(default_factory=dict)  # topic -> refused payload size
    bytes_received: int = 0  # payload bytes that reached us, refused ones included

    def wants(self, topic: str) -> bool:
        return topic in self.exact or any(matches(f, topic) for f in self.wild)


@dataclass(frozen=True)
class RetainedResult:
    messages: dict[str, bytes]
    oversize: dict[str, int]  # topics whose payload exceeded max_payload and was dropped unbuffered
    bytes_received: int


class RetainedRead:
    """One retained read in progress (`MqttClient.start_retained`): SUBSCRIBE sent, the barrier token published
    once the SUBACK arrives. Take its messages in arrival order with `get()` or by iterating, until it is complete:
    every topic asked for has arrived (an exact subscription gets at most one retained message per topic), or the
    barrier token echoed back and the topics still missing then were given `grace` seconds more (MQTT orders
    messages per topic only, so the barrier is a fast path, not a proof; see DEFAULT_RETAINED_GRACE_S). `missing`
    then names the topics that count as absent. `close()` (always, also after an error) unsubscribes. Several may be
    open at once on one client: the broker queues each one's messages behind the previous one's token, so the next
    read's data is already on its way while the caller still works on this one.

    `bytes_received` counts every payload byte delivered to this read so far (refused oversize ones too, not the
    barrier token), whatever happens later: a read cut short by a reconnect still cost those bytes.
    """

    def __init__(self, client: MqttClient, route: _Route, topics: list[str], token: bytes, timeout: float,
                 grace: float = DEFAULT_RETAINED_GRACE_S) -> None:
        self._client = client
        self._route = route
        self.topics = topics
        self._token = token
        self.timeout = timeout
        self.grace = grace
        self._deadline: float | None = None  # the timeout runs from the first take, not from the subscribe
        self._seen: dict[str, bool] = {}  # topic -> holds a retained payload (False after a live delete)
        self.echoed = False  # our barrier token came back
        self.done = False  # complete: every topic arrived, or the barrier echoed and the grace ran out
        self._closed = False
        self._mids: list[int] = []  # SUBSCRIBEs whose SUBACK had not arrived when they were sent
        self._taken: Message | None = None  # the message last returned: acknowledged at the next get() at the latest

    @property
    def bytes_received(self) -> int:
        return self._route.bytes_received

    @property
    def oversize(self) -> dict[str, int]:
        """Topics whose payload exceeded `max_payload` (dropped unbuffered) and had no acceptable one after."""
        return {t: n for t, n in self._route.oversize.items() if not self._seen.get(t)}

    @property
    def missing(self) -> list[str]:
        """Topics no message has arrived for (refused oversize ones did arrive); once `done`, the absent ones."""
        oversize = self._route.oversize
        return [t for t in self.topics if t not in self._seen and t not in oversize]

    def get(self, block: bool = True) -> Message | None:
        """The next retained message (an empty payload is a live delete), or None once the barrier echoed.
        `block=False`: None also when nothing is queued yet (for salvaging what already arrived). Raises
        ConnectionLost when the connection dropped, TransportError when the barrier is late.

        With a `receive_window`, coming back for the next message acknowledges the one returned before (if the
        caller did not `ack()` it already)."""
        if self._taken is not None:
            self._taken.ack()
            self._taken = None
        if not self.done and not self.missing:
            self.done = True  # every topic is here: nothing to wait for, barrier or not
        if self.done:
            return None
        if self._closed:
            raise TransportError("retained read already closed")
        if self._deadline is None:
            self._deadline = time.monotonic() + self.timeout
        while True:
            remaining = self._deadline - time.monotonic()
            try:
                item = self._route.queue.get(block, max(0.0, remaining))
            except queue.Empty:
                if not block:
                    return None
                if self.echoed:  # the grace ran out: what is still missing is absent
                    self.done = True
                    return None
                raise TransportError(
                    f"barrier echo did not arrive within {self.timeout:g}s reading {len(self.topics)} topics from "
                    f"{self._client.url}"
                ) from None
            if item is None or isinstance(item, ConnectionLost):
                raise ConnectionLost(
                    f"connection to {self._client.url} lost while reading retained messages", self.bytes_received
                )
            if isinstance(item, TransportError):
                raise item
            if item.topic == self._client.barrier_topic:
                item.ack()
                if item.payload == self._token and not self.echoed:
                    self.echoed = True
                    if not self.missing or self.grace <= 0:
                        self.done = True
                        return None
                    self._deadline = time.monotonic() + self.grace
                    log.debug("barrier echoed with %d of %d topics missing: waiting %gs for them",
                              len(self.missing), len(self.topics), self.grace)
                continue  # another read's barrier
            self._seen[item.topic] = bool(item.payload)
            self._taken = item
            return item

    def __iter__(self) -> Iterator[Message]:
        while (item := self.get()) is not None:
            yield item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._client._lock:
                self._route.closed = True  # a message the network thread queues from now on is acked by it
            self._client._remove_route(self._route)
            self._client._forget_subacks(self)
            self._client._unsubscribe(self.topics)
            # what nobody will take any more must not hold the broker's window shut
            if self._taken is not None:
                self._taken.ack()
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._route.queue.get_nowait()
                    if isinstance(item, Message):
                        item.ack()

    def __enter__(self) -> RetainedRead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PublishHandle:
    """An outstanding QoS 1 publish; `wait()` returns once the broker's PUBACK arrived."""

    def __init__(self, client: MqttClient, info: paho.MQTTMessageInfo, topic: str) -> None:
        self._client = client
        self._info = info
        self.topic = topic

    @property
    def done(self) -> bool:
        return self._info.is_published()

    def wait(self, timeout: float = 30.0) -> None:
        try:
            self._info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as e:
            raise TransportError(f"publish to {self.topic} failed: {e}") from e
        if not self._info.is_published():
            self._client._raise_if_lost()
            raise TransportError(f"no PUBACK for {self.topic} within {timeout:g}s")
        failure = self._client._pop_publish_failure(self._info.mid)
        if failure is not None:
            raise TransportError(f"broker refused publish to {self.topic}: {failure}")


class Subscription:
    """A live subscription: iterate (blocking) or `get(timeout)`; `close()` unsubscribes.

    Survives paho's automatic reconnects (we resubscribe). Iteration ends once this subscription or its client is
    closed, also when `close()` is called from another thread while an iteration is blocked.
    """

    def __init__(self, client: MqttClient, route: _Route, filters: list[str]) -> None:
        self._client = client
        self._route = route
        self.filters = filters
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self._route.closed

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after `timeout` seconds or once closed. Connection drops are skipped: paho
        reconnects and we resubscribe, which re-delivers retained messages."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._route.queue.get(timeout=remaining)
            except queue.Empty:
                return None
            if isinstance(item, Message) and not self.closed:
                return item
        return None

    def __iter__(self) -> Iterator[Message]:
        while (item := self.get()) is not None:
            yield item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._route.queue.put(None)  # wakes a reader blocked in get()
            self._client._remove_route(self._route)
            self._client._unsubscribe(self.filters)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quickack(client: paho.Client) -> None:
    # Brokers usually keep Nagle on (mosquitto: set_tcp_nodelay false), so a small packet that follows another
    # (the barrier echo after its PUBACK, a SUBACK after an UNSUBACK) waits for our ACK, which Linux delays by
    # 40 ms. Acking at once after each control packet keeps a 404 under a millisecond. Linux only; no-op elsewhere.
    sock: Any = client.socket()  # a socket, an SSLSocket or paho's websocket wrapper
    if sock is not None and _TCP_QUICKACK is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def _set_nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
    # Without this, Nagle holds our barrier PUBLISH behind the PUBACKs still waiting for the broker's delayed ACK:
    # every get_retained() took >= 40 ms on Linux whatever its size.
    with contextlib.suppress(OSError, AttributeError):  # not TCP (unix socket, websocket wrapper)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _forget_unsent(client: paho.Client, mid: int) -> None:
    """Drop a QoS > 0 message paho queued but could not send (not connected). paho has no public call for it;
    one it already resent after a reconnect in between is left alone (its PUBACK will come)."""
    lock = getattr(client, "_out_message_mutex", None)
    messages = getattr(client, "_out_messages", None)
    if lock is None or messages is None:
        return
    with lock:
        message = messages.get(mid)
        if message is not None and message.state == paho.mqtt_ms_publish:
            del messages[mid]


def _no_key_password() -> bytes:
    raise ValueError("the key file is encrypted and no key password was given")


class MqttClient:
    """Synchronous facade: connect, read retained topics with a barrier, publish with PUBACK, stream messages.

    Thread-safe for callers; one paho network thread per client. MQTT 5 first, 3.1.1 when the broker refuses it.

    Several brokers (`url` a list, or comma-separated: the nodes of one cluster, or brokers bridged to hold the same
    retained state): `connect()` takes the first that answers; after a lost connection paho's reconnect goes to the
    next one in the list, and on to the next after every failed attempt (round robin, paho's backoff unchanged), so
    the client fails over and, when its broker fails in turn, comes back to the first. `url` always names the
    broker in use. Each new connection is a clean start: subscriptions are restored, the birth message republished
    and the will set again. A connection to the next broker of the list uses a fresh client id
    (`unique_client_id` of the one given; `client_id` names the one in use) and the barrier topic that goes with
    it. All must speak the same MQTT version (the one `connect()` found).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        client_id: str,
        *,
        prefix: str | Topics = DEFAULT_PREFIX,
        keepalive: int = 30,
        max_packet_size: int = DEFAULT_MAX_PACKET,
        max_inflight: int = 64,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        key_password: bytes | None = None,
        protocol: str = "auto",
        will: Will | None = None,
        birth: Will | None = None,
        receive_window: int | None = None,
        retained_grace: float = DEFAULT_RETAINED_GRACE_S,
    ) -> None:
        """`will`: published by the broker if the connection dies without DISCONNECT (set on every CONNECT, so
        also after paho's automatic reconnects). `birth`: published by us (not awaited) after every successful
        CONNACK, e.g. "online" on the will's topic so a reconnect undoes the will.

        `receive_window`: at most this many QoS 1 messages in flight to us (MQTT 5 Receive Maximum), each
        acknowledged only when a retained read's caller is done with it (see the module doc). Under MQTT 3.1.1,
        which has no such property, the broker's own inflight limit applies. None: paho acknowledges on arrival.

        `retained_grace`: seconds a retained read waits, after its barrier echoed, for topics not arrived yet
        (`RetainedRead`, DEFAULT_RETAINED_GRACE_S).

        TLS (mqtts:// URLs): `ca_file` the CA the broker's certificate must chain to (None: the system's);
        `cert_file`/`key_file` this client's certificate and key for brokers that require one (docs/security.md),
        `key_password` when the key file is encrypted (the packager's own identity; a device's key is not)."""
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together: give both or neither")
        if cert_file is not None and not all(parse_broker_url(u).tls for u in split_broker_urls(url)):
            raise ValueError("a client certificate needs mqtts:// broker URLs")
        if not is_client_id(client_id):
            raise ValueError(f"client id must be 1-128 chars of [A-Za-z0-9_-]: {client_id!r}")
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"protocol must be auto, 5 or 3.1.1: {protocol!r}")
        if receive_window is not None and not 1 <= receive_window <= 65535:
            raise ValueError(f"receive_window must be in 1..65535: {receive_window!r}")
        if not 0 <= retained_grace <= 600:
            raise ValueError(f"retained_grace must be in 0..600 seconds: {retained_grace!r}")
        self.urls = split_broker_urls(url)
        self.addresses = [parse_broker_url(u) for u in self.urls]
        self._current = 0  # index of the broker in use (or tried next)
        self._id_base = client_id
        self.client_id = client_id  # the id of the connection in use: a fresh one after each failover (_rotate)
        self.topics = prefix if isinstance(prefix, Topics) else Topics(prefix)
        # `_barrier/<client id in use>`: a broker's ACL may grant each client its own barrier only (Mosquitto's
        # `%c`, docs/security.md), so it follows the client id through a failover (_rotate)
        self.barrier_topic = self.topics.barrier(client_id)
        self.keepalive = keepalive
        self.max_packet_size = max_packet_size
        self.max_inflight = max_inflight
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self._key_password = key_password
        self._protocol_choice = protocol
        self.protocol: str | None = None  # "5" or "3.1.1" once connected
        self.will = will
        self.birth = birth
        self.receive_window = receive_window
        self.retained_grace = retained_grace
        self.reconnect_min_delay = reconnect_min_delay()  # this client's jitter (see RECONNECT_MIN_DELAY_S)
        self.reconnect_max_delay = RECONNECT_MAX_DELAY_S

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._paho: paho.Client | None = None
        self._connected = False
        self._ever_connected = False
        self._connack: int | None = None  # reason code value of the last CONNACK
        self._connack_text = ""
        self._lost_before_connack = False
        self._generation = 0  # bumps on every disconnect so waiters notice
        self._acks: dict[int, list[int]] = {}  # SUBACK/UNSUBACK codes by mid, until their waiter takes them
        self._ignored_acks: set[int] = set()  # mids nobody waits for (UNSUBSCRIBE, resubscribe after reconnect)
        self._publish_failures: dict[int, str] = {}
        self._routes: list[_Route] = []
        self._sub_refs: dict[str, int] = {}
        self._suback_hooks: dict[int, Callable[[list[int]], None]] = {}  # SUBSCRIBE mid -> what its SUBACK starts
        self._barriers_due: set[int] = set()  # ids of retained reads whose barrier token is not published yet
        self.bytes_received = 0  # every payload byte that reached on_message
        self._connecting = False
        self._not_serving = False  # the last connect attempt reached a broker that did not answer the CONNECT

    @property
    def url(self) -> str:
        """The broker in use (or last tried)."""
        return self.urls[self._current]

    @property
    def address(self) -> BrokerAddress:
        return self.addresses[self._current]

    # ---- lifecycle

    def connect(self, timeout: float = 10.0) -> MqttClient:
        """Connect to the first broker of the list that answers (each with `timeout`); TransportError naming every
        failure when none does.

        Several brokers: when one of them took the TCP connection but dropped or never answered the CONNECT (a
        cluster node still electing leaders after a peer died: NATS 2.9 closes the CONNECT until its session
        stream has a leader again, docs/scaling.md), the list is walked again after this client's reconnect delay,
        within `timeout` x the number of brokers in all (what one walk may take when none answers). Brokers that
        refuse the TCP connection or answer with a refusing CONNACK end it after one walk."""
        failures: list[str] = []
        deadline = time.monotonic() + timeout * len(self.urls)
        self._connecting = True  # this loop walks the list: no rotation from paho's callbacks meanwhile
        try:
            while True:
                failures, not_serving = [], False
                for index in range(len(self.urls)):
                    self._current = index
                    self._not_serving = False
                    try:
                        return self._connect_broker(max(0.1, min(timeout, deadline - time.monotonic())))
                    except TransportError as e:
                        if len(self.urls) == 1:
                            raise
                        failures.append(str(e))
                        not_serving = not_serving or self._not_serving
                        log.warning("%s; trying the next broker", e)
                if not not_serving or time.monotonic() + self.reconnect_min_delay >= deadline:
                    break
                log.warning("a broker took the connection but not the CONNECT: trying the list again in %.1fs",
                            self.reconnect_min_delay)
                time.sleep(self.reconnect_min_delay)
        finally:
            self._connecting = False
        self._current = 0
        raise TransportError(f"no broker of {len(self.urls)} answered: {'; '.join(failures)}")

    def _connect_broker(self, timeout: float) -> MqttClient:
        versions = {"auto": ["5", "3.1.1"], "5": ["5"], "3.1.1": ["3.1.1"]}[self._protocol_choice]
        for version in versions:
            refused_protocol = self._connect_once(version, timeout)
            if not refused_protocol:
                self.protocol = version
                try:
                    self._subscribe([self.barrier_topic], timeout)
                except BaseException:
                    self.close()
                    raise
                log.info("connected to %s as %s (MQTT %s)", self.url, self.client_id, version)
                return self
            log.info("broker at %s refused MQTT %s, trying the next protocol version", self.url, version)
        raise TransportError(f"broker at {self.url} refused every MQTT protocol version we speak")

    def _rotate(self, client: paho.Client, why: str) -> None:
        """Point paho's next reconnect attempt at the next broker of the list (network thread, socket closed)."""
        if len(self.addresses) < 2 or self._connecting:
            return  # one broker; or in connect(), which walks the list itself
        # paho's reconnect() connects to _host/_port. Its public host/port setters refuse unless the client was
        # disconnected on purpose, not after a lost connection, so set what they would set (paho 2.x).
        if not (hasattr(client, "_host") and hasattr(client, "_port") and hasattr(client, "_client_id")):
            log.warning("this paho has no _host/_port/_client_id: staying with %s", self.url)
            return
        with self._lock:
            if client is not self._paho:
                return
            previous = self.url
            self._current = (self._current + 1) % len(self.addresses)
            a = self.address
            client._host, client._port = a.host, a.port
            client.username_pw_set(a.username, a.password)
            # A fresh client id on the next broker: we start clean anyway, and a cluster that still holds the old
            # session may refuse its id while the node that had it is down (NATS 2.9 first deletes the old
            # session's JetStream consumers, which lived there).
            self.client_id = unique_client_id(self._id_base)
            client._client_id = self.client_id.encode()
            # The barrier goes with the id (see __init__). Reads in flight end with the lost connection (None on
            # their queue), so none waits on the old one; the subscription restored on CONNACK is the new one.
            old, self.barrier_topic = self.barrier_topic, self.topics.barrier(self.client_id)
            if old in self._sub_refs:
                self._sub_refs[self.barrier_topic] = self._sub_refs.pop(old)
        log.info("%s %s; next attempt: %s as %s", why, previous, self.url, self.client_id)

    def _new_paho(self, version: str) -> paho.Client:
        proto = MQTTProtocolVersion.MQTTv5 if version == "5" else MQTTProtocolVersion.MQTTv311
        kwargs: dict[str, Any] = {} if version == "5" else {"clean_session": True}
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto,
            manual_ack=self.receive_window is not None, **kwargs
        )
        if self.address.tls:
            # an encrypted key without key_password must fail here, never wait for OpenSSL's terminal prompt
            password: bytes | Callable[[], bytes] = self._key_password or _no_key_password
            try:
                client.tls_set(ca_certs=self.ca_file, certfile=self.cert_file, keyfile=self.key_file,
                               cert_reqs=ssl.CERT_REQUIRED, keyfile_password=password)  # type: ignore[arg-type]
            except (OSError, ssl.SSLError, ValueError) as e:
                raise TransportError(f"TLS setup for {self.url} (ca_file {self.ca_file}, cert_file "
                                     f"{self.cert_file}, key_file {self.key_file}): {e}") from e
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        client.max_inflight_messages_set(self.max_inflight)
        if self.will is not None:  # paho sends it with every CONNECT, reconnects included
            w = self.will
            client.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        # paho annotates int but only compares, doubles and sleeps on them: a float min_delay is the jitter
        client.reconnect_delay_set(min_delay=cast(int, self.reconnect_min_delay),
                                   max_delay=cast(int, self.reconnect_max_delay))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_ack
        client.on_unsubscribe = self._on_ack
        client.on_publish = self._on_publish
        client.on_socket_open = _set_nodelay
        return client

    def _connect_once(self, version: str, timeout: float) -> bool:
        """Connect with one protocol version; True when the broker refused that version."""
        client = self._new_paho(version)
        client.connect_timeout = timeout
        with self._lock:
            self._paho = client
            self._connack = None
            self._lost_before_connack = False
        kwargs: dict[str, Any] = {}
        if version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.MaximumPacketSize = self.max_packet_size
            if self.receive_window is not None:
                props.ReceiveMaximum = self.receive_window
            kwargs = {"clean_start": True, "properties": props}
        a = self.address
        try:
            client.connect(a.host, a.port, keepalive=self.keepalive, **kwargs)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise TransportError(f"cannot connect to MQTT broker {a.host}:{a.port}: {e}") from e
        client.loop_start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._connack is None and not self._lost_before_connack:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            connack, lost, text = self._connack, self._lost_before_connack, self._connack_text
        if connack == 0:
            return False
        self._shutdown_paho(client)
        if connack is None and not lost:
            self._not_serving = True
            raise TransportError(f"no CONNACK from {a.host}:{a.port} within {timeout:g}s")
        # A 3.1.1-only broker answers CONNACK code 1, or just drops a CONNECT it does not understand.
        if version == "5" and (lost or connack in _UNSUPPORTED_PROTOCOL):
            return True
        if lost:
            self._not_serving = True
            raise TransportError(f"broker {a.host}:{a.port} closed the connection before CONNACK")
        raise TransportError(f"broker {a.host}:{a.port} refused the connection: {text}")

    def _shutdown_paho(self, client: paho.Client) -> None:
        try:
            client.disconnect()
        finally:
            client.loop_stop()

    def close(self) -> None:
        with self._lock:
            client, self._paho = self._paho, None
            self._connected = False
            self._generation += 1
            routes = list(self._routes)
            self._routes.clear()
            self._sub_refs.clear()  # a later connect() starts without stale subscriptions
            self._suback_hooks.clear()
            self._barriers_due.clear()
            for r in routes:
                r.closed = True
            self._cond.notify_all()
        for r in routes:
            r.queue.put(None)  # ends streams, fails get_retained waiting in other threads
        if client is not None:
            self._shutdown_paho(client)

    def __enter__(self) -> MqttClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_connected(self) -> bool:
        return self._connected

    def wait_connected(self, timeout: float) -> bool:
        """Block until paho's automatic reconnect succeeded (and we resubscribed), or `timeout` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._connected and self._paho is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._connected

    # ---- paho callbacks (network thread): convert, record, hand over; nothing else

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._cond:
            if client is not self._paho:
                return
            self._connack = int(reason.value)
            self._connack_text = str(reason)
            self._connected = self._connack == 0
            resubscribe = self._connected and self._ever_connected
            self._ever_connected = self._ever_connected or self._connected
            filters = list(self._sub_refs)
            birth = self.birth if self._connected else None
            self._cond.notify_all()
        if birth is not None:
            client.publish(birth.topic, birth.payload, qos=birth.qos, retain=birth.retain)
        if resubscribe and filters:
            # clean start: the broker forgot our subscriptions; restore them (retained messages come again)
            for i in range(0, len(filters), MAX_TOPICS_PER_SUBSCRIBE):
                _, mid = client.subscribe(self._sub_spec(filters[i : i + MAX_TOPICS_PER_SUBSCRIBE]))
                self._ignore_ack(mid)
            log.info("reconnected to %s; resubscribed %d filters", self.url, len(filters))
        elif resubscribe:
            log.info("reconnected to %s", self.url)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._rotate(client, "cannot reach")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._cond:
            if client is not self._paho:
                return
            if self._connack is None:
                self._lost_before_connack = True
            was_connected, self._connected = self._connected, False
            self._generation += 1
            routes = list(self._routes)
            self._acks.clear()
            self._suback_hooks.clear()  # their reads get the None below
            self._barriers_due.clear()
            self._ignored_acks.clear()
            self._cond.notify_all()
        for r in routes:
            r.queue.put(None)  # wakes get_retained; streams skip it
        if was_connected:
            log.warning("lost connection to %s: %s", self.url, reason)
        self._rotate(client, "lost connection to" if was_connected else "no connection to")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            if self.receive_window is not None and msg.qos > 0:
                client.ack(msg.mid, msg.qos)  # dropped, but it must not keep the window shut
            return
        payload = bytes(msg.payload)
        size = len(payload)
        with self._lock:
            self.bytes_received += size
            routes = [r for r in self._routes if r.wants(topic)]
            generation = self._generation
        acker = None
        if self.receive_window is not None and msg.qos > 0:
            acker = _Ack(self, client, msg.mid, msg.qos, generation)
            # only a retained read's caller says when it is done; anything else is acknowledged on arrival
            deferred = [r for r in routes if r.defers_ack and (r.max_payload is None or size <= r.max_payload)]
            if not deferred:
                acker.send()
                acker = None
        if not routes:
            return
        props = getattr(msg, "properties", None)  # MQTT 5 only
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        message = Message(
            topic,
            payload,
            bool(msg.retain),
            str(response_topic) if response_topic is not None else None,
            bytes(correlation) if correlation is not None else None,
            acker,
        )
        counted = size if topic != self.barrier_topic else 0  # our own barrier tokens are not data
        for r in routes:
            r.bytes_received += counted
            if r.max_payload is not None and size > r.max_payload:
                r.oversize[topic] = size  # refused before it is queued for anyone
                continue
            if r.on_arrival is not None and topic != self.barrier_topic:
                try:
                    r.on_arrival(message)
                except Exception:  # the caller sees the message anyway and deals with it in its own thread
                    log.exception("on_arrival hook failed for %s", topic)
                else:
                    message.ack()  # the hook is done with it (stored it): let the broker send the next one
            r.queue.put(message)
            if r.closed:  # closed after we picked the route: its drain may have missed this message
                message.ack()

    def _on_ack(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        _quickack(client)
        codes = [int(r.value) if hasattr(r, "value") else int(r) for r in reasons] if isinstance(reasons, list) else []
        with self._cond:
            if mid in self._ignored_acks:
                self._ignored_acks.discard(mid)
                return
            hook = self._suback_hooks.pop(mid, None)
            if hook is None:
                # stored even before the caller registered interest: the ack can beat paho's subscribe() return
                self._acks[mid] = codes
                self._cond.notify_all()
                return
        hook(codes)

    def _forget_subacks(self, read: RetainedRead) -> None:
        """Nobody waits for the SUBACKs of `read` any more (it was closed)."""
        with self._cond:
            for mid in read._mids:
                if self._suback_hooks.pop(mid, None) is not None:
                    self._ignored_acks.add(mid)
            self._barrier_out(read)

    def _barrier_out(self, read: RetainedRead) -> None:
        """`read` no longer holds back later reads (its barrier was published, or it failed); hold the lock."""
        if id(read) in self._barriers_due:
            self._barriers_due.discard(id(read))
            self._cond.notify_all()

    def _ignore_ack(self, mid: int | None) -> None:
        if mid is None:
            return
        with self._lock:
            if self._acks.pop(mid, None) is None:
                self._ignored_acks.add(mid)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        _quickack(client)
        if getattr(reason, "is_failure", False):
            with self._lock:
                self._publish_failures[mid] = str(reason)

    # ---- helpers used by handles and subscriptions

    def _pop_publish_failure(self, mid: int) -> str | None:
        with self._lock:
            return self._publish_failures.pop(mid, None)

    def _raise_if_lost(self) -> None:
        if not self._connected:
            raise ConnectionLost(f"connection to {self.url} lost")

    def _client(self) -> paho.Client:
        client = self._paho
        if client is None:
            raise TransportError(f"MQTT client for {self.url} is not connected (connect() first)")
        return client

    def _sub_spec(self, filters: list[str]) -> list[tuple[str, Any]]:
        qos = self.address.subscribe_qos
        if self.protocol == "3.1.1":
            return [(f, qos) for f in filters]
        return [(f, SubscribeOptions(qos=qos)) for f in filters]

    def _wait_ack(self, mid: int, what: str, timeout: float, generation: int) -> list[int]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._acks:
                if self._generation != generation:
                    raise ConnectionLost(f"connection to {self.url} lost while waiting for {what}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._ignored_acks.add(mid)
                    raise TransportError(f"no {what} from {self.url} within {timeout:g}s")
                self._cond.wait(remaining)
            return self._acks.pop(mid)

    def _subscribe(self, filters: list[str], timeout: float) -> None:
        """SUBSCRIBE (always sent, even for filters we hold: that is what makes the broker resend retained
        messages) and wait for SUBACK."""
        client = self._client()
        with self._lock:
            for f in filters:
                self._sub_refs[f] = self._sub_refs.get(f, 0) + 1
        try:
            for i in range(0, len(filters), MAX_TOPICS_PER_SUBSCRIBE):
                part = filters[i : i + MAX_TOPICS_PER_SUBSCRIBE]
                with self._lock:
                    generation = self._generation
                rc, mid = client.subscribe(self._sub_spec(part))
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                    raise ConnectionLost(f"cannot subscribe on {self.url}: {paho.error_string(rc)}")
                codes = self._wait_ack(mid, "SUBACK", timeout, generation)
                refused = [f for f, c in zip(part, codes, strict=False) if c >= 0x80]
                if refused:
                    raise TransportError(f"broker refused subscription to {refused[0]} (and {len(refused) - 1} more)")
        except BaseException:
            self._unsubscribe(filters)
            raise

    def _unsubscribe(self, filters: list[str]) -> None:
        """Drop our references; UNSUBSCRIBE what nobody uses any more (not waited for: later SUBSCRIBEs on the
        same connection are processed after it)."""
        gone: list[str] = []
        with self._lock:
            for f in filters:
                n = self._sub_refs.get(f, 0) - 1
                if n <= 0:
                    self._sub_refs.pop(f, None)
                    gone.append(f)
                else:
                    self._sub_refs[f] = n
            client = self._paho if self._connected else None
        if client is None or not gone:
            return
        for i in range(0, len(gone), MAX_TOPICS_PER_SUBSCRIBE):
            rc, mid = client.unsubscribe(gone[i : i + MAX_TOPICS_PER_SUBSCRIBE])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._ignore_ack(mid)

    def _add_route(
        self, filters: Iterable[str], max_payload: int | None = None, defers_ack: bool = False,
        on_arrival: Callable[[Message], None] | None = None,
    ) -> _Route:
        exact = frozenset(f for f in filters if "+" not in f and "#" not in f)
        wild = tuple(f for f in filters if "+" in f or "#" in f)
        route = _Route(exact, wild, queue.SimpleQueue(), max_payload, defers_ack, on_arrival)
        with self._lock:
            self._routes.append(route)
        return route

    def _remove_route(self, route: _Route) -> None:
        with self._lock:
            if route in self._routes:
                self._routes.remove(route)

    # ---- public operations

    def start_retained(
        self, topics: list[str], timeout: float = 10.0, max_payload: int | None = None,
        on_arrival: Callable[[Message], None] | None = None, grace: float | None = None,
    ) -> RetainedRead:
        """Begin a retained read of `topics` and return at once, without waiting for the broker (see
        `RetainedRead`): the caller can go on taking the messages of an earlier read meanwhile.

        Subscribe to all at once; when the SUBACK arrives, publish a token to our barrier topic (from paho's thread):
        on a broker that delivers a connection's messages in order, once the token echoes every retained message of
        `topics` is here; topics still missing then get `grace` seconds more (default: the client's
        `retained_grace`), and the read is complete at once when every topic has arrived. Payloads larger than
        `max_payload` are dropped before they are queued (see `oversize`).
        A refused subscription, a lost connection or a late barrier is raised by the read's `get()`.

        `on_arrival(message)`, when given, runs on paho's network thread for each message of `topics` (payload
        within `max_payload`) before it is queued; it must be quick and thread-safe. With a `receive_window` the
        message is acknowledged as soon as the hook returns (unless it raised: then when the caller takes it).
        """
        topics = list(dict.fromkeys(validate_topic(t) for t in topics))
        token = uuid.uuid4().hex.encode()
        route = self._add_route([*topics, self.barrier_topic], max_payload, defers_ack=True, on_arrival=on_arrival)
        read = RetainedRead(self, route, topics, token, timeout, self.retained_grace if grace is None else grace)
        if not topics:
            read.done = True
            read.close()
            return read
        parts = [topics[i : i + MAX_TOPICS_PER_SUBSCRIBE] for i in range(0, len(topics), MAX_TOPICS_PER_SUBSCRIBE)]
        waiting = [len(parts)]  # SUBACKs still to come, counted down on paho's thread

        def on_suback(part: list[str], codes: list[int]) -> None:
            refused = [f for f, c in zip(part, codes, strict=False) if c >= 0x80]
            if refused:
                route.queue.put(TransportError(
                    f"broker refused subscription to {refused[0]} (and {len(refused) - 1} more)"))
            else:
                with self._lock:
                    waiting[0] -= 1
                    if waiting[0] > 0:
                        return
                try:
                    self.publish(self.barrier_topic, token, retain=False, qos=1, wait=False)
                except TransportError as e:
                    route.queue.put(e)
            with self._cond:
                self._barrier_out(read)

        # Keep this SUBSCRIBE behind the barrier of any read still waiting for its SUBACK: the broker then sends
        # read after read (messages, token, next messages, ...), never a later read's messages before an earlier
        # read's token. Usually nothing to wait for: the earlier read's SUBACK came while its caller was busy.
        deadline = time.monotonic() + timeout
        failure: TransportError | None = None
        with self._cond:
            generation = self._generation
            while self._barriers_due and failure is None:
                remaining = deadline - time.monotonic()
                if self._generation != generation:
                    failure = ConnectionLost(f"connection to {self.url} lost before reading retained messages")
                elif remaining <= 0:
                    failure = TransportError(f"no SUBACK from {self.url} within {timeout:g}s for an earlier read")
                else:
                    self._cond.wait(remaining)
            if failure is None:
                self._barriers_due.add(id(read))
                for t in topics:  # read.close() drops these again
                    self._sub_refs[t] = self._sub_refs.get(t, 0) + 1
        if failure is not None:
            read._closed = True  # nothing to unsubscribe
            self._remove_route(route)
            raise failure
        try:
            client = self._client()
            for part in parts:
                rc, mid = client.subscribe(self._sub_spec(part))
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                    raise ConnectionLost(f"cannot subscribe on {self.url}: {paho.error_string(rc)}")
                with self._lock:
                    codes = self._acks.pop(mid, None)  # already here: paho's thread was quicker than this one
                    if codes is None:
                        self._suback_hooks[mid] = functools.partial(on_suback, part)
                        read._mids.append(mid)
                if codes is not None:
                    on_suback(part, codes)
        except BaseException as e:
            read.close()
            if isinstance(e, ConnectionLost):
                raise ConnectionLost(str(e), route.bytes_received) from e
            raise
        return read

    def fetch_retained(
        self,
        topics: list[str],
        timeout: float = 10.0,
        max_payload: int | None = None,
        on_message: Callable[[Message], None] | None = None,
        grace: float | None = None,
    ) -> RetainedResult:
        """Retained messages of `topics`, with what was refused for exceeding `max_payload` and the byte count.

        `on_message`, when given, is called in the caller's thread with each message as it is taken from the queue
        (before the barrier: the caller can act on every message the moment it arrives); those messages are then
        not kept in the result, whose `messages` stays empty. A live delete arrives as an empty payload.
        `ConnectionLost` carries the bytes received before the connection dropped.
        """
        read = self.start_retained(topics, timeout, max_payload, grace=grace)
        messages: dict[str, bytes] = {}
        try:
            for item in read:
                if on_message is not None:
                    on_message(item)
                elif item.payload:
                    messages[item.topic] = item.payload
                else:
                    messages.pop(item.topic, None)  # a live delete
        finally:
            read.close()
        return RetainedResult(messages, read.oversize, read.bytes_received)

    def get_retained(self, topics: list[str], timeout: float = 10.0) -> dict[str, bytes]:
        """Topic -> retained payload; topics without a retained message are absent."""
        return self.fetch_retained(topics, timeout).messages

    def publish(
        self,
        topic: str,
        payload: bytes,
        retain: bool = True,
        qos: int = 1,
        wait: bool = True,
        timeout: float = 30.0,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> PublishHandle:
        """Publish; with `wait` (and qos >= 1) return only after the broker's PUBACK.

        `response_topic` / `correlation_data` become MQTT 5 properties (ignored on an MQTT 3.1.1 connection).
        With `wait=False` this never blocks on the network: while the connection is down it raises
        `ConnectionLost` at once (paho only queues the packet).
        """
        validate_topic(topic)
        if response_topic is not None:
            validate_topic(response_topic)
        client = self._client()
        properties: Properties | None = None
        if self.protocol == "5" and (response_topic is not None or correlation_data is not None):
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation_data is not None:
                properties.CorrelationData = bytes(correlation_data)
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except ValueError as e:
            raise TransportError(f"cannot publish to {topic}: {e}") from e
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            # Never sent. Callers re-publish, so paho must not keep it (it would resend it after reconnecting,
            # after anything published since: a stale retained state would win).
            if qos > 0:
                _forget_unsent(client, info.mid)
            raise ConnectionLost(f"not connected to {self.url}; cannot publish to {topic}")
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        handle = PublishHandle(self, info, topic)
        if wait and qos > 0:
            handle.wait(timeout)
        return handle

    def delete_retained(self, topic: str, timeout: float = 30.0) -> None:
        """Clear a retained message (an empty retained payload)."""
        self.publish(topic, b"", retain=True, qos=1, wait=True, timeout=timeout)

    def subscribe_stream(self, filters: list[str], timeout: float = 10.0) -> Subscription:
        """A live subscription delivering `Message`s (retained ones first) until closed."""
        filters = list(dict.fromkeys(validate_filter(f) for f in filters))
        route = self._add_route(filters)
        try:
            self._subscribe(filters, timeout)
        except BaseException:
            self._remove_route(route)
            raise
        return Subscription(self, route, filters)
