"""Throwaway MQTT brokers of every kind edgeship is tested on, each on free loopback ports with its own directory:
for tests, benchmarks and docs/scaling.md. Never the machine's own services (1883, 5672, 4222, 25672).

    KINDS = mosquitto-5, mosquitto-3.1.1, rabbitmq, nats     `launch(kind, workdir)` -> a started broker
    NatsCluster(workdir, nodes=3)                             three NATS nodes with routes, JetStream and MQTT

- `mosquitto-5`: Mosquitto 2.0 as `examples/local_broker.py` starts it (clients negotiate MQTT 5).
- `mosquitto-3.1.1`: the same Mosquitto behind a gate that answers an MQTT 5 CONNECT the way a 3.1.1-only broker
  does (CONNACK "unacceptable protocol version", then close) and relays everything else untouched, so every client
  (agent, packager, tests) falls back to MQTT 3.1.1 exactly as it would on RabbitMQ 3.10 or NATS 2.9.
- `rabbitmq`: a private RabbitMQ node (own node name, Erlang cookie, distribution, AMQP and MQTT ports, data and log
  directories) with the `rabbitmq_mqtt` plugin; boots in ~5-15 s, so tests start it once per session.
- `nats`: one nats-server with JetStream (MQTT needs it) and its MQTT listener.

Every broker has `url` (the first node's `mqtt://127.0.0.1:PORT`), `start()`, `stop()` (clean), `kill()`
(SIGKILL), `log()`, and is ready only once it answers an MQTT CONNECT with CONNACK accepted (not merely a TCP
connect: RabbitMQ and NATS open the port before they can serve MQTT). A missing binary raises `BrokerMissing`
with the package to install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

from examples.local_broker import Mosquitto, MosquittoMissing, find_mosquitto, free_port

KINDS = ("mosquitto-5", "mosquitto-3.1.1", "rabbitmq", "nats")


class BrokerMissing(RuntimeError):
    """The broker's program is not installed: the message says which package to install."""


class Broker(Protocol):
    kind: str

    @property
    def url(self) -> str: ...

    @property
    def port(self) -> int: ...

    def start(self, timeout: float = ...) -> None: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...

    def close(self) -> None: ...

    def log(self) -> str: ...


# ---------------------------------------------------------------------------------------------- readiness probe


def _connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT, clean session, keepalive 10 s, no will, no credentials."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def mqtt_answers(port: int, timeout: float = 1.0) -> bool:
    """Whether 127.0.0.1:`port` accepts an MQTT 3.1.1 CONNECT (CONNACK return code 0). Disconnects cleanly."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(_connect_packet(f"probe-{uuid.uuid4().hex[:12]}"))
            ack = b""
            while len(ack) < 4:
                data = s.recv(4 - len(ack))
                if not data:
                    return False
                ack += data
            ok = ack[0] == 0x20 and ack[3] == 0
            if ok:
                s.sendall(b"\xe0\x00")  # DISCONNECT
            return ok
    except OSError:
        return False


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before serving MQTT:\n{tail}")
        if mqtt_answers(port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not accept an MQTT CONNECT on port {port} within {timeout:g}s")


def _find(names: tuple[str, ...], package: str) -> str:
    for candidate in (*names, *(shutil.which(Path(n).name) for n in names)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerMissing(f"{Path(names[0]).name} is not installed (looked in {', '.join(names)} and PATH): "
                        f"`apt-get install {package}`")


def _stop_group(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 20.0) -> None:
    """Signal the process group started for a broker (its children too: Erlang's helpers), then reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------------------------- Mosquitto


class MosquittoBroker:
    """Mosquitto 2.0 speaking MQTT 5 and 3.1.1 (`protocol="5"`), or only 3.1.1 (`protocol="3.1.1"`, see
    `V311Gate`)."""

    def __init__(self, workdir: Path, protocol: str = "5", *, persistent: bool = False, extra_conf: str = "") -> None:
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol must be 5 or 3.1.1: {protocol!r}")
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.mosquitto = Mosquitto(workdir, persistent=persistent, extra_conf=extra_conf)
        except MosquittoMissing as e:
            raise BrokerMissing(str(e)) from e
        self.kind = "mosquitto-5" if protocol == "5" else "mosquitto-3.1.1"
        self.gate = V311Gate(self.mosquitto.port) if protocol == "3.1.1" else None

    @property
    def port(self) -> int:
        return self.gate.port if self.gate is not None else self.mosquitto.port

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.mosquitto.start(timeout)

    def stop(self) -> None:
        self.mosquitto.stop()
        if self.gate is not None:
            self.gate.cut()

    def kill(self) -> None:
        self.mosquitto.kill()
        if self.gate is not None:
            self.gate.cut()

    def close(self) -> None:
        self.stop()
        if self.gate is not None:
            self.gate.close()

    def log(self) -> str:
        return self.mosquitto.log()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("closed")
        data += part
    return data


def _read_fixed_header(sock: socket.socket) -> tuple[bytes, int]:
    """The first byte and remaining-length bytes of an MQTT packet, and the remaining length."""
    head = _read_exact(sock, 1)
    length, shift = 0, 0
    for _ in range(4):
        b = _read_exact(sock, 1)
        head += b
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            return head, length
    raise ConnectionError("malformed remaining length")


class TcpRelay:
    """A loopback TCP relay in front of a broker: every connection is passed on byte for byte in both directions.
    `cut()` drops the live connections (the broker behind went away) while new ones are still accepted; the first
    `drop` connections are closed at once (a node that takes the connection but not yet the CONNECT); `accepted`
    counts connections. With `cut_after=N` the relay cuts by itself once N bytes went from the broker to the client
    (`was_cut` is then set): an interruption at a known point of a transfer, whatever the machine's speed.
    Subclasses may look at the first packet (`_first`)."""

    def __init__(self, upstream_port: int, drop: int = 0, cut_after: int | None = None) -> None:
        self.upstream_port, self.drop = upstream_port, drop
        self.cut_after, self.was_cut = cut_after, threading.Event()
        self._downstream = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.accepted = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name=type(self).__name__).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                dropped = self.accepted <= self.drop
            if dropped:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _first(self, client: socket.socket) -> bytes | None:
        """What to send upstream before relaying (None: the connection was answered here and closed)."""
        return b""

    def _serve(self, client: socket.socket) -> None:
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            first = self._first(client)
            if first is None:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            upstream.settimeout(None)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.sendall(first)
        except OSError:
            client.close()
            return
        with self._lock:
            self._socks += [client, upstream]
        threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool = False) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if downstream and self.cut_after is not None and not self.was_cut.is_set():
                    with self._lock:
                        room = self.cut_after - self._downstream
                        self._downstream += len(data)
                    if room <= len(data):
                        dst.sendall(data[: max(room, 0)])
                        self.was_cut.set()
                        self.cut()
                        break
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every relayed connection; new ones are still accepted."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


class V311Gate(TcpRelay):
    """A relay in front of an MQTT broker that behaves like a 3.1.1-only broker: an MQTT 5 CONNECT (protocol level 5)
    gets CONNACK return code 1 ("unacceptable protocol version") and the connection is closed; any other CONNECT is
    relayed with everything after it."""

    def __init__(self, upstream_port: int) -> None:
        self.refused_v5 = 0
        super().__init__(upstream_port)

    def _first(self, client: socket.socket) -> bytes | None:
        head, length = _read_fixed_header(client)
        body = _read_exact(client, length)
        level = body[6] if head[0] >> 4 == 1 and len(body) > 6 else None
        if level == 5:
            with self._lock:
                self.refused_v5 += 1
            client.sendall(b"\x20\x02\x00\x01")
            client.close()
            return None
        return head + body


# ---------------------------------------------------------------------------------------------- RabbitMQ

RABBITMQ_SERVER = ("/usr/lib/rabbitmq/bin/rabbitmq-server",)  # not /usr/sbin's wrapper: it switches user
RABBITMQCTL = ("/usr/lib/rabbitmq/bin/rabbitmqctl", "/usr/sbin/rabbitmqctl")


class RabbitMQ:
    """A private RabbitMQ node with the MQTT plugin (MQTT 3.1.1 only in 3.10), anonymous MQTT logins allowed."""

    kind = "rabbitmq"

    def __init__(self, workdir: Path) -> None:
        self.binary = _find(RABBITMQ_SERVER, "rabbitmq-server")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.node = f"edgeship-{uuid.uuid4().hex[:10]}@localhost"
        self.port = free_port()  # MQTT
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.log_path = workdir / "stdout.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        d = self.workdir
        return {
            **os.environ,
            "HOME": str(d),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),  # rabbitmq.conf; the env names it without suffix
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
        }

    def _write_conf(self) -> None:
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "loopback_users = none\n"
        )

    def start(self, timeout: float = 90.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self._write_conf()
        self.proc = subprocess.Popen([self.binary], env=self.env(), stdin=subprocess.DEVNULL,
                                     stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            _wait_ready(self.port, self.proc, timeout, f"RabbitMQ node {self.node}", self.log_path)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """`rabbitmqctl stop` (the node writes its state), then whatever is left of the process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(BrokerMissing, OSError, subprocess.TimeoutExpired):
                ctl = _find(RABBITMQCTL, "rabbitmq-server")
                subprocess.run([ctl, "-n", self.node, "stop"], env=self.env(), capture_output=True, timeout=60,
                               check=False)
        _stop_group(self.proc, signal.SIGTERM)
        self.proc = None

    def kill(self) -> None:
        _stop_group(self.proc, signal.SIGKILL)
        self.proc = None

    def close(self) -> None:
        self.stop()

    def log(self) -> str:
        logs = [self.log_path, *sorted((self.workdir / "log").glob("*.log"))]
        return "".join(p.read_text(errors="replace") for p in logs if p.exists())


# ---------------------------------------------------------------------------------------------- NATS

NATS_SERVER = ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server")


class NatsNode:
    """One nats-server with JetStream and its MQTT listener; with `routes`, a member of a cluster."""

    kind = "nats"

    def __init__(self, workdir: Path, name: str = "n1", *, cluster_port: int | None = None,
                 routes: tuple[int, ...] = (), stream_replicas: int = 1) -> None:
        self.binary = _find(NATS_SERVER, "nats-server")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()  # MQTT
        self.client_port = free_port()  # NATS protocol
        self.cluster_port = cluster_port
        self.routes = routes
        self.stream_replicas = stream_replicas
        self.conf_path = workdir / "nats.conf"
        self.log_path = workdir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        lines = [
            f"listen: 127.0.0.1:{self.client_port}",
            f"server_name: {self.name}",
            f'jetstream {{ store_dir: "{self.workdir / "js"}" }}',
            f"mqtt {{ listen: 127.0.0.1:{self.port}"
            # clustered: the MQTT streams (retained messages, sessions) on every node; the JetStream consumer
            # behind each QoS 1 subscription in memory on one node (R1): publishing 8 MB through one node took 40 s
            # with R3 consumers, 5 s with these. Neither survives a dead node on 2.9.10, which places consumers on
            # offline peers too (fixed in 2.9.12): clients that must fail over subscribe at QoS 0, which costs no
            # consumer (`?subscribe_qos=0`, docs/scaling.md)
            + (f", stream_replicas: {self.stream_replicas}, consumer_replicas: 1, consumer_memory_storage: true"
               if self.stream_replicas > 1 else "") + " }",
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines.append(f"cluster {{ name: edgeship, listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def launch(self) -> None:
        """Start the process without waiting (a cluster node can serve MQTT only once the others are up)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._write_conf()
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.log_path.open("ab"),
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None, "launch() first"
        _wait_ready(self.port, self.proc, timeout, f"nats-server {self.name}", self.log_path)

    def start(self, timeout: float = 30.0) -> None:
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        _stop_group(self.proc, signal.SIGTERM)
        self.proc = None

    def kill(self) -> None:
        _stop_group(self.proc, signal.SIGKILL)
        self.proc = None

    def close(self) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class NatsCluster:
    """`nodes` NATS servers routed into one cluster on loopback, JetStream clustered, MQTT on each node, MQTT
    streams (retained messages, sessions) replicated on `nodes` servers so they survive the loss of one."""

    kind = "nats-cluster"

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        cluster_ports = [free_port() for _ in range(nodes)]
        self.nodes = [
            NatsNode(workdir / f"n{i + 1}", f"n{i + 1}", cluster_port=cluster_ports[i],
                     routes=tuple(p for j, p in enumerate(cluster_ports) if j != i), stream_replicas=nodes)
            for i in range(nodes)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 60.0) -> None:
        for n in self.nodes:
            n.launch()
        try:
            for n in self.nodes:
                n.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()

    def close(self) -> None:
        self.stop()

    def log(self) -> str:
        return "".join(f"--- {n.name}\n{n.log()}" for n in self.nodes)


# ---------------------------------------------------------------------------------------------- one entry point


def launch(kind: str, workdir: Path, timeout: float | None = None, *, persistent: bool = False,
           mosquitto_conf: str = "") -> MosquittoBroker | RabbitMQ | NatsNode:
    """Start a broker of `kind` (one of KINDS) in `workdir` and return it, ready for MQTT. RabbitMQ and NATS always
    keep retained messages on disk across a restart; Mosquitto only with `persistent`. `mosquitto_conf`: extra
    lines for a Mosquitto kind's config (ignored by the others)."""
    broker: MosquittoBroker | RabbitMQ | NatsNode
    if kind == "mosquitto-5":
        broker = MosquittoBroker(workdir, "5", persistent=persistent, extra_conf=mosquitto_conf)
    elif kind == "mosquitto-3.1.1":
        broker = MosquittoBroker(workdir, "3.1.1", persistent=persistent, extra_conf=mosquitto_conf)
    elif kind == "rabbitmq":
        broker = RabbitMQ(workdir)
    elif kind == "nats":
        broker = NatsNode(workdir)
    else:
        raise ValueError(f"unknown broker kind {kind!r}: one of {', '.join(KINDS)}")
    if timeout is None:
        broker.start()
    else:
        broker.start(timeout)
    return broker


def versions() -> dict[str, str]:
    """The installed brokers' versions (for reports), missing ones left out."""
    out: dict[str, str] = {}
    probes = {
        "mosquitto": ([find_mosquitto, "-h"], "mosquitto version "),
        "nats-server": ([lambda: _find(NATS_SERVER, "nats-server"), "--version"], ": v"),
    }
    for name, ((finder, arg), marker) in probes.items():
        with contextlib.suppress(BrokerMissing, MosquittoMissing, OSError, subprocess.TimeoutExpired):
            r = subprocess.run([finder(), arg], capture_output=True, text=True, timeout=10, check=False)
            text = r.stdout + r.stderr
            if marker in text:
                out[name] = text.split(marker, 1)[1].split()[0]
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"], capture_output=True,
                           text=True, timeout=10, check=False)
        if r.returncode == 0 and r.stdout:
            out["rabbitmq-server"] = r.stdout.split("-")[0]
    return out
