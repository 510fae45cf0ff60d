"""TUF-over-MQTT transport against a real mosquitto, and the HTTP mirror fetcher against a local HTTP server."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadError, DownloadHTTPError, DownloadLengthMismatchError

from agent.errors import BundleRejected, TransportError
from agent.transport.mqtt import Message, MqttClient
from agent.transport.topics import Topics
from agent.trust.chunks import chunk_hashes
from agent.trust.http_fetcher import HttpFetcher
from agent.trust.mqtt_fetcher import FetchError, MqttFetcher
from packager.mqtt_publish import (
    TargetSpec,
    delete_targets,
    publish_tree,
    write_http_tree,
)
from tests.conftest import Mosquitto

CHUNK = 128 * 1024
LENGTH = 1_000_000  # 7 full chunks and a short last one
NAME = "digits-3.bundle"


# ---- fixtures


@pytest.fixture
def topics() -> Topics:
    return Topics(f"edgeship/t{uuid.uuid4().hex[:10]}/")  # each test its own fleet on the shared broker


@pytest.fixture
def connect() -> Iterator[Callable[..., MqttClient]]:
    clients: list[MqttClient] = []

    def make(broker: Mosquitto, topics: Topics, name: str = "c", **kwargs: object) -> MqttClient:
        client = MqttClient(broker.url, f"{name}-{uuid.uuid4().hex[:8]}", prefix=topics, **kwargs)  # type: ignore[arg-type]
        clients.append(client.connect(timeout=5))
        return client

    yield make
    for c in clients:
        c.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> TargetSpec:
    data = os.urandom(LENGTH)
    path = tmp_path_factory.mktemp("target") / NAME
    path.write_bytes(data)
    return TargetSpec(hashlib.sha256(data).hexdigest(), path, CHUNK, chunk_hashes(data, CHUNK), f"bundles/{NAME}")


@pytest.fixture(scope="module")
def metadata() -> dict[str, bytes]:
    names = ["timestamp.json", "1.snapshot.json", "2.root.json", "1.targets.json", "1.root.json"]
    return {n: f'{{"signed": "{n}"}}'.encode() + os.urandom(300) for n in names}


def target_url(t: TargetSpec) -> str:
    return f"mqtt:///targets/bundles/{t.sha256}.{NAME}"


def fetcher_for(client: MqttClient, chunk_dir: Path, t: TargetSpec, **kwargs: object) -> MqttFetcher:
    fetcher = MqttFetcher(client, chunk_dir, timeout=5, **kwargs)  # type: ignore[arg-type]
    fetcher.expect(t.sha256, LENGTH, CHUNK, t.chunk_hashes)
    return fetcher


def chunk_bytes(t: TargetSpec, i: int) -> bytes:
    return t.path.read_bytes()[i * CHUNK : (i + 1) * CHUNK]


# ---- client


def test_connect_failure_is_one_transport_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: refused
        with pytest.raises(TransportError, match="cannot connect"):
            MqttClient(f"mqtt://127.0.0.1:{port}", "nobody").connect(timeout=2)


def test_stream_and_delete(mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient]) -> None:
    a, b = connect(mosquitto, topics, "a"), connect(mosquitto, topics, "b")
    a.publish(topics.notify, b"7")
    with b.subscribe_stream([topics.prefix + "#"]) as sub:
        assert sub.get(timeout=5) == Message(topics.notify, b"7", retain=True)
        a.publish(topics.notify, b"8")
        assert sub.get(timeout=5) == Message(topics.notify, b"8", retain=False)
    a.delete_retained(topics.notify)
    assert b.get_retained([topics.notify], timeout=5) == {}


def test_falls_back_to_mqtt_311(mosquitto: Mosquitto, topics: Topics) -> None:
    """A proxy that refuses MQTT 5 CONNECTs like a 3.1.1-only broker (CONNACK code 1) and passes the rest on."""
    with _V311OnlyProxy(mosquitto.port) as proxy:
        client = MqttClient(f"mqtt://127.0.0.1:{proxy.port}", "old-broker", prefix=topics).connect(timeout=5)
        try:
            assert client.protocol == "3.1.1" and proxy.refused == 1
            client.publish(topics.tuf("1.root.json"), b"r1")
            assert client.get_retained([topics.tuf("1.root.json"), topics.tuf("2.root.json")], timeout=5) == {
                topics.tuf("1.root.json"): b"r1"
            }
        finally:
            client.close()


# ---- publish + fetch


@pytest.mark.parametrize("window", [None, 1, 4])
def test_publish_and_fetch(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], target: TargetSpec,
    metadata: dict[str, bytes], tmp_path: Path, window: int | None,
) -> None:
    publisher = connect(mosquitto, topics, "pub")
    seen: list[tuple[str, int, int]] = []
    stats = publish_tree(publisher, topics, metadata, [target], lambda *p: seen.append(p), notify_version=1)
    assert (stats.chunks_published, stats.chunks_skipped, stats.bytes_published) == (8, 0, LENGTH)
    assert stats.metadata_published == 6 and seen[-1] == ("metadata", 6, 6)  # and tuf/root/latest
    assert publisher.get_retained([topics.root_latest]) == {topics.root_latest: metadata["2.root.json"]}

    device = connect(mosquitto, topics, "dev", receive_window=window)
    fetcher = fetcher_for(device, tmp_path / "chunks", target)
    for name, blob in metadata.items():
        assert fetcher.download_bytes(f"mqtt:///tuf/{name}", 10_000) == blob
    assert device.get_retained([topics.notify]) == {topics.notify: b"1"}

    started = time.perf_counter()
    with pytest.raises(DownloadHTTPError) as err:
        fetcher.download_bytes("mqtt:///tuf/3.root.json", 10_000)
    not_found = time.perf_counter() - started
    assert err.value.status_code == 404
    # without the barrier "not found" would mean waiting out the fetch timeout (10 s and more)
    assert not_found < 3.0, f"404 took {not_found:.3f}s: the barrier should answer at once"

    before = fetcher.bytes_received
    started = time.perf_counter()
    data = fetcher.download_bytes(target_url(target), LENGTH)
    elapsed = time.perf_counter() - started
    assert hashlib.sha256(data).hexdigest() == target.sha256
    assert fetcher.bytes_received - before == LENGTH and fetcher.chunks_stored == 8
    print(f"\nMQTT: 404 in {not_found * 1000:.1f} ms; {LENGTH} bytes in {elapsed * 1000:.1f} ms "
          f"({LENGTH / elapsed / 1e6:.0f} MB/s)")

    # Fetched again: everything comes from the partial file, nothing from the wire.
    before = fetcher.bytes_received
    assert fetcher.download_bytes(target_url(target), LENGTH) == data
    assert fetcher.bytes_received == before


def test_republish_is_idempotent_and_repairs_damaged_chunks(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], target: TargetSpec,
    metadata: dict[str, bytes],
) -> None:
    publisher = connect(mosquitto, topics, "pub")
    publish_tree(publisher, topics, metadata, [target])
    again = publish_tree(publisher, topics, metadata, [target])
    assert (again.chunks_published, again.chunks_skipped, again.metadata_published) == (0, 8, 0)
    assert again.bytes_skipped == LENGTH

    publisher.publish(topics.chunk(target.sha256, 3), b"X" * CHUNK)  # same size, wrong bytes
    publisher.publish(topics.chunk(target.sha256, 5), b"Y" * (CHUNK + 1))  # too big: dropped unread, replaced
    publisher.delete_retained(topics.chunk(target.sha256, 6))
    publisher.publish(topics.tuf("timestamp.json"), b"stale")
    repaired = publish_tree(publisher, topics, metadata, [target])
    assert (repaired.chunks_published, repaired.chunks_skipped, repaired.metadata_published) == (3, 5, 1)
    held = publisher.get_retained([topics.chunk(target.sha256, i) for i in (3, 5, 6)])
    assert held == {topics.chunk(target.sha256, i): chunk_bytes(target, i) for i in (3, 5, 6)}


def test_tampered_chunk_is_rejected_until_repaired(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], target: TargetSpec,
    metadata: dict[str, bytes], tmp_path: Path,
) -> None:
    publisher = connect(mosquitto, topics, "pub")
    publish_tree(publisher, topics, metadata, [target])
    evil = bytearray(chunk_bytes(target, 2))
    evil[100] ^= 0xFF
    publisher.publish(topics.chunk(target.sha256, 2), bytes(evil))

    fetcher = fetcher_for(connect(mosquitto, topics, "dev"), tmp_path, target)
    with pytest.raises(FetchError, match="chunk 2 does not match its signed hash") as err:
        fetcher.download_bytes(target_url(target), LENGTH)
    assert isinstance(err.value, DownloadError) and isinstance(err.value, TransportError)
    assert fetcher.stored_chunks(target.sha256) == [0, 1, 3, 4, 5, 6, 7]  # the good ones are kept
    assert not (tmp_path / target.sha256 / "2").exists()  # the bad one never touches the disk

    assert publish_tree(publisher, topics, metadata, [target]).chunks_published == 1
    before = fetcher.bytes_received
    data = fetcher.download_bytes(target_url(target), LENGTH)
    assert hashlib.sha256(data).hexdigest() == target.sha256
    assert fetcher.bytes_received - before == CHUNK  # only the repaired chunk came over the wire


def test_oversized_and_unplanned_data_is_refused(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], target: TargetSpec,
    metadata: dict[str, bytes], tmp_path: Path,
) -> None:
    publisher = connect(mosquitto, topics, "pub")
    publish_tree(publisher, topics, metadata, [target])
    device = connect(mosquitto, topics, "dev")

    unplanned = MqttFetcher(device, tmp_path / "a", timeout=5)
    with pytest.raises(DownloadError, match="no signed chunk plan"):
        unplanned.download_bytes(target_url(target), LENGTH)
    assert unplanned.bytes_received == 0
    with pytest.raises(BundleRejected):
        unplanned.expect(target.sha256, LENGTH + CHUNK, CHUNK, target.chunk_hashes)  # 9 chunks, 8 hashes
    with pytest.raises(BundleRejected):
        unplanned.expect(target.sha256, LENGTH, 4 * CHUNK, target.chunk_hashes)  # beyond the 128 KiB bound

    # A stream longer than the signed length: ngclient's bound stops it ...
    fetcher = fetcher_for(device, tmp_path / "b", target)
    with pytest.raises(DownloadLengthMismatchError):
        fetcher.download_bytes(target_url(target), LENGTH - 1)
    # ... and a chunk longer than the signed chunk size is dropped before it is buffered.
    publisher.publish(topics.chunk(target.sha256, 7), chunk_bytes(target, 7) + b"\0" * CHUNK)
    fetcher = fetcher_for(device, tmp_path / "c", target)
    with pytest.raises(FetchError, match=r"chunk 7 is \d+ bytes, more than the signed chunk size"):
        fetcher.download_bytes(target_url(target), LENGTH)
    assert not (tmp_path / "c" / target.sha256 / "7").exists()
    # A chunk that is gone from the broker fails as not there (yet): the barrier and the grace, not the timeout.
    publisher.delete_retained(topics.chunk(target.sha256, 7))
    with pytest.raises(FetchError, match="chunk 7 is missing") as err:
        fetcher.download_bytes(target_url(target), LENGTH)
    assert err.value.reason == "not_found"


def test_resume_after_agent_restart_fetches_only_missing_chunks(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], target: TargetSpec,
    metadata: dict[str, bytes], tmp_path: Path,
) -> None:
    publish_tree(connect(mosquitto, topics, "pub"), topics, metadata, [target])
    first = fetcher_for(connect(mosquitto, topics, "dev", receive_window=1), tmp_path, target, batch_size=2)
    stream = first.fetch(target_url(target))
    got = [next(stream) for _ in range(3)]  # the agent dies after 3 chunks, each stored before it was handed on
    stream.close()  # type: ignore[attr-defined]
    kept = first.stored_chunks(target.sha256)  # and maybe more: the network thread stores chunks as they arrive
    assert kept[:3] == [0, 1, 2] and kept == list(range(len(kept))) and len(kept) <= 4  # 2 batches of 2 asked for
    assert b"".join(got) == target.path.read_bytes()[: 3 * CHUNK]
    assert not first.client._routes  # the reads still open when the consumer stopped were closed with it

    # A new process: new connection, new fetcher, same partial file.
    second = fetcher_for(connect(mosquitto, topics, "dev2", receive_window=1), tmp_path, target, batch_size=2)
    data = second.download_bytes(target_url(target), LENGTH)
    assert hashlib.sha256(data).hexdigest() == target.sha256
    assert second.bytes_received == LENGTH - len(kept) * CHUNK

    # A stored chunk damaged on disk is noticed and fetched again (just that one).
    with open(second.partial_path(target.sha256), "r+b") as f:
        f.seek(1 * CHUNK)
        f.write(b"\0" * CHUNK)
    assert second.stored_chunks(target.sha256) == [0, 2, 3, 4, 5, 6, 7]
    before = second.bytes_received
    assert second.download_bytes(target_url(target), LENGTH) == data
    assert second.bytes_received - before == CHUNK


def test_pipelined_batches_stop_at_a_missing_chunk(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], target: TargetSpec,
    metadata: dict[str, bytes], tmp_path: Path,
) -> None:
    publisher = connect(mosquitto, topics, "pub")
    publish_tree(publisher, topics, metadata, [target])
    publisher.delete_retained(topics.chunk(target.sha256, 2))
    fetcher = fetcher_for(connect(mosquitto, topics, "dev"), tmp_path, target, batch_size=2, pipeline=2)
    with pytest.raises(FetchError, match="chunk 2 is missing on the broker") as err:
        fetcher.download_bytes(target_url(target), LENGTH)
    assert err.value.reason == "not_found"
    # [0, 1] and [2, 3] were subscribed at once, [4, 5] when [0, 1] was done; [2, 3]'s barrier then showed chunk 2
    # missing: the open batch [4, 5] was still finished and kept, [6, 7] never asked for.
    assert fetcher.stored_chunks(target.sha256) == [0, 1, 3, 4, 5]
    assert fetcher.bytes_received == 5 * CHUNK
    assert [p.name for p in tmp_path.iterdir()] == [f"{target.sha256}.partial"]  # one file, no temporary ones

    publish_tree(publisher, topics, metadata, [target])
    before = fetcher.bytes_received
    data = fetcher.download_bytes(target_url(target), LENGTH)
    assert hashlib.sha256(data).hexdigest() == target.sha256
    assert fetcher.bytes_received - before == LENGTH - 5 * CHUNK


def test_download_survives_broker_restart(
    mosquitto_factory: Callable[..., Mosquitto], topics: Topics, connect: Callable[..., MqttClient],
    target: TargetSpec, metadata: dict[str, bytes], tmp_path: Path,
) -> None:
    broker = mosquitto_factory(persistent=True)
    publisher = connect(broker, topics, "pub")
    publish_tree(publisher, topics, metadata, [target])
    publisher.close()

    fetcher = fetcher_for(connect(broker, topics, "dev", receive_window=1), tmp_path, target, batch_size=2)
    stream = fetcher.fetch(target_url(target))
    head = [next(stream), next(stream)]
    broker.restart()  # connection cut mid-download; retained messages survive (persistence)
    data = b"".join(head) + b"".join(stream)  # paho reconnects, the fetcher waits and goes on
    assert hashlib.sha256(data).hexdigest() == target.sha256
    # Every chunk came over the wire exactly once: those that arrived before the drop were stored (also the ones of
    # a batch whose barrier never came) and not asked for again. The bytes of reads the drop cut short count too,
    # so a chunk sent twice would show here, as would bytes lost from the count.
    assert fetcher.bytes_received == LENGTH
    assert fetcher.chunks_stored == 8
    assert "mosquitto version" in broker.log()


def test_delete_targets_clears_the_broker(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], target: TargetSpec,
    metadata: dict[str, bytes],
) -> None:
    publisher = connect(mosquitto, topics, "pub")
    publish_tree(publisher, topics, metadata, [target])
    wanted = [*topics.chunks(target.sha256, range(8)), topics.target_meta(target.sha256)]
    assert len(publisher.get_retained(wanted)) == 9
    assert delete_targets(publisher, topics, target.sha256, 8) == 9
    assert publisher.get_retained(wanted) == {}


# ---- HTTP mirror


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with `Range: bytes=N-` support (http.server has none); can cut a body short."""

    requests_seen: list[tuple[str, str | None]]
    cut_after: int | None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requests_seen.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut_after is not None:
            self.wfile.write(body[: self.cut_after])
            self.wfile.flush()
            type(self).cut_after = None  # only the first response is cut
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def mirror(tmp_path: Path, target: TargetSpec, metadata: dict[str, bytes]) -> Iterator[tuple[str, type[_RangeHandler]]]:
    root = tmp_path / "mirror"
    assert write_http_tree(root, metadata, [target]) == 8 + 2 + len(metadata)
    assert write_http_tree(root, metadata, [target]) == 0  # unchanged: nothing rewritten

    class Handler(_RangeHandler):
        requests_seen: list[tuple[str, str | None]] = []  # noqa: RUF012 - per-test class
        cut_after = None

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type, misc]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", Handler
    server.shutdown()
    server.server_close()


def test_http_fetcher_with_range_resume(
    mirror: tuple[str, type[_RangeHandler]], target: TargetSpec, metadata: dict[str, bytes], tmp_path: Path,
) -> None:
    base, handler = mirror
    fetcher = HttpFetcher(tmp_path / "partial", base_url=base, timeout=(2, 5))
    assert fetcher.download_bytes("mqtt:///tuf/2.root.json", 10_000) == metadata["2.root.json"]
    assert fetcher.download_bytes(base + "tuf/timestamp.json", 10_000) == metadata["timestamp.json"]
    with pytest.raises(DownloadHTTPError) as err:
        fetcher.download_bytes(base + "tuf/3.root.json", 10_000)
    assert err.value.status_code == 404

    # No signed plan: the mirror drops the connection after 300000 bytes; the retry asks for the rest.
    handler.cut_after = 300_000
    url = f"{base}targets/bundles/{target.sha256}.{NAME}"
    with pytest.raises(DownloadError):
        fetcher.download_bytes(url, LENGTH)
    kept = fetcher.partial_path(target.sha256).stat().st_size
    assert 0 < kept <= 300_000  # urllib3 drops the last short read of a truncated body
    before = fetcher.bytes_received
    data = fetcher.download_bytes(url, LENGTH)
    assert hashlib.sha256(data).hexdigest() == target.sha256
    assert fetcher.bytes_received - before == LENGTH - kept
    assert handler.requests_seen[-1] == (f"/targets/bundles/{target.sha256}.{NAME}", f"bytes={kept}-")
    assert not fetcher.partial_path(target.sha256).exists()

    # With the signed plan, only whole verified chunks are kept: cut at 300000 keeps 2 chunks.
    fetcher.expect(target.sha256, LENGTH, CHUNK, target.chunk_hashes)
    handler.cut_after = 300_000
    with pytest.raises(DownloadError):
        fetcher.download_bytes(url, LENGTH)
    assert fetcher.partial_path(target.sha256).stat().st_size == 2 * CHUNK
    data = fetcher.download_bytes(url, LENGTH)
    assert hashlib.sha256(data).hexdigest() == target.sha256
    assert handler.requests_seen[-1][1] == f"bytes={2 * CHUNK}-"

    # A partial file damaged on disk is cut back to its last good chunk before resuming.
    fetcher.partial_path(target.sha256).write_bytes(chunk_bytes(target, 0) + b"\0" * 5000)
    assert fetcher.download_bytes(url, LENGTH) == data
    assert handler.requests_seen[-1][1] == f"bytes={CHUNK}-"


# ---- helpers


class _V311OnlyProxy:
    """TCP proxy in front of mosquitto that answers an MQTT 5 CONNECT with a 3.1.1 'unacceptable protocol
    version' CONNACK, the way a 3.1.1-only broker does."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refused = 0
        self._threads: list[threading.Thread] = []
        self._stop = False

    def __enter__(self) -> _V311OnlyProxy:
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.listener.close()

    def _spawn(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._spawn(self._handle, conn)

    def _handle(self, conn: socket.socket) -> None:
        head = b""
        while len(head) < 12:  # fixed header (2-5 bytes) + "\0\4MQTT" + level
            part = conn.recv(4096)
            if not part:
                conn.close()
                return
            head += part
        i = 1
        while head[i] & 0x80:
            i += 1
        level = head[i + 1 + 6]
        if level == 5:
            self.refused += 1
            conn.sendall(bytes([0x20, 0x02, 0x00, 0x01]))
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        upstream.sendall(head)
        self._spawn(self._pump, conn, upstream)
        self._pump(upstream, conn)

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


def test_open_complete_hands_tuf_the_verified_partial_file(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], target: TargetSpec,
    metadata: dict[str, bytes], tmp_path: Path,
) -> None:
    """TUF's download_file gets the fetcher's own partial file (no spooled copy of the whole target)."""
    publish_tree(connect(mosquitto, topics, "pub"), topics, metadata, [target])
    fetcher = fetcher_for(connect(mosquitto, topics, "dev", receive_window=1), tmp_path, target)
    with fetcher.open_complete("mqtt:///tuf/timestamp.json", 10_000) as f:
        assert f is None  # metadata is read into memory as before
    with pytest.raises(DownloadLengthMismatchError), fetcher.open_complete(target_url(target), LENGTH - 1):
        pass
    with fetcher.open_complete(target_url(target), LENGTH) as f:
        assert f is not None and Path(f.name) == fetcher.partial_path(target.sha256)
        assert hashlib.sha256(f.read()).hexdigest() == target.sha256
    assert fetcher.bytes_received == LENGTH  # fetched once, all of it


# ---- completeness of a retained read: by what arrived, not by the broker's delivery order


def test_a_read_is_complete_once_every_topic_arrived_without_the_barrier(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient],
) -> None:
    a = connect(mosquitto, topics, "a")
    names = [topics.tuf(f"{i}.targets.json") for i in range(1, 4)]
    for i, t in enumerate(names):
        a.publish(t, b"v%d" % i)
    # a barrier that never echoes (the grace and timeout are long): complete by the topics alone
    b = connect(mosquitto, topics, "b", retained_grace=60)
    b.barrier_topic = topics.barrier("nobody-listens")  # its token goes where no one reads it
    with b.start_retained(names, timeout=60) as read:
        got = {m.topic: m.payload for m in read}
        assert read.done and not read.echoed and read.missing == []
    assert got == {t: b"v%d" % i for i, t in enumerate(names)}


def test_topics_missing_at_the_barrier_get_the_grace(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient],
) -> None:
    """A broker that hands out a retained message after the barrier echo (MQTT orders per topic only): simulated by
    publishing the message only once the echo arrived; within the grace it still belongs to the read."""
    a = connect(mosquitto, topics, "a")
    here, late = topics.tuf("1.snapshot.json"), topics.tuf("2.snapshot.json")
    a.publish(here, b"here")
    b = connect(mosquitto, topics, "b", retained_grace=30)
    with b.start_retained([here, late], timeout=10) as read:
        assert read.get() == Message(here, b"here", retain=True)
        while not read.echoed:  # take until the barrier echoed (get() returns nothing for it, so peek)
            assert read.get(block=False) is None
            time.sleep(0.01)
        assert not read.done and read.missing == [late]
        a.publish(late, b"late")
        msg = read.get()
        assert msg is not None and (msg.topic, msg.payload) == (late, b"late")
        assert read.get() is None and read.done and read.missing == []

    # without a grace the barrier decides alone: what is missing then is absent
    with b.start_retained([here, late + "x"], timeout=10, grace=0) as read:
        assert [m.topic for m in read] == [here] and read.done and read.echoed and read.missing == [late + "x"]


def test_newer_root_lookup_answers_from_root_latest(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], tmp_path: Path,
) -> None:
    """ngclient asks for root N+1 on every refresh: tuf/root/latest answers 404 without waiting out the grace; a root
    latest says exists is waited for (a cluster still replicating), not reported absent."""
    root = [f'{{"signed": {{"_type": "root", "version": {v}}}, "pad": "{os.urandom(8).hex()}"}}'.encode()
            for v in (0, 1, 2)]
    publisher = connect(mosquitto, topics, "pub")
    publish_tree(publisher, topics, {"1.root.json": root[1], "timestamp.json": b"{}"}, [])
    device = connect(mosquitto, topics, "dev", retained_grace=60)  # a 404 by grace would take a minute
    fetcher = MqttFetcher(device, tmp_path, timeout=60)
    assert fetcher.download_bytes("mqtt:///tuf/1.root.json", 10_000) == root[1]
    with pytest.raises(DownloadHTTPError) as err:
        fetcher.download_bytes("mqtt:///tuf/2.root.json", 10_000)
    assert err.value.status_code == 404 and "newest root: 1" in str(err.value)

    # latest says 2, root/2 itself is not there yet: read again until it is
    publisher.publish(topics.root_latest, root[2])
    threading.Timer(0.3, lambda: publisher.publish(topics.tuf("2.root.json"), root[2])).start()
    assert fetcher.download_bytes("mqtt:///tuf/2.root.json", 10_000) == root[2]

    # never there: a retryable not_found after the fetch timeout, not a 404 that would end the root walk early
    publisher.publish(topics.root_latest, root[2].replace(b'"version": 2', b'"version": 3'))
    short = MqttFetcher(connect(mosquitto, topics, "dev2", retained_grace=0.1), tmp_path, timeout=0.5)
    with pytest.raises(FetchError) as missing:
        short.download_bytes("mqtt:///tuf/3.root.json", 10_000)
    assert missing.value.reason == "not_found" and not isinstance(missing.value, DownloadHTTPError)


def test_signed_metadata_that_must_exist_is_not_there_yet_rather_than_absent(
    mosquitto: Mosquitto, topics: Topics, connect: Callable[..., MqttClient], tmp_path: Path,
) -> None:
    publisher = connect(mosquitto, topics, "pub")
    fetcher = MqttFetcher(connect(mosquitto, topics, "dev", retained_grace=0.1), tmp_path, timeout=30)
    threading.Timer(0.3, lambda: publisher.publish(topics.tuf("4.snapshot.json"), b"snap")).start()
    assert fetcher.download_bytes("mqtt:///tuf/4.snapshot.json", 10_000) == b"snap"
    # unversioned (timestamp): nothing names it, so absent is a 404 after the grace
    with pytest.raises(DownloadHTTPError):
        fetcher.download_bytes("mqtt:///tuf/timestamp.json", 10_000)
