"""Measure a signed bundle's trip from the packager to a device over MQTT (and over the HTTP mirror) on this machine,
and write one JSON file with every figure.

    python benchmarks/transfer_bench.py [--out benchmarks/results/transfer.json] [--mb 50] [--rounds 3]

Everything runs through the real code paths against a throwaway mosquitto on a free port
(`examples/local_broker.py`, never the system broker on 1883), all on 127.0.0.1:

- setup: a fresh TUF repository (`packager.tuf_repo.init_repo`) and a bundle (`agent.bundle.write_bundle`) holding
  a synthetic manifest and one `--mb` MiB member of random bytes.
- publish: `packager.publish.publish` to the broker (sign + push; MB/s and chunks), once more to show the idempotent
  rerun, and to an HTTP mirror tree (`http_dir`).
- device path, `--rounds` times with a fresh state directory each: `agent.fetch.fetch_with` = TUF refresh, download
  of the deployment document and the bundle, `verify_bundle`; over MQTT (`MqttFetcher` with the default batch and
  pipeline, on a client with the fetch's receive window of 1 as `edge-agent fetch` uses it, and for comparison on a
  client without a window)
  and over the HTTP mirror (`HttpFetcher` against a threading http.server with Range support). Reported: MB/s and
  bytes on the wire / bundle bytes (MQTT: `MqttClient.bytes_received`, every payload byte that reached the client,
  plus the TCP byte count of the device's socket; HTTP: response body bytes, plus headers).
- ceiling: `MqttClient.fetch_retained` on every chunk topic in batches, with no hashing or storage.
- resume: the agent (`agent.fetch.fetch` in a subprocess, connected through a byte-counting TCP proxy that parses the
  MQTT packets the broker sends) is SIGKILLed once about half the bundle's bytes reached it; a new fetcher on the same
  state directory then finishes the download. Reported: how many chunks reached the device twice (those the proxy
  had forwarded whole when it sent the SIGKILL, plus the resumed fetch's; what it forwarded into the dying process's
  socket afterwards is reported beside, as `chunks_sent_twice_incl_after_kill`). The same again
  with the proxy pacing what goes down to the killed agent to 50 MB/s, a link slower than the agent stores chunks.
  Same for the HTTP mirror with a response cut at half.
- a link with a round trip: the device path through a proxy process that delays every byte (10 ms round trip), with
  receive windows 1, 4 and 16; and, through a 100 ms round trip, when each of 16 chunks arrives with windows 1, 2, 4
  and 8 (does the broker keep to the window?).
- brokers (`--brokers`, default every kind of examples/brokers.py: Mosquitto MQTT 5, Mosquitto forced to 3.1.1
  through a relay, a private RabbitMQ node, NATS with JetStream): one run each, side by side: a fresh broker, the
  same bundle published to it (MB/s) and fetched by the device path with the agent's default window (MB/s,
  payload and TCP bytes / bundle bytes). `--only-brokers` runs just the setup and this part (and writes to
  benchmarks/results/transfer_brokers.json unless `--out` says otherwise).

MB is 10^6 bytes. Progress goes to stderr, a table and one PASS/MISS line per target to stdout. The exit status is
0 even when a target is missed: this is a measurement, not a test (1 when mosquitto is missing, 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import http.server
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/transfer_bench.py` from anywhere
    sys.path.insert(0, str(REPO))

from agent.bundle import Artifact, Manifest, TensorSpec, sha256_file, verify_bundle, write_bundle  # noqa: E402
from agent.config import AgentConfig, MqttSection, parse_config  # noqa: E402
from agent.errors import EdgeshipError  # noqa: E402
from agent.transport.mqtt import Message, MqttClient, RetainedRead  # noqa: E402
from agent.transport.topics import Topics  # noqa: E402
from agent.trust.chunks import ChunkPlan, chunk_hashes  # noqa: E402
from agent.trust.fetch import fetch, fetch_with  # noqa: E402
from agent.trust.http_fetcher import HttpFetcher  # noqa: E402
from agent.trust.mqtt_fetcher import DEFAULT_BATCH, DEFAULT_PIPELINE, MqttFetcher, stored_slots  # noqa: E402
from benchmarks._common import Target, code_state, load_average, machine_info, mosquitto_version, write_json  # noqa: E402
from examples.brokers import KINDS as BROKER_KINDS  # noqa: E402
from examples.brokers import Broker, BrokerMissing  # noqa: E402
from examples.brokers import launch as launch_broker  # noqa: E402
from examples.brokers import versions as broker_versions  # noqa: E402
from examples.local_broker import Mosquitto, MosquittoMissing, find_mosquitto  # noqa: E402
from packager import tuf_repo  # noqa: E402
from packager.publish import CHUNK_SIZE, publish, topics_for  # noqa: E402

log = logging.getLogger("transfer_bench")

DEFAULT_MB = 50
DEFAULT_ROUNDS = 7  # the device path swings by a third between runs on a shared VM: a median of 7 holds still
MBPS_MIN = 100.0  # device path, MB/s (10^6 bytes per second)
WIRE_RATIO_MAX = 1.05  # payload bytes received / bundle bytes
RESUME_REFETCH_MAX = 1  # chunks that reach the device twice after a cut at ~50 %
WIDE_BATCH = 64  # a second batch size for the raw ceiling
RECEIVE_WINDOW = MqttSection().receive_window  # the agent's default `[mqtt] receive_window`
PACED_MBPS = 50.0  # resume trials through a proxy paced to this rate: a link slower than the agent stores chunks
CEILING_BATCHES = (DEFAULT_BATCH, WIDE_BATCH)
LATENCY_RTT_S = 0.010  # a link with this round trip (LAN / Wi-Fi class) for the window trials
LATENCY_WINDOWS = (1, 4, 16)
ARRIVALS_RTT_S = 0.100  # long enough that each round trip's chunks arrive as one group
ARRIVALS_WINDOWS = (1, 2, 4, 8)
FLEET = "bench"
GROUP = "bench-devices"
BUNDLE_NAME = "bench"
TRANSFER_FLAGS = ("sha_ni", "sha2", "sha512", "avx2", "avx512f", "aes")  # sha_ni / sha2: hardware SHA-256
TRANSFER_DISTS = ("paho-mqtt", "tuf", "securesystemslib", "cryptography", "requests", "urllib3")
MB = 1e6


# --------------------------------------------------------------------------------------------- targets


# --------------------------------------------------------------------------------------------- helpers


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB if seconds > 0 else float("inf")


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def tcp_bytes_received(client: MqttClient) -> int | None:
    """Bytes the kernel received on the client's TCP connection (`tcpi_bytes_received`, Linux >= 4.1): the MQTT
    packets whole, headers and topic names included. None where that cannot be read."""
    paho_client = getattr(client, "_paho", None)  # the one socket the facade owns; read-only use
    sock = paho_client.socket() if paho_client is not None else None
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    if len(info) < 136:
        return None
    return int(struct.unpack_from("=Q", info, 128)[0])


class TimedMqttClient(MqttClient):
    """MqttClient that adds up the time the caller spends waiting on retained reads (`start_retained`: subscribe
    and SUBACK; `RetainedRead.get`: blocked until the next message or the barrier echo arrives; `fetch_retained` is
    made of both): the device path's wait on the broker, as against its own work (hashing, files, TUF, bundle
    checks). With reads pipelined, the broker's work while the agent is busy is not waiting and is not counted."""

    retained_seconds = 0.0

    def start_retained(self, topics: list[str], timeout: float = 10.0, max_payload: int | None = None,
                       on_arrival: Callable[[Message], None] | None = None, **options: Any) -> RetainedRead:
        t0 = time.perf_counter()
        try:
            read = super().start_retained(topics, timeout, max_payload, on_arrival, **options)
        finally:
            self.retained_seconds += time.perf_counter() - t0
        get = read.get

        def timed_get(block: bool = True) -> Any:
            t = time.perf_counter()
            try:
                return get(block)
            finally:
                self.retained_seconds += time.perf_counter() - t

        read.get = timed_get  # type: ignore[method-assign]
        return read


def filesystem_of(path: Path) -> str | None:
    """The mount's filesystem type (fsync cost depends on it: tmpfs makes the device path look faster)."""
    best, fstype = "", None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    except OSError:
        return None
    return fstype


def tmpfs_dir() -> Path | None:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) and filesystem_of(shm) == "tmpfs" else None


def chunk_store_ms(directory: Path, chunks: int) -> float:
    """Mean milliseconds to store one 128 KiB chunk the way `MqttFetcher` does: `pwrite` at its offset in one
    preallocated partial file (chunks in order, no fsync)."""
    path = Path(tempfile.mkdtemp(prefix="store-", dir=directory)) / "x.partial"
    data = os.urandom(CHUNK_SIZE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, chunks * CHUNK_SIZE)
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, chunks * CHUNK_SIZE)
        t0 = time.perf_counter()
        for i in range(chunks):
            os.pwrite(fd, data, i * CHUNK_SIZE)
        return (time.perf_counter() - t0) * 1e3 / chunks
    finally:
        os.close(fd)
        shutil.rmtree(path.parent, ignore_errors=True)


def make_bundle(work: Path, mib: int) -> Path:
    """A bundle with a synthetic manifest and one `mib` MiB member of random bytes (incompressible)."""
    member = work / "model.int8.onnx"
    with member.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    spec_in = TensorSpec("x", (-1, 1, 8, 8), "float32")
    spec_out = TensorSpec("logits", (-1, 10), "float32")
    art = Artifact("onnx", "model.int8.onnx", (spec_in,), (spec_out,), {"name": "static"}, 97.5, 0.3, 0.1, 0.2)
    manifest = Manifest(
        name=BUNDLE_NAME, version=1, task="classification", created="2026-11-29T00:00:00+00:00",
        inputs=(spec_in,), outputs=(spec_out,), artifacts=(art,), metric="top1", fp32_metric_value=97.8,
        max_drop=1.0, parity={"kind": "top1", "min_agreement": 0.97}, latency_budget_ms=5.0,
        target={"arch": ["x86_64"]}, preprocessing={}, provenance={"source_sha256": "0" * 64},
    )
    out = work / f"{BUNDLE_NAME}-1.bundle"
    write_bundle(out, manifest, {"model.int8.onnx": member})
    member.unlink()
    return out


def device_config(state: Path, broker_url: str, root: Path) -> dict[str, Any]:
    return {"agent": {"device_id": "bench-device", "state_dir": str(state), "fleet": FLEET, "group": GROUP},
            "mqtt": {"url": broker_url}, "trust": {"root": str(root)}}


def config(data: dict[str, Any]) -> AgentConfig:
    return parse_config(data, env={})  # no EDGESHIP_* overrides from the caller's environment


def _stored_chunks(partial: Path, plan: ChunkPlan) -> int:
    """Slots of a partial file that hold their chunk (what a killed agent had stored), as the fetcher counts them."""
    try:
        fd = os.open(partial, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        return len(stored_slots(fd, plan))
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- wire tap


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """MQTT variable byte integer at `pos`: (value, position after it), None if incomplete."""
    value = 0
    for k in range(4):
        if pos + k >= len(buf):
            return None
        b = buf[pos + k]
        value |= (b & 0x7F) << (7 * k)
        if not b & 0x80:
            return value, pos + k + 1
    raise ValueError("malformed MQTT variable byte integer")


@dataclass
class TapStream:
    """One proxied connection: TCP bytes each way, and every PUBLISH the broker sent down (topic, payload bytes)."""

    version: int = 5
    bytes_down: int = 0
    bytes_up: int = 0
    publishes: Counter[str] = field(default_factory=Counter)
    payload_bytes: int = 0
    kill: tuple[int, int] | None = None  # (pid, downstream bytes): SIGKILL pid once that many bytes went down
    rate: float | None = None  # bytes/s: pace what goes down, like a link slower than the device
    killed_at: int | None = None
    # what had gone down when the SIGKILL was sent; the proxy goes on forwarding into the dying process's socket
    # until the kernel closes it, and those packets never reached a living agent
    publishes_at_kill: Counter[str] | None = None
    partial_at_kill: int | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    _down: bytearray = field(default_factory=bytearray)
    _up: bytearray = field(default_factory=bytearray)

    @property
    def partial_bytes(self) -> int:
        """Bytes of a packet the broker had started sending when the connection ended."""
        return len(self._down)

    def feed_up(self, data: bytes) -> None:
        self.bytes_up += len(data)
        if len(self._up) < 16:  # CONNECT: protocol name "MQTT", then the level (4 or 5)
            self._up += data
            head = _varint(self._up, 1) if len(self._up) >= 2 else None
            if head is not None and len(self._up) >= head[1] + 7:
                self.version = self._up[head[1] + 6]

    def feed_down(self, data: bytes) -> None:
        self.bytes_down += len(data)
        buf = self._down
        buf += data
        while len(buf) >= 2:
            head = _varint(buf, 1)
            if head is None:
                return
            remaining, body = head
            end = body + remaining
            if len(buf) < end:
                return
            if buf[0] >> 4 == 3:  # PUBLISH
                self._publish(buf[0], bytes(buf[body : body + min(remaining, 4096)]), remaining)
            del buf[:end]

    def _publish(self, first: int, head: bytes, remaining: int) -> None:
        topic_len = int.from_bytes(head[:2], "big")
        pos = 2 + topic_len
        topic = head[2:pos].decode(errors="replace")
        if (first >> 1) & 3:
            pos += 2  # packet id
        if self.version == 5:
            props = _varint(head, pos)
            if props is not None:
                pos = props[1] + props[0]
        self.publishes[topic] += 1
        self.payload_bytes += remaining - pos

    def join(self, timeout: float = 10.0) -> None:
        for t in self.threads:
            t.join(timeout)


class WireTap:
    """A TCP proxy in front of the broker that counts what it forwards and parses the MQTT packets going down to
    the device, so what reached a process is known even after that process was SIGKILLed."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.streams: list[TapStream] = []
        self.next_kill: tuple[int, int] | None = None
        self.rate: float | None = None  # bytes/s for connections accepted from now on; None: as fast as it goes
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="tap-accept").start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = TapStream(kill=self.next_kill, rate=self.rate)
            self.next_kill = None
            self.streams.append(stream)
            for name, src, dst, feed, rate in (("up", down, up, stream.feed_up, None),
                                               ("down", up, down, self._down(stream), stream.rate)):
                t = threading.Thread(target=self._pump, args=(src, dst, feed, rate), daemon=True, name=f"tap-{name}")
                stream.threads.append(t)
                t.start()

    @staticmethod
    def _down(stream: TapStream) -> Callable[[bytes], None]:
        def feed(data: bytes) -> None:
            stream.feed_down(data)
            if stream.kill is not None and stream.bytes_down >= stream.kill[1]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stream.kill[0], signal.SIGKILL)
                stream.killed_at, stream.kill = stream.bytes_down, None
                stream.publishes_at_kill, stream.partial_at_kill = Counter(stream.publishes), stream.partial_bytes

        return feed

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, feed: Callable[[bytes], None], rate: float | None) -> None:
        free_at = time.perf_counter()  # paced: when the "link" is done sending what went before
        try:
            while data := src.recv(256 * 1024 if rate is None else 16 * 1024):
                if rate is not None:  # no credit for idle time: a link does not send faster after a pause
                    now = time.perf_counter()
                    if free_at > now:
                        time.sleep(free_at - now)
                    free_at = max(free_at, now) + len(data) / rate
                dst.sendall(data)
                feed(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self.listener.close()


# --------------------------------------------------------------------------------------------- delayed link


def delay_proxy(upstream_port: int, one_way_s: float) -> int:
    """Forward 127.0.0.1:<free port> to the broker, holding every byte `one_way_s` in each direction (a link with a
    round trip of 2 x one_way_s and no bandwidth limit). Runs in its own process (`--delay-proxy`), so its threads
    do not share the measured agent's GIL; prints its port, then serves until killed."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)

    def reader(src: socket.socket, line: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(256 * 1024):
                line.put((time.monotonic() + one_way_s, data))
        line.put((time.monotonic() + one_way_s, b""))

    def writer(dst: socket.socket, line: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = line.get()
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                if not data:
                    break
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    while True:
        down, _ = listener.accept()
        up = socket.create_connection(("127.0.0.1", upstream_port))
        for sock in (down, up):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for src, dst in ((down, up), (up, down)):
            line: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
            threading.Thread(target=reader, args=(src, line), daemon=True).start()
            threading.Thread(target=writer, args=(dst, line), daemon=True).start()


@contextlib.contextmanager
def delayed_link(upstream_port: int, rtt_s: float) -> Iterator[str]:
    """A `delay_proxy` subprocess; yields its mqtt:// URL."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--delay-proxy",
                             f"{upstream_port}:{rtt_s / 2}"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------------------- HTTP mirror


class MirrorServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(MirrorHandler, directory=str(root)))
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []  # path, range, status, header and body bytes sent
        self.cut: tuple[str, int] | None = None  # (path suffix, body bytes): drop the next such response there

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def take_cut(self, path: str) -> int | None:
        with self.lock:
            if self.cut is not None and path.endswith(self.cut[0]):
                n, self.cut = self.cut[1], None
                return n
        return None

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(entry)

    def drain(self) -> list[dict[str, Any]]:
        with self.lock:
            out, self.requests = self.requests, []
        return out


class MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, HTTP/1.1 keep-alive, `Range: bytes=N-`, bodies by sendfile (as a real static server would)."""

    protocol_version = "HTTP/1.1"
    server: MirrorServer
    _header_bytes = 0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def flush_headers(self) -> None:
        self._header_bytes += sum(len(b) for b in getattr(self, "_headers_buffer", []))
        super().flush_headers()

    def do_GET(self) -> None:
        self._header_bytes = 0
        path = Path(self.translate_path(self.path))
        rng = self.headers.get("Range")
        entry: dict[str, Any] = {"path": self.path, "range": rng, "status": 404, "body_bytes": 0}
        try:
            if not path.is_file():
                self.send_error(404)
                return
            size = path.stat().st_size
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip()) if rng else None
            if m:
                start = int(m.group(1))
                if start >= size:
                    entry["status"] = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                entry["status"] = 206
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                entry["status"] = 200
                self.send_response(200)
            length = size - start
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            cut = self.server.take_cut(self.path)
            with path.open("rb") as f:
                if cut is not None:
                    f.seek(start)
                    self.wfile.write(f.read(min(cut, length)))
                    entry["body_bytes"] = min(cut, length)
                    entry["cut"] = True
                    self.close_connection = True
                else:
                    entry["body_bytes"] = self.connection.sendfile(f, start, length)
        finally:
            entry["header_bytes"] = self._header_bytes
            self.server.record(entry)


@contextlib.contextmanager
def serve_mirror(root: Path) -> Iterator[MirrorServer]:
    server = MirrorServer(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="mirror")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------- measurements


@dataclass
class Setup:
    work: Path
    repo: Path
    bundle: Path
    bundle_bytes: int
    sha256: str
    chunks: int
    broker: Mosquitto | Broker
    mirror_dir: Path
    topics: Topics
    chunk_hashes: list[str] = field(default_factory=list)


def measure_publish(s: Setup) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with MqttClient(s.broker.url, "bench-packager", prefix=s.topics) as pub:
        pub.connect(timeout=10)
        for label in ("first", "rerun"):
            t0 = time.perf_counter()
            r = publish(s.repo, s.bundle, GROUP, pub, s.topics, None)
            seconds = time.perf_counter() - t0
            st = r.stats
            assert st is not None
            out[label] = {
                "seconds": round(seconds, 4), "push_seconds": round(st.seconds, 4),
                "mbps": _mbps(s.bundle_bytes, seconds), "push_mbps": _mbps(s.bundle_bytes, st.seconds),
                "chunks_published": st.chunks_published, "chunks_skipped": st.chunks_skipped,
                "bytes_published": st.bytes_published, "bytes_read_back": st.bytes_read_back,
                "metadata_published": st.metadata_published, "added": list(r.added),
            }
            log.info("publish (%s): %.2f s (push %.2f s), %d chunks published, %d skipped", label, seconds,
                     st.seconds, st.chunks_published, st.chunks_skipped)
    t0 = time.perf_counter()
    r = publish(s.repo, s.bundle, GROUP, None, s.topics, s.mirror_dir)
    seconds = time.perf_counter() - t0
    out["http_tree"] = {"seconds": round(seconds, 4), "mbps": _mbps(s.bundle_bytes, seconds),
                        "files_written": r.http_files}
    log.info("publish (HTTP mirror tree): %.2f s, %d files", seconds, r.http_files)
    return out


def mqtt_round(s: Setup, state: Path, window: int | None, tag: str, url: str | None = None) -> dict[str, Any]:
    url = url or s.broker.url
    cfg = config(device_config(state, url, s.repo / "root.json"))
    client = TimedMqttClient(url, f"bench-device-{tag}", prefix=Topics(cfg.topic_prefix), receive_window=window)
    with client:
        t0 = time.perf_counter()
        client.connect(timeout=cfg.mqtt.connect_timeout_s)
        connect_s = time.perf_counter() - t0
        fetcher = MqttFetcher(client, state / "chunks", timeout=cfg.limits.chunk_timeout_s)
        payload0, tcp0 = client.bytes_received, tcp_bytes_received(client)
        client.retained_seconds = 0.0
        t0 = time.perf_counter()
        result = fetch_with(cfg, fetcher, "mqtt")
        seconds = time.perf_counter() - t0
        payload, tcp1 = client.bytes_received - payload0, tcp_bytes_received(client)
        waiting = client.retained_seconds
    assert result.sha256 == s.sha256
    tcp = tcp1 - tcp0 if tcp0 is not None and tcp1 is not None else None
    return {
        "seconds": round(seconds, 4), "connect_seconds": round(connect_s, 4), "mbps": _mbps(s.bundle_bytes, seconds),
        "broker_wait_seconds": round(waiting, 4), "own_work_seconds": round(seconds - waiting, 4),
        "payload_bytes": payload, "fetcher_bytes": fetcher.bytes_received, "tcp_bytes": tcp,
        "wire_ratio": payload / s.bundle_bytes, "tcp_ratio": tcp / s.bundle_bytes if tcp is not None else None,
        "chunks_stored": fetcher.chunks_stored,
    }


def broker_column(s: Setup, kinds: Sequence[str]) -> list[dict[str, Any]]:
    """Each broker kind once, side by side: a fresh broker, the bundle published to it, the device path fetching it
    with the agent's default receive window (`mqtt_round`)."""
    out: list[dict[str, Any]] = []
    for kind in kinds:
        log.info("broker %s: start, publish %.1f MB, fetch", kind, s.bundle_bytes / MB)
        t0 = time.perf_counter()
        broker = launch_broker(kind, s.work / f"broker-{kind}")
        boot_s = time.perf_counter() - t0
        try:
            with MqttClient(broker.url, "bench-packager", prefix=s.topics) as pub_client:
                pub_client.connect(timeout=10)
                protocol = pub_client.protocol
                t0 = time.perf_counter()
                r = publish(s.repo, s.bundle, GROUP, pub_client, s.topics, None)
                pub_s = time.perf_counter() - t0
            st = r.stats
            assert st is not None
            if not s.sha256:
                s.sha256 = tuf_repo.referenced_targets(s.repo)[f"bundles/{BUNDLE_NAME}-1.bundle"].hashes["sha256"]
            device = mqtt_round(replace(s, broker=broker), s.work / f"state-{kind}", RECEIVE_WINDOW,
                                "broker-" + kind.replace(".", ""))  # client ids hold no '.'
        finally:
            broker.close()
        row = {"broker": kind, "protocol": protocol, "boot_seconds": round(boot_s, 2),
               "publish_seconds": round(pub_s, 4), "publish_mbps": _mbps(s.bundle_bytes, pub_s),
               "chunks_published": st.chunks_published, "metadata_published": st.metadata_published,
               "device": device}
        log.info("  %s (MQTT %s): publish %.1f MB/s, device %.1f MB/s, payload %.4fx, TCP %s", kind, protocol,
                 row["publish_mbps"], device["mbps"], device["wire_ratio"],
                 f"{device['tcp_ratio']:.4f}x" if device["tcp_ratio"] is not None else "n/a")
        out.append(row)
    return out


def broker_table(s: Setup, rows: list[dict[str, Any]]) -> str:
    lines = [f"== the same {s.bundle_bytes / MB:.1f} MB bundle on each broker, one run each (MB = 10^6 bytes)",
             "| broker | MQTT | publish MB/s | device MB/s | device s | payload / bundle | TCP / bundle |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["device"]
        tcp = f"{d['tcp_ratio']:.4f}x" if d["tcp_ratio"] is not None else "n/a"
        lines.append(f"| {r['broker']} | {r['protocol']} | {r['publish_mbps']:.1f} | {d['mbps']:.1f} | "
                     f"{d['seconds']:.2f} | {d['wire_ratio']:.4f}x | {tcp} |")
    return "\n".join(lines)


def http_round(s: Setup, server: MirrorServer, state: Path) -> dict[str, Any]:
    cfg = config(device_config(state, s.broker.url, s.repo / "root.json"))
    fetcher = HttpFetcher(state / "partial", base_url=server.base_url)
    server.drain()
    try:
        t0 = time.perf_counter()
        result = fetch_with(cfg, fetcher, "http")
        seconds = time.perf_counter() - t0
    finally:
        fetcher.session.close()
    assert result.sha256 == s.sha256
    reqs = server.drain()
    body = sum(r["body_bytes"] for r in reqs)
    headers = sum(r["header_bytes"] for r in reqs)
    return {
        "seconds": round(seconds, 4), "mbps": _mbps(s.bundle_bytes, seconds),
        "body_bytes": fetcher.bytes_received, "server_body_bytes": body, "server_header_bytes": headers,
        "requests": len(reqs), "wire_ratio": fetcher.bytes_received / s.bundle_bytes,
        "wire_ratio_with_headers": (body + headers) / s.bundle_bytes,
    }


def ceiling_round(s: Setup, batch: int, tag: str) -> dict[str, Any]:
    names = s.topics.chunks(s.sha256, range(s.chunks))
    with MqttClient(s.broker.url, f"bench-raw-{tag}", prefix=s.topics) as client:
        client.connect(timeout=10)
        t0 = time.perf_counter()
        got = 0
        for i in range(0, len(names), batch):
            got += client.fetch_retained(names[i : i + batch], 30).bytes_received
        seconds = time.perf_counter() - t0
    assert got == s.bundle_bytes, (got, s.bundle_bytes)
    return {"seconds": round(seconds, 4), "mbps": _mbps(got, seconds), "bytes": got}


def run_rounds(s: Setup, server: MirrorServer, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Interleaved: every round runs each path once, the order rotated, so load from other tenants hits all alike."""
    shm = tmpfs_dir()
    kinds = ["mqtt", "http", "mqtt_no_window", *(["mqtt_tmpfs"] if shm else []),
             *(f"ceiling_batch{b}" for b in CEILING_BATCHES)]
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    out["chunk_store_ms"] = []
    (s.work / "rounds").mkdir(exist_ok=True)
    for i in range(rounds):
        order = kinds[i % len(kinds):] + kinds[: i % len(kinds)]
        # this disk's write cost swings with other tenants' fsyncs: record it beside every round
        out["chunk_store_ms"].append({"round": i + 1, "ms": round(chunk_store_ms(s.work / "rounds", s.chunks), 4)})
        for kind in order:
            state = s.work / "rounds" / f"{kind}-{i}"
            if kind == "mqtt":
                r = mqtt_round(s, state, RECEIVE_WINDOW, f"{i}")
            elif kind == "mqtt_tmpfs":  # diagnostic: the same path without this disk's file and fsync costs
                assert shm is not None
                state = Path(tempfile.mkdtemp(prefix="edgeship-transfer-", dir=shm))
                try:
                    r = mqtt_round(s, state / "state", RECEIVE_WINDOW, f"{i}-tmpfs")
                finally:
                    shutil.rmtree(state, ignore_errors=True)
            elif kind == "http":
                r = http_round(s, server, state)
            elif kind == "mqtt_no_window":
                r = mqtt_round(s, state, None, f"{i}-no-window")
            else:
                batch = int(kind.removeprefix("ceiling_batch"))
                r = ceiling_round(s, batch, f"{i}-{batch}")
            out[kind].append(r)
            log.info("round %d %-16s %7.1f MB/s  %.3f s%s", i + 1, kind, r["mbps"], r["seconds"],
                     f"  wire {r['wire_ratio']:.4f}x" if "wire_ratio" in r else "")
            shutil.rmtree(state, ignore_errors=True)
    return out


def latency_trials(s: Setup, rtt_s: float, windows: Sequence[int]) -> list[dict[str, Any]]:
    """The device path over a link with a round trip of `rtt_s`, once per receive window: what the window costs
    where the round trip, not the agent, is the bottleneck."""
    out = []
    with delayed_link(s.broker.port, rtt_s) as url:
        for window in windows:
            state = s.work / "latency" / f"w{window}"
            r = mqtt_round(s, state, window, f"rtt-w{window}", url)
            shutil.rmtree(state, ignore_errors=True)
            r.update(rtt_ms=rtt_s * 1e3, window=window,
                     window_ceiling_mbps=window * CHUNK_SIZE / rtt_s / MB)  # window x chunk per round trip
            out.append(r)
            log.info("latency: RTT %.0f ms, window %d: %.1f MB/s (window ceiling %.1f)", rtt_s * 1e3, window,
                     r["mbps"], r["window_ceiling_mbps"])
    return out


def window_arrivals(s: Setup, rtt_s: float, windows: Sequence[int], n: int = 16) -> list[dict[str, Any]]:
    """Does the broker keep to the receive window? Read `n` chunk topics through a link with round trip `rtt_s`,
    acknowledging each chunk when the next is asked for, and record when each arrived (ms after the subscribe):
    a broker that honours Receive Maximum W delivers W chunks per round trip."""
    names = s.topics.chunks(s.sha256, range(min(n, s.chunks)))
    out = []
    with delayed_link(s.broker.port, rtt_s) as url:
        for window in windows:
            with MqttClient(url, f"bench-arrivals-w{window}", prefix=s.topics, receive_window=window) as client:
                client.connect(timeout=10)
                t0 = time.perf_counter()
                with client.start_retained(names, 30) as read:
                    arrivals = [round((time.perf_counter() - t0) * 1e3) for _ in read]
            round_trips = Counter(round(ms / (rtt_s * 1e3)) for ms in arrivals)
            out.append({"window": window, "rtt_ms": rtt_s * 1e3, "arrival_ms": arrivals,
                        "chunks_per_round_trip": [round_trips[k] for k in sorted(round_trips)]})
            log.info("window %d: chunks per %.0f ms round trip %s", window, rtt_s * 1e3,
                     out[-1]["chunks_per_round_trip"])
    return out


def component_costs(s: Setup) -> dict[str, float]:
    """Pieces of the device path's own work, timed alone on the same bundle (page cache warm)."""
    t0 = time.perf_counter()
    sha256_file(s.bundle)
    sha = time.perf_counter() - t0
    t0 = time.perf_counter()
    verify_bundle(s.bundle)
    verify = time.perf_counter() - t0
    stores = chunk_store_ms(s.work, s.chunks)
    return {"sha256_pass_seconds": round(sha, 4), "verify_bundle_seconds": round(verify, 4),
            "chunk_store_ms": round(stores, 4), "chunk_stores_seconds": round(stores * s.chunks / 1e3, 4)}


def _chunk_counts(publishes: Counter[str], prefix: str) -> Counter[int]:
    out: Counter[int] = Counter()
    for topic, n in publishes.items():
        if topic.startswith(prefix) and topic[len(prefix):].isdigit():
            out[int(topic[len(prefix):])] += n
    return out


def mqtt_resume_trial(s: Setup, tap: WireTap, fraction: float, tag: str, rate: float | None = None) -> dict[str, Any]:
    """Kill the agent (a subprocess running `agent.fetch.fetch`) once `fraction` of the bundle's bytes went down to
    it, then finish with a new client and fetcher on the same state directory; count chunks delivered twice.
    `rate` (bytes/s) paces what goes down to the killed agent, like a link slower than the agent stores chunks; the
    resumed fetch is never paced."""
    state = s.work / "resume" / tag
    state.mkdir(parents=True)
    data = device_config(state, tap.url, s.repo / "root.json")
    cfg_file = state.parent / f"{tag}.json"
    cfg_file.write_text(json.dumps(data))
    cut_at = int(s.bundle_bytes * fraction)
    n_before = len(tap.streams)
    with (state.parent / f"{tag}.stderr").open("wb") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child-fetch", str(cfg_file)],
                                stdout=subprocess.DEVNULL, stderr=err)
        tap.next_kill, tap.rate = (proc.pid, cut_at), rate
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        finally:
            tap.next_kill, tap.rate = None, None
    if len(tap.streams) <= n_before:
        raise RuntimeError(f"the killed agent never connected (exit {rc}): "
                           f"{(state.parent / f'{tag}.stderr').read_text(errors='replace')[-2000:]}")
    first = tap.streams[n_before]
    first.join()
    plan = ChunkPlan.create(s.sha256, s.bundle_bytes, CHUNK_SIZE, s.chunk_hashes)
    stored_at_kill = _stored_chunks(state / "chunks" / f"{s.sha256}.partial", plan)

    cfg = config(data)
    with MqttClient(tap.url, f"bench-resume-{tag}", prefix=Topics(cfg.topic_prefix),
                    receive_window=RECEIVE_WINDOW) as client:
        client.connect(timeout=10)
        fetcher = MqttFetcher(client, state / "chunks", timeout=cfg.limits.chunk_timeout_s)
        t0 = time.perf_counter()
        result = fetch_with(cfg, fetcher, "mqtt")
        seconds = time.perf_counter() - t0
        client_payload = client.bytes_received
    second = tap.streams[-1]
    second.join()
    assert result.sha256 == s.sha256

    prefix = s.topics.prefix + f"targets/{s.sha256}/"
    c1 = _chunk_counts(first.publishes if first.publishes_at_kill is None else first.publishes_at_kill, prefix)
    c1_all, c2 = _chunk_counts(first.publishes, prefix), _chunk_counts(second.publishes, prefix)
    both = c1 + c2
    twice = sum(n - 1 for n in both.values())
    twice_all = sum(n - 1 for n in (c1_all + c2).values())
    bundle_payload_2 = sum(_chunk_len(s, i) * n for i, n in c2.items())
    shutil.rmtree(state, ignore_errors=True)
    return {
        "cut_fraction": fraction, "cut_at_bytes": cut_at, "killed": rc == -signal.SIGKILL, "exit_status": rc,
        "paced_mbps": rate / MB if rate is not None else None, "killed_after_bytes_down": first.killed_at,
        "first_run": {"tcp_bytes_down": first.bytes_down, "payload_bytes": first.payload_bytes,
                      # whole chunk PUBLISHes forwarded before the SIGKILL, and the bytes of the one under way then
                      "bundle_chunks_delivered": sum(c1.values()),
                      "partial_packet_bytes": first.partial_bytes if first.partial_at_kill is None
                      else first.partial_at_kill,
                      # forwarded after the SIGKILL into the socket of the dying process, before the kernel closed it
                      "bundle_chunks_forwarded_after_kill": sum(c1_all.values()) - sum(c1.values())},
        "chunks_stored_at_kill": stored_at_kill,
        "delivered_but_not_stored": len(set(c1)) - stored_at_kill,
        "resume": {"seconds": round(seconds, 4), "tcp_bytes_down": second.bytes_down,
                   "payload_bytes": second.payload_bytes, "client_payload_bytes": client_payload,
                   "bundle_chunks_delivered": sum(c2.values()), "chunks_stored": fetcher.chunks_stored,
                   # metadata re-read on resume plus the 32-byte barrier token of every batch read
                   "non_chunk_payload_bytes": second.payload_bytes - bundle_payload_2},
        "chunks_delivered_twice": twice,
        "chunks_delivered_twice_indices": sorted(i for i, n in both.items() if n > 1),
        "chunks_sent_twice_incl_after_kill": twice_all,
        "total_payload_ratio": (first.payload_bytes + second.payload_bytes) / s.bundle_bytes,
    }


def _chunk_len(s: Setup, index: int) -> int:
    return min(CHUNK_SIZE, s.bundle_bytes - index * CHUNK_SIZE)


def http_resume_trial(s: Setup, server: MirrorServer, fraction: float) -> dict[str, Any]:
    """Cut the bundle's response after `fraction` of its bytes, then fetch again with a new HttpFetcher on the same
    state directory (Range request from the last verified chunk)."""
    state = s.work / "resume" / "http"
    cfg = config(device_config(state, s.broker.url, s.repo / "root.json"))
    cut_at = int(s.bundle_bytes * fraction)
    server.drain()
    server.cut = (".bundle", cut_at)
    first = HttpFetcher(state / "partial", base_url=server.base_url)
    error = None
    try:
        fetch_with(cfg, first, "http")
    except EdgeshipError as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        first.session.close()
        server.cut = None
    partial = state / "partial" / f"{s.sha256}.partial"
    kept = partial.stat().st_size if partial.exists() else 0
    r1 = server.drain()
    second = HttpFetcher(state / "partial", base_url=server.base_url)
    try:
        t0 = time.perf_counter()
        result = fetch_with(cfg, second, "http")
        seconds = time.perf_counter() - t0
    finally:
        second.session.close()
    assert result.sha256 == s.sha256
    r2 = server.drain()
    sent = sum(r["body_bytes"] for r in r1 + r2 if r["path"].endswith(".bundle"))
    shutil.rmtree(state, ignore_errors=True)
    return {
        "cut_fraction": fraction, "cut_at_bytes": cut_at, "first_error": error, "kept_verified_bytes": kept,
        "resume_range": next((r["range"] for r in r2 if r["path"].endswith(".bundle")), None),
        "resume_seconds": round(seconds, 4), "bundle_body_bytes_sent": sent,
        "bytes_sent_twice": sent - s.bundle_bytes, "chunks_sent_twice": (sent - s.bundle_bytes) / CHUNK_SIZE,
        "first_run_bytes_received": first.bytes_received, "resume_bytes_received": second.bytes_received,
    }


# --------------------------------------------------------------------------------------------- report


def _row(label: str, mbps: Sequence[float], secs: Sequence[float], ratio: str, note: str = "") -> str:
    sp = _spread(mbps)
    rate = f"{sp['median']:6.1f} ({sp['min']:.0f}–{sp['max']:.0f})"
    return f"| {label:<48} | {rate:<17} | {statistics.median(secs):6.3f} | {ratio:>13} | {note}"


def table(s: Setup, pub: dict[str, Any], rounds: dict[str, list[dict[str, Any]]], resume: list[dict[str, Any]],
          http_resume: dict[str, Any], components: dict[str, float]) -> str:
    lines = [f"== signed transfer of a {s.bundle_bytes / MB:.1f} MB bundle ({s.chunks} chunks of "
             f"{CHUNK_SIZE // 1024} KiB) on 127.0.0.1; MB = 10^6 bytes; median (min–max) of {len(rounds['mqtt'])} "
             "rounds",
             f"| {'path':<48} | {'MB/s':<17} | s      | wire / bundle | notes",
             f"|{'-' * 50}|{'-' * 19}|--------|---------------|------"]
    first, rerun, tree = pub["first"], pub["rerun"], pub["http_tree"]
    lines.append(f"| {'publish to broker (sign + push)':<48} | {first['mbps']:6.1f}{'':11} | "
                 f"{first['seconds']:6.3f} | {'':>13} | push alone {first['push_mbps']:.0f} MB/s, "
                 f"{first['chunks_published']} chunks + {first['metadata_published']} metadata")
    lines.append(f"| {'publish again (idempotent: read back only)':<48} | {rerun['mbps']:6.1f}{'':11} | "
                 f"{rerun['seconds']:6.3f} | {'':>13} | {rerun['chunks_published']} published, "
                 f"{rerun['chunks_skipped']} skipped")
    lines.append(f"| {'publish HTTP mirror tree (http_dir)':<48} | {tree['mbps']:6.1f}{'':11} | "
                 f"{tree['seconds']:6.3f} | {'':>13} | {tree['files_written']} files")
    for kind, label in (("mqtt", f"device over MQTT (fetch_with, window {RECEIVE_WINDOW})"),
                        ("mqtt_no_window", "device over MQTT, no receive window"),
                        ("mqtt_tmpfs", f"diagnostic: window {RECEIVE_WINDOW}, state dir on tmpfs")):
        rs = rounds.get(kind)
        if not rs:
            continue
        tcp = [r["tcp_ratio"] for r in rs if r["tcp_ratio"] is not None]
        lines.append(_row(label, [r["mbps"] for r in rs], [r["seconds"] for r in rs],
                          f"{max(r['wire_ratio'] for r in rs):.4f}x",
                          (f"TCP {max(tcp):.4f}x; " if tcp else "")
                          + f"waiting on broker {statistics.median(r['broker_wait_seconds'] for r in rs):.3f} s"))
    rs = rounds["http"]
    lines.append(_row("device over HTTP mirror (fetch_with)", [r["mbps"] for r in rs], [r["seconds"] for r in rs],
                      f"{max(r['wire_ratio'] for r in rs):.4f}x",
                      f"with headers {max(r['wire_ratio_with_headers'] for r in rs):.4f}x, "
                      f"{rs[0]['requests']} requests"))
    for b in CEILING_BATCHES:
        rs = rounds[f"ceiling_batch{b}"]
        lines.append(_row(f"ceiling: fetch_retained, batches of {b}", [r["mbps"] for r in rs],
                          [r["seconds"] for r in rs], "1.0000x", "no hashing, no disk"))
    stores = [r["ms"] for r in rounds["chunk_store_ms"]]
    lines.append(f"pieces of the device's own work, timed alone: one sha256 pass over the bundle "
                 f"{components['sha256_pass_seconds']:.3f} s, "
                 f"verify_bundle {components['verify_bundle_seconds']:.3f} s, "
                 f"storing a chunk (pwrite into the partial file) {min(stores):.3f}–{max(stores):.3f} ms "
                 f"({s.chunks} chunks: {min(stores) * s.chunks / 1e3:.2f}–{max(stores) * s.chunks / 1e3:.2f} s)")
    lines.append("")
    lines.append("== resume after a cut at ~50 % (chunks of 128 KiB)")
    lines.append("| cut at | killed after (bytes down) | sent to killed agent (+ after the kill) | stored at kill | "
                 "resume fetched | delivered twice (+ after the kill) | resume s (via proxy) |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in resume:
        paced = f" @{r['paced_mbps']:.0f} MB/s" if r.get("paced_mbps") else ""
        lines.append(f"| MQTT {r['cut_fraction'] * 100:.1f} %{paced} | {r['killed_after_bytes_down'] or 0:,} B | "
                     f"{r['first_run']['bundle_chunks_delivered']} + {r['first_run']['partial_packet_bytes']:,} B "
                     f"(+{r['first_run']['bundle_chunks_forwarded_after_kill']}) | {r['chunks_stored_at_kill']} | "
                     f"{r['resume']['bundle_chunks_delivered']} | **{r['chunks_delivered_twice']}** "
                     f"(+{r['chunks_sent_twice_incl_after_kill'] - r['chunks_delivered_twice']}) | "
                     f"{r['resume']['seconds']:.3f} |")
    h = http_resume
    lines.append(f"| HTTP {h['cut_fraction'] * 100:.1f} % | {h['cut_at_bytes']:,} B body | – | "
                 f"{h['kept_verified_bytes'] // CHUNK_SIZE} (kept, verified) | Range {h['resume_range']} | "
                 f"**{h['chunks_sent_twice']:.2f}** ({h['bytes_sent_twice']:,} B) | {h['resume_seconds']:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def _write_brokers_only(args: argparse.Namespace, argv: Sequence[str] | None, started: dt.datetime, t0: float,
                        machine: dict[str, Any], load_start: list[float], s: Setup,
                        columns: list[dict[str, Any]]) -> int:
    load_end = load_average()
    result = {
        "benchmark": "transfer_brokers", "created": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/transfer_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "duration_seconds": round(time.perf_counter() - t0, 1),
        "code": code_state(), "machine": machine, "load_average": {"start": load_start, "end": load_end},
        "settings": {"mb": args.mb, "chunk_size": CHUNK_SIZE, "fetch_receive_window": RECEIVE_WINDOW,
                     "units": "MB = 10^6 bytes", "fleet": FLEET, "group": GROUP,
                     "brokers": "examples/brokers.py defaults, each fresh, on 127.0.0.1"},
        "bundle": {"bytes": s.bundle_bytes, "member_mib": args.mb, "chunks": s.chunks},
        "brokers": columns,
    }
    write_json(args.out, result)
    print(broker_table(s, columns), flush=True)
    print(f"load average start {load_start}, end {load_end}; {result['duration_seconds']:.0f} s; wrote {args.out}")
    return 0


def child_fetch(cfg_file: Path) -> int:
    """The agent under test in the resume trial: `agent.fetch.fetch`, exactly as `edge-agent fetch` runs it."""
    cfg = config(json.loads(cfg_file.read_text()))
    result = fetch(cfg)
    print(json.dumps(result.to_json()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result file (default benchmarks/results/transfer.json)")
    parser.add_argument("--mb", type=int, default=DEFAULT_MB,
                        help=f"size of the bundle's random member in MiB (default {DEFAULT_MB})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"interleaved rounds per path, and MQTT resume trials (default {DEFAULT_ROUNDS})")
    parser.add_argument("--brokers", default=",".join(BROKER_KINDS),
                        help=f"comma-separated broker kinds for the broker column (default {','.join(BROKER_KINDS)}; "
                             "'none' to skip it)")
    parser.add_argument("--only-brokers", action="store_true",
                        help="only the setup and the broker column (default --out "
                             "benchmarks/results/transfer_brokers.json)")
    parser.add_argument("--child-fetch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--delay-proxy", help=argparse.SUPPRESS)  # UPSTREAM_PORT:ONE_WAY_SECONDS
    args = parser.parse_args(argv)
    if args.delay_proxy is not None:
        port, one_way = args.delay_proxy.split(":")
        return delay_proxy(int(port), float(one_way))
    if args.child_fetch is not None:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
        return child_fetch(args.child_fetch)
    if not 1 <= args.mb <= 1024 or args.rounds < 1:
        parser.error("--mb must be in 1..1024 and --rounds >= 1")
    kinds = [] if args.brokers == "none" else [k.strip() for k in args.brokers.split(",") if k.strip()]
    if any(k not in BROKER_KINDS for k in kinds) or (args.only_brokers and not kinds):
        parser.error(f"--brokers: a comma-separated list of {', '.join(BROKER_KINDS)} (or none without --only-brokers)")
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / ("transfer_brokers.json" if args.only_brokers else "transfer.json")

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    log.setLevel(logging.INFO)
    try:
        binary = find_mosquitto()
    except MosquittoMissing as e:
        print(f"transfer_bench: {e}", file=sys.stderr)
        return 1

    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    load_start = load_average()
    machine = machine_info(TRANSFER_FLAGS, TRANSFER_DISTS)
    machine["versions"]["mosquitto"] = mosquitto_version(binary)
    machine["versions"].update({k: v for k, v in broker_versions().items() if k != "mosquitto"})
    log.info("machine: %s, %s cores, %s; load average %s", machine["cpu"], machine["cores"],
             ", ".join(machine["isa_flags"]), load_start)

    with tempfile.TemporaryDirectory(prefix="edgeship-transfer-") as td:
        work = Path(td)
        machine["work_filesystem"] = filesystem_of(work)
        shm = tmpfs_dir()
        machine["tmpfs"] = str(shm) if shm else None
        log.info("setup: TUF repository and a %d MiB bundle in %s (%s)", args.mb, work, machine["work_filesystem"])
        setup_t0 = time.perf_counter()
        repo = work / "repo"
        tuf_repo.init_repo(repo)
        bundle = make_bundle(work, args.mb)
        setup_s = time.perf_counter() - setup_t0
        (work / "broker").mkdir()
        broker = Mosquitto(work / "broker")
        if args.only_brokers:
            s = Setup(work, repo, bundle, bundle.stat().st_size, "", -(-bundle.stat().st_size // CHUNK_SIZE),
                      broker, work / "mirror", topics_for(FLEET))
            try:
                columns = broker_column(s, kinds)
            except BrokerMissing as e:
                print(f"transfer_bench: {e}", file=sys.stderr)
                return 1
            return _write_brokers_only(args, argv, started, t0, machine, load_start, s, columns)
        broker.start()
        tap: WireTap | None = None
        try:
            s = Setup(work, repo, bundle, bundle.stat().st_size, "", -(-bundle.stat().st_size // CHUNK_SIZE),
                      broker, work / "mirror", topics_for(FLEET))
            pub = measure_publish(s)
            s.sha256 = tuf_repo.referenced_targets(repo)[f"bundles/{BUNDLE_NAME}-1.bundle"].hashes["sha256"]
            s.chunk_hashes = chunk_hashes(bundle.read_bytes(), CHUNK_SIZE)
            components = component_costs(s)
            log.info("components: one sha256 pass %.3f s, verify_bundle %.3f s, %d chunks stored %.3f s",
                     components["sha256_pass_seconds"], components["verify_bundle_seconds"], s.chunks,
                     components["chunk_stores_seconds"])
            with serve_mirror(s.mirror_dir) as server:
                rounds = run_rounds(s, server, args.rounds)
                log.info("resume: HTTP mirror, response cut at 50 percent")
                http_resume = http_resume_trial(s, server, 0.5)
            latency = latency_trials(s, LATENCY_RTT_S, LATENCY_WINDOWS)
            arrivals = window_arrivals(s, ARRIVALS_RTT_S, ARRIVALS_WINDOWS)
            tap = WireTap(broker.port)
            resume: list[dict[str, Any]] = []
            resume_paced: list[dict[str, Any]] = []
            batch_fraction = DEFAULT_BATCH * CHUNK_SIZE / s.bundle_bytes
            for rate, trials in ((None, resume), (PACED_MBPS * MB, resume_paced)):
                for i in range(args.rounds):
                    fraction = 0.5 + batch_fraction * i / args.rounds  # cut at different points within a batch
                    log.info("resume: MQTT, agent SIGKILLed at %.1f %% of the bundle's bytes%s", fraction * 100,
                             f", link paced to {rate / MB:.0f} MB/s" if rate else "")
                    r = mqtt_resume_trial(s, tap, fraction, f"mqtt-{i}" + ("-paced" if rate else ""), rate)
                    log.info("  delivered %d chunks to the killed agent, %d stored; resume fetched %d; delivered "
                             "twice: %d", r["first_run"]["bundle_chunks_delivered"], r["chunks_stored_at_kill"],
                             r["resume"]["bundle_chunks_delivered"], r["chunks_delivered_twice"])
                    trials.append(r)
            broker_log_tail = broker.log().splitlines()[-5:]
        finally:
            if tap is not None:
                tap.close()
            broker.stop()
        try:
            columns = broker_column(s, kinds)
        except BrokerMissing as e:
            print(f"transfer_bench: {e}", file=sys.stderr)
            return 1

    mqtt = rounds["mqtt"]
    mqtt_mbps = _spread([r["mbps"] for r in mqtt])
    wire = max(r["wire_ratio"] for r in mqtt)
    twice = max(r["chunks_delivered_twice"] for r in resume)
    mid = min(mqtt, key=lambda r: abs(r["mbps"] - mqtt_mbps["median"]))
    ceiling = statistics.median(r["mbps"] for r in rounds[f"ceiling_batch{DEFAULT_BATCH}"])
    stores = statistics.median(r["ms"] for r in rounds["chunk_store_ms"])
    no_window = statistics.median(r["mbps"] for r in rounds["mqtt_no_window"])
    cut = max(resume, key=lambda r: r["chunks_delivered_twice"])
    twice_paced = max(r["chunks_delivered_twice"] for r in resume_paced)
    targets = [
        Target("mqtt_device_mbps", "device path over MQTT (TUF refresh + deployment + bundle + verify), median",
               mqtt_mbps["median"], MBPS_MIN, ">=", "MB/s",
               f"of {mid['seconds']:.2f} s, {mid['broker_wait_seconds']:.2f} s blocked waiting on the broker (raw "
               f"ceiling {ceiling:.0f} MB/s; receive window {RECEIVE_WINDOW}, without it {no_window:.0f} MB/s) "
               f"and {mid['own_work_seconds']:.2f} s the agent's own work: sha256 and a pwrite per chunk "
               f"({stores:.3f} ms each here), TUF's spooled copy, hash and fsynced copy of the whole file, "
               "verify_bundle's hash"),
        Target("mqtt_wire_ratio", "MQTT payload bytes received / bundle bytes, worst round", wire, WIRE_RATIO_MAX,
               "<=", "x"),
        Target("mqtt_resume_refetch", "chunks delivered twice after a SIGKILL at ~50 %, worst trial", twice,
               RESUME_REFETCH_MAX, "<=", "chunks",
               f"the killed agent had been sent {cut['first_run']['bundle_chunks_delivered']} chunks and had stored "
               f"{cut['chunks_stored_at_kill']}; with a receive window of {RECEIVE_WINDOW} the broker sends a "
               "chunk only once the agent acknowledged the one before as stored; with the link paced to "
               f"{PACED_MBPS:.0f} MB/s the worst trial had {twice_paced}"),
    ]
    load_end = load_average()
    result = {
        "benchmark": "transfer", "created": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/transfer_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "duration_seconds": round(time.perf_counter() - t0, 1),
        "code": code_state(), "machine": machine, "load_average": {"start": load_start, "end": load_end},
        "settings": {"mb": args.mb, "rounds": args.rounds, "chunk_size": CHUNK_SIZE, "fetcher_batch": DEFAULT_BATCH,
                     "fetcher_pipeline": DEFAULT_PIPELINE, "fetch_receive_window": RECEIVE_WINDOW,
                     "paced_resume_mbps": PACED_MBPS,
                     "ceiling_batches": list(CEILING_BATCHES), "units": "MB = 10^6 bytes",
                     "broker": "mosquitto on 127.0.0.1, default limits, no persistence", "fleet": FLEET,
                     "group": GROUP},
        "targets": [t.to_json() for t in targets],
        "bundle": {"bytes": s.bundle_bytes, "member_mib": args.mb, "chunks": s.chunks, "sha256": s.sha256,
                   "setup_seconds": round(setup_s, 3)},
        "publish": pub,
        "components": components,
        "device": {k: {"summary": _spread([r["mbps"] for r in v]), "rounds": v} for k, v in rounds.items()
                   if k != "chunk_store_ms"},
        "chunk_store_ms_per_round": rounds["chunk_store_ms"],
        "resume": {"mqtt": resume, "mqtt_paced": resume_paced, "http": http_resume},
        "latency": latency,
        "window_arrivals": arrivals,
        "broker_log_tail": broker_log_tail,
        "brokers": columns,
    }
    write_json(args.out, result)
    print(table(s, pub, rounds, resume + resume_paced, http_resume, components) + "\n", flush=True)
    if columns:
        print(broker_table(s, columns) + "\n", flush=True)
    print(f"== device over MQTT through a link with a {LATENCY_RTT_S * 1e3:.0f} ms round trip (a delaying proxy)")
    print("| receive window | MB/s | window ceiling (window x 128 KiB / RTT) |")
    print("|---|---|---|")
    for r in latency:
        print(f"| {r['window']} | {r['mbps']:.1f} | {r['window_ceiling_mbps']:.1f} |")
    print(f"\n== does the broker keep to the window? {len(arrivals[0]['arrival_ms'])} chunks through a "
          f"{ARRIVALS_RTT_S * 1e3:.0f} ms round trip, each acknowledged when the next is asked for")
    print("| receive window | chunks arrived in each round trip |")
    print("|---|---|")
    for a in arrivals:
        print(f"| {a['window']} | {', '.join(map(str, a['chunks_per_round_trip']))} |")
    print(flush=True)
    print("== targets")
    for t in targets:
        print(t.line())
    missed = [t.id for t in targets if not t.passed]
    print(f"{len(targets) - len(missed)}/{len(targets)} targets met"
          + (f"; MISSED: {', '.join(missed)}" if missed else ""))
    print(f"load average start {load_start}, end {load_end}; {result['duration_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
