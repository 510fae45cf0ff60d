"""End to end on a three-node NATS cluster (JetStream, MQTT on every node, MQTT streams replicated on all three):
the packager publishes through node B, a real `edge-agent run` configured with `urls = [A, C]` fetches over A, node
A is SIGKILLed mid-download, the agent fails over to C, finishes the download without fetching again a chunk it had
verified and stored, activates and commits the bundle, and its telemetry keeps arriving (read on node B). The
download may finish in the same fetch or in the daemon's next check (a new fetch worker that finds node A gone and
connects to C): either way no stored chunk comes again.

The agent reaches A and C through byte-relays that parse the MQTT packets the broker sends down, so the test
counts which chunk topics each node delivered to the device.

Every client (agent, packager, tester) subscribes at QoS 0 (`?subscribe_qos=0` on the broker URLs): on NATS
2.9.10 (Debian bookworm, the version here) a QoS 1 subscription costs a JetStream consumer, placed on a random peer
of the MQTT stream, dead ones included (fixed in nats-server 2.9.12, commit e15eb22), so after A's SIGKILL about a
third of the subscriptions on B and C were refused or never answered for as long as A stayed down
(docs/scaling.md). A QoS 0 subscription costs no consumer.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import sha256_file
from agent.deploy.machine import State
from agent.transport.mqtt import Subscription
from examples.brokers import NatsCluster
from examples.digits.train import train_digits
from packager.build import BuildOptions, Progress, build
from packager.publish import CHUNK_SIZE
from tests.conftest import chunk_written, stored_chunks
from tests.e2e.test_daemon import Device, _rebundle

pytestmark = pytest.mark.slow

PADDING = 12 << 20  # ~100 chunks: a download long enough to kill a node in the middle of it
COMMIT_TIMEOUT = 240.0  # bound on getting v2 from node C after node A died (measured: docs/scaling.md)
SUBSCRIBE_QOS = "?subscribe_qos=0"  # on every broker URL (module doc)


class DownTap:
    """A TCP relay to one broker node that records the topic of every PUBLISH the broker sends down (whole packets
    only), and how many connections it relayed."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.topics: list[str] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
            except OSError:
                client.close()  # the node is down: like a refused connection
                continue
            upstream.settimeout(None)
            with self._lock:
                self.connections += 1
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        buf = bytearray()
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if down:
                    buf += data
                    self._parse(buf)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _parse(self, buf: bytearray) -> None:
        while len(buf) >= 2:
            length, shift, pos = 0, 0, 1
            while True:
                if pos >= len(buf):
                    return
                byte = buf[pos]
                length |= (byte & 0x7F) << shift
                shift += 7
                pos += 1
                if not byte & 0x80:
                    break
            if len(buf) < pos + length:
                return
            if buf[0] >> 4 == 3:  # PUBLISH: 2-byte topic length, topic
                n = int.from_bytes(buf[pos:pos + 2], "big")
                with self._lock:
                    self.topics.append(bytes(buf[pos + 2:pos + 2 + n]).decode("utf-8", "replace"))
            del buf[:pos + length]

    def chunks(self, sha: str) -> Counter[int]:
        """Chunk index -> how often this node delivered it."""
        marker = f"/targets/{sha}/"
        with self._lock:
            return Counter(int(t.rsplit("/", 1)[1]) for t in self.topics
                           if marker in t and t.rsplit("/", 1)[1].isdigit())

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


class _Node:
    """What `Device` needs of a broker: the URL the packager and the tester's client use (node B)."""

    def __init__(self, url: str) -> None:
        self.url = url


@pytest.fixture(scope="module")
def digits_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real digits bundle v1 (1 epoch, ONNX) and the same model as v2 with a 12 MiB padding member."""
    tmp = tmp_path_factory.mktemp("cluster-bundles")
    paths = train_digits(tmp / "digits", epochs=1)
    opts = BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                        out_dir=tmp / "out", name="digits", version=1, formats=("onnx",), latency_runs=20)
    v1 = build(opts, Progress(0, enabled=False)).bundle
    (tmp / "big").mkdir()
    return v1, _rebundle(v1, tmp / "big" / "digits-2.bundle", 2, padding=PADDING)


@pytest.fixture
def taps(nats_cluster: NatsCluster) -> Iterator[tuple[DownTap, DownTap]]:
    a, c = DownTap(nats_cluster.nodes[0].port), DownTap(nats_cluster.nodes[2].port)
    yield a, c
    a.close()
    c.close()


def test_node_killed_mid_download_device_fails_over(nats_cluster: NatsCluster, taps: tuple[DownTap, DownTap],
                                                    digits_bundles: tuple[Path, Path], tmp_path: Path) -> None:
    v1, v2 = digits_bundles
    tap_a, tap_c = taps
    node_a = nats_cluster.nodes[0]
    # every client subscribes at QoS 0 (SUBSCRIBE_QOS): see the module doc
    dev = Device(tmp_path, _Node(nats_cluster.nodes[1].url + SUBSCRIBE_QOS))  # packager and tester on node B
    text = dev.config.read_text()
    url_line = f'url = "{nats_cluster.nodes[1].url}{SUBSCRIBE_QOS}"'
    assert url_line in text
    dev.config.write_text(text.replace(url_line, f'urls = ["{tap_a.url}{SUBSCRIBE_QOS}", "{tap_c.url}{SUBSCRIBE_QOS}"]')
                          + "[telemetry]\ninterval_s = 0.5\n")
    telemetry = dev.mqtt.subscribe_stream([dev.topics.device(dev.id, "telemetry")])
    try:
        dev.start()
        dev.publish(v1)
        dev.wait_state(lambda ds: ds.state is State.IDLE and ds.current is not None and ds.current.version == 1,
                       "v1 committed over node A")
        assert tap_a.connections >= 1 and tap_c.connections == 0

        sha, total = sha256_file(v2), math.ceil(v2.stat().st_size / CHUNK_SIZE)
        dev.publish(v2)
        dev.wait(lambda: chunk_written(dev.state_dir, sha, total // 4), "a quarter of v2's chunks")
        node_a.kill()
        killed_at = time.monotonic()
        stored_at_kill = set(stored_chunks(dev.state_dir, sha))
        delivered_by_a = tap_a.chunks(sha)
        assert total // 4 <= len(stored_at_kill) < total, "the download finished before node A went down"
        before = _drain(telemetry)

        dev.wait_state(lambda ds: ds.state is State.IDLE and ds.current is not None and ds.current.version == 2,
                       "v2 committed after the failover to node C", timeout=COMMIT_TIMEOUT)
        print(f"v2 committed {time.monotonic() - killed_at:.1f}s after node A's SIGKILL")  # reported, not asserted
        assert sha256_file(dev.state_dir / "bundles" / "digits-2.bundle") == sha
        delivered_by_c = tap_c.chunks(sha)
        assert tap_c.connections >= 1
        # every chunk came from A or C; nothing verified and stored before the kill was fetched again from C
        assert set(delivered_by_a) | set(delivered_by_c) == set(range(total))
        assert stored_at_kill.isdisjoint(delivered_by_c), sorted(stored_at_kill & set(delivered_by_c))
        # chunks both nodes delivered: in flight to the device (not yet stored) when A died
        twice = set(delivered_by_a) & set(delivered_by_c)
        print(f"chunks: {total}; stored at kill {len(stored_at_kill)}; delivered by A {sum(delivered_by_a.values())}, "
              f"by C {sum(delivered_by_c.values())}; by both {len(twice)}")

        # telemetry keeps flowing: messages published after the failover arrive on node B, sequence still rising
        after: list[dict[str, Any]] = []

        def two_more() -> bool:
            after.extend(_drain(telemetry))
            return len(after) >= 2

        dev.wait(two_more, "telemetry after the failover")
        # delivery is at least once (docs/telemetry.md): a message whose PUBACK died with node A comes again, through
        # C, after newer ones may have arrived; consumers de-duplicate by seq. None may be missing.
        seqs = [m["seq"] for m in before + after]
        got = sorted(set(seqs))
        assert got == list(range(got[0], got[-1] + 1)), seqs
        assert max(m["seq"] for m in after) > max((m["seq"] for m in before), default=0), seqs
        print(f"telemetry seqs {got[0]}..{got[-1]}, {len(seqs) - len(got)} delivered twice")
        log = dev.log.read_text(errors="replace")
        assert f"127.0.0.1:{tap_c.port}" in log, dev.log_tail()  # the agent says which broker it is on
    finally:
        telemetry.close()
        dev.close()


def _drain(sub: Subscription) -> list[dict[str, Any]]:
    """The telemetry messages that arrived so far (docs/telemetry.md: JSON with a per-device `seq`)."""
    out = []
    while (msg := sub.get(timeout=0.05)) is not None:
        out.append(json.loads(msg.payload))
    return out
