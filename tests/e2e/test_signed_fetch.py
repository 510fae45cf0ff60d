"""End to end: `packager` publishes signed bundles to a real broker, `edge-agent fetch` pulls them.

Both sides run as real processes (the console scripts of the venv, cwd a temporary directory); the Python APIs
are used only for quick setup (a fresh TUF repository, synthetic bundles) and to play the attacker who controls
the broker (overwriting retained topics) or the repository's online keys (an expired timestamp).

One test per threat. Each shows the rejection (exit status, `{"error", "reason"}` with the expected reason) and
that nothing the device trusted before changed: the verified bundle in `state/bundles` is byte-identical, no new
bundle file appeared and the trusted metadata under `state/tuf` is byte-identical. Where valid newer metadata
legitimately arrives before the bad part (a tampered chunk of a correctly signed v2), the bundle-level facts hold
and no trusted metadata version goes backwards.

The tests whose outcome depends on the broker (a tampered chunk, a replayed timestamp, root rotation, a cut
connection and a killed agent resuming a 48 MiB download) run on every broker kind (`any_fleet`, `broker`:
Mosquitto MQTT 5 and 3.1.1, RabbitMQ, NATS); the rest test TUF's verdicts and run on Mosquitto only.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import math
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Timestamp

from agent.bundle import Artifact, Manifest, TensorSpec, sha256_file, write_bundle
from agent.transport.mqtt import MqttClient
from agent.transport.topics import Topics
from examples.brokers import Broker, TcpRelay
from examples.local_broker import Mosquitto, free_port
from packager import publish as pub
from packager import tuf_repo
from tests.conftest import chunk_written, stored_chunks

pytestmark = pytest.mark.slow

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
CHUNK = pub.CHUNK_SIZE
GROUP = "lab"
SMALL = 450_000  # member bytes: a bundle of 4 chunks, the last one short
BIG = 48 << 20  # member bytes: ~385 chunks, big enough to interrupt a download
EXIT_REJECTED, EXIT_TRANSPORT = 1, 75
CMD_TIMEOUT = 60.0

# --- synthetic bundles -----------------------------------------------------------------------------------------


def _manifest(name: str, version: int) -> Manifest:
    spec_in = TensorSpec("x", (-1, 1, 8, 8), "float32")
    spec_out = TensorSpec("logits", (-1, 10), "float32")
    art = Artifact("onnx", "model.int8.onnx", (spec_in,), (spec_out,), {"name": "static"}, 97.5, 0.3, 0.1, 0.2)
    return Manifest(
        name=name, version=version, task="classification", created="2026-11-29T00:00:00+00:00",
        inputs=(spec_in,), outputs=(spec_out,), artifacts=(art,), metric="top1", fp32_metric_value=97.8,
        max_drop=1.0, parity={"kind": "top1", "min_agreement": 0.97}, latency_budget_ms=5.0,
        target={"arch": ["x86_64"]}, preprocessing={}, provenance={"source_sha256": "0" * 64},
    )


def make_bundle(directory: Path, name: str, version: int, size: int = SMALL) -> Path:
    """A valid bundle whose model member is `size` deterministic pseudo-random bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    member = directory / f"{name}-{version}.onnx"
    member.write_bytes(random.Random(f"{name}-{version}").randbytes(size))
    out = directory / f"{name}-{version}.bundle"
    write_bundle(out, _manifest(name, version), {"model.int8.onnx": member})
    member.unlink()
    return out


def chunk_of(bundle: Path, index: int) -> bytes:
    with bundle.open("rb") as f:
        f.seek(index * CHUNK)
        return f.read(CHUNK)


def chunk_count(bundle: Path) -> int:
    return math.ceil(bundle.stat().st_size / CHUNK)


# --- what the device trusts ------------------------------------------------------------------------------------


def files(directory: Path) -> dict[str, bytes | str]:
    """Every file under `directory` by relative path (symlinks also by their target)."""
    out: dict[str, bytes | str] = {}
    if not directory.is_dir():
        return out
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if p.is_symlink():
            out[rel + " ->"] = os.readlink(p)
        if p.is_file():
            out[rel] = p.read_bytes()
    return out


def versions(tuf_files: dict[str, bytes | str]) -> dict[str, int]:
    out = {}
    for role in ("root", "timestamp", "snapshot", "targets"):
        data = tuf_files.get(f"{role}.json")
        if isinstance(data, bytes):
            out[role] = int(json.loads(data)["signed"]["version"])
    return out


@dataclass(frozen=True)
class Trusted:
    tuf: dict[str, bytes | str]
    bundles: dict[str, bytes | str]
    deployments: dict[str, bytes | str]


@dataclass(frozen=True)
class Outcome:
    rc: int
    out: dict[str, Any]
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0 and "error" not in self.out


# --- one device and one fleet's repository ---------------------------------------------------------------------


def _env() -> dict[str, str]:
    # only the config file counts; the packager children keep the key passphrase tests/conftest.py sets
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_") or k == "EDGESHIP_KEY_PASSPHRASE"}


def run(args: list[str], cwd: Path, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def parse_outcome(rc: int, stdout: str, stderr: str) -> Outcome:
    lines = stdout.strip().splitlines()
    assert lines, f"edge-agent printed nothing on stdout (exit {rc}); stderr:\n{stderr}"
    return Outcome(rc, json.loads(lines[-1]), stderr)


@dataclass
class Fleet:
    tmp: Path
    broker_url: str
    name: str

    @property
    def repo(self) -> Path:
        return self.tmp / "repo"

    @property
    def state(self) -> Path:
        return self.tmp / "device" / "state"

    @property
    def config(self) -> Path:
        return self.tmp / "device" / "agent.toml"

    @property
    def topics(self) -> Topics:
        return pub.topics_for(self.name)

    def write_config(self, *, mqtt_url: str | None = None, mirror: str = "", limits: str = "",
                     connect_timeout: float = 5.0) -> None:
        self.config.parent.mkdir(parents=True, exist_ok=True)
        mirror_section = f'[mirror]\nhttp = "{mirror}"\n' if mirror else ""
        self.config.write_text(
            f'[agent]\ndevice_id = "dev-{self.name}"\nstate_dir = "{self.state}"\nfleet = "{self.name}"\n'
            f'group = "{GROUP}"\n'
            f'[mqtt]\nurl = "{mqtt_url or self.broker_url}"\nconnect_timeout_s = {connect_timeout}\n'
            f'[trust]\nroot = "{self.tmp / "provisioned-root.json"}"\n'
            f"{mirror_section}[limits]\nchunk_timeout_s = 20.0\n{limits}\n"
        )

    # the real command lines

    def packager(self, *args: str) -> str:
        r = run([str(BIN / "packager"), *args], self.tmp)
        assert r.returncode == 0, f"packager {' '.join(args)} failed ({r.returncode}):\n{r.stderr}"
        return r.stdout

    def transport_args(self) -> list[str]:
        return ["--repo", str(self.repo), "--broker", self.broker_url, "--fleet", self.name]

    def publish(self, bundle: Path, *extra: str) -> str:
        return self.packager("publish", str(bundle), *self.transport_args(), "--group", GROUP, *extra)

    def fetch(self) -> Outcome:
        r = run([str(BIN / "edge-agent"), "fetch", "--config", str(self.config), "--json"], self.tmp)
        return parse_outcome(r.returncode, r.stdout, r.stderr)

    def start_fetch(self) -> subprocess.Popen[str]:
        return subprocess.Popen([str(BIN / "edge-agent"), "fetch", "--config", str(self.config), "--json"],
                                cwd=self.tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # the attacker on the broker

    @contextlib.contextmanager
    def mqtt(self) -> Iterator[MqttClient]:
        client = MqttClient(self.broker_url, f"attacker-{uuid.uuid4().hex[:8]}", prefix=self.topics)
        client.connect(timeout=10)
        try:
            yield client
        finally:
            client.close()

    def topic(self, suffix: str) -> str:
        """The topic of `suffix` under the fleet prefix; `tuf/<wire name>` maps like the fetcher maps it
        (`tuf/timestamp.json` -> `tuf/timestamp`, `tuf/2.root.json` -> `tuf/root/2`)."""
        if suffix.startswith("tuf/") and suffix.endswith(".json"):
            return self.topics.tuf(suffix.removeprefix("tuf/"))
        return self.topics.prefix + suffix

    def put(self, retained: dict[str, bytes]) -> None:
        """Overwrite retained topics under the fleet prefix, e.g. `put({"tuf/timestamp.json": data})`."""
        with self.mqtt() as client:
            for suffix, payload in retained.items():
                client.publish(self.topic(suffix), payload, retain=True, qos=1, wait=True, timeout=10)

    def held(self, suffix: str) -> bytes:
        with self.mqtt() as client:
            topic = self.topic(suffix)
            data = client.get_retained([topic], timeout=10).get(topic)
        assert data is not None, f"nothing retained on {suffix}"
        return data

    # what the device holds

    def trusted(self) -> Trusted:
        return Trusted(files(self.state / "tuf"), files(self.state / "bundles"), files(self.state / "deployments"))

    def stored_chunks(self, sha: str) -> dict[int, bytes]:
        return stored_chunks(self.state, sha)


def make_fleet(tmp: Path, broker_url: str) -> Fleet:
    fleet = Fleet(tmp, broker_url, f"e2e{uuid.uuid4().hex[:10]}")
    tuf_repo.init_repo(fleet.repo)  # 2-of-3 root keys in tmp/repo-root-keys
    (tmp / "provisioned-root.json").write_bytes(tuf_repo.provisioning_root(fleet.repo).read_bytes())
    fleet.write_config()
    return fleet


@pytest.fixture
def fleet(mosquitto: Mosquitto, tmp_path: Path) -> Fleet:
    """A fresh repository and device on the shared broker (each test its own fleet prefix)."""
    return make_fleet(tmp_path, mosquitto.url)


@pytest.fixture
def any_fleet(broker: Broker, tmp_path: Path) -> Fleet:
    """The same on each broker kind (tests/conftest.py `broker`): for the tests whose outcome depends on how the
    broker keeps and delivers retained messages (chunks, metadata, deletes, reconnects), not only on TUF."""
    return make_fleet(tmp_path, broker.url)


def device_on_v1(fleet: Fleet) -> tuple[Path, Trusted]:
    """Publish digits v1 with the CLI, let the device fetch it; return the bundle and what the device now trusts."""
    v1 = make_bundle(fleet.tmp / "build", "digits", 1)
    fleet.publish(v1)
    out = fleet.fetch()
    assert out.ok, out
    assert out.out == {"name": "digits", "version": 1, "sha256": sha256_file(v1),
                       "path": str(fleet.state / "bundles" / "digits-1.bundle")}
    trusted = fleet.trusted()
    assert trusted.bundles == {"digits-1.bundle": v1.read_bytes()}
    return v1, trusted


# --- verdicts --------------------------------------------------------------------------------------------------


def assert_refused(out: Outcome) -> None:
    assert out.rc != 0 and set(out.out) == {"error", "reason"}, out


def assert_reason(out: Outcome, reason: str) -> None:
    """The machine-readable verdict of a rejection (exit 1, never the retry-later transport status)."""
    assert out.out.get("reason") == reason, out
    assert out.rc == EXIT_REJECTED, out


def assert_untouched(fleet: Fleet, before: Trusted) -> None:
    """Nothing trusted changed: metadata, deployment documents and bundles byte for byte, no new files."""
    after = fleet.trusted()
    assert after.tuf == before.tuf
    assert after.deployments == before.deployments
    assert after.bundles == before.bundles


def assert_bundles_kept(fleet: Fleet, before: Trusted) -> None:
    """Valid newer metadata may have arrived; the bundles did not change and no version went backwards."""
    after = fleet.trusted()
    assert after.bundles == before.bundles  # the v1 bundle byte-identical, no digits-2.bundle, no partial file
    old, new = versions(before.tuf), versions(after.tuf)
    assert set(new) == set(old) and all(new[r] >= old[r] for r in old), (old, new)


def assert_only_genuine_chunks(fleet: Fleet, bundle: Path) -> None:
    """Whatever the device kept of an interrupted download is verified chunks, nothing else."""
    for index, data in fleet.stored_chunks(sha256_file(bundle)).items():
        assert data == chunk_of(bundle, index), f"chunk {index} on the device is not genuine"


# --- the normal paths ------------------------------------------------------------------------------------------


def test_http_mirror_when_the_broker_is_unreachable(fleet: Fleet) -> None:
    mirror = fleet.tmp / "mirror"
    bundle = make_bundle(fleet.tmp / "build", "digits", 1)
    fleet.packager("publish", str(bundle), "--repo", str(fleet.repo), "--group", GROUP, "--http-dir", str(mirror))
    assert (mirror / "tuf" / "timestamp.json").is_file()

    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(mirror)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # nothing listens on that port: MQTT fails at once and the agent falls back to the mirror
        fleet.write_config(mqtt_url=f"mqtt://127.0.0.1:{free_port()}", connect_timeout=2.0,
                           mirror=f"http://127.0.0.1:{server.server_address[1]}/")
        out = fleet.fetch()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert out.ok, out
    assert out.out == {"name": "digits", "version": 1, "sha256": sha256_file(bundle),
                       "path": str(fleet.state / "bundles" / "digits-1.bundle")}
    assert (fleet.state / "bundles" / "digits-1.bundle").read_bytes() == bundle.read_bytes()
    assert "/tuf/timestamp.json" in requests and any(sha256_file(bundle) in r for r in requests)


# --- 1, 2: bad chunks of a correctly signed v2 ----------------------------------------------------------------


def test_tampered_chunk_is_rejected(any_fleet: Fleet) -> None:
    fleet = any_fleet
    _, before = device_on_v1(fleet)
    v2 = make_bundle(fleet.tmp / "build", "digits", 2)
    fleet.publish(v2)
    sha = sha256_file(v2)
    genuine = chunk_of(v2, 1)
    forged = bytes(b ^ 0x5A for b in genuine)  # same length, other bytes
    fleet.put({f"targets/{sha}/1": forged})

    out = fleet.fetch()
    assert_refused(out)
    assert_bundles_kept(fleet, before)
    assert 1 not in fleet.stored_chunks(sha)
    assert_only_genuine_chunks(fleet, v2)
    assert_reason(out, "hash_mismatch")


def test_swapped_target_is_rejected(fleet: Fleet) -> None:
    """Mix and match: v2's chunk topics hold v1's (equally long) chunks."""
    v1, before = device_on_v1(fleet)
    v2 = make_bundle(fleet.tmp / "build", "digits", 2)
    assert v2.stat().st_size == v1.stat().st_size  # same chunk lengths: only the signed hashes tell them apart
    fleet.publish(v2)
    sha1, sha2 = sha256_file(v1), sha256_file(v2)
    swapped = {f"targets/{sha2}/{i}": chunk_of(v1, i) for i in range(chunk_count(v2))}
    swapped[f"targets/{sha2}/meta"] = fleet.held(f"targets/{sha1}/meta")  # the untrusted hint too
    fleet.put(swapped)

    out = fleet.fetch()
    assert_refused(out)
    assert_bundles_kept(fleet, before)
    assert fleet.stored_chunks(sha2) == {}
    assert_reason(out, "hash_mismatch")


# --- 3, 4: replayed and expired metadata ----------------------------------------------------------------------


def test_rollback_to_an_older_timestamp(any_fleet: Fleet) -> None:
    fleet = any_fleet
    v1 = make_bundle(fleet.tmp / "build", "digits", 1)
    fleet.publish(v1)
    old = (fleet.repo / "metadata" / "timestamp.json").read_bytes()  # validly signed, version 2
    fleet.packager("refresh", *fleet.transport_args())  # timestamp v3
    assert fleet.fetch().ok
    before = fleet.trusted()
    assert versions(before.tuf)["timestamp"] == 3

    fleet.put({"tuf/timestamp.json": old})
    out = fleet.fetch()
    assert_refused(out)
    assert_untouched(fleet, before)
    assert_reason(out, "rollback")


def test_expired_timestamp_is_a_freeze(fleet: Fleet) -> None:
    _, before = device_on_v1(fleet)
    # A timestamp genuinely signed with the online key, but two days ago: it expired yesterday.
    tuf_repo.refresh(fleet.repo, now=datetime.now(UTC) - timedelta(days=2))
    with fleet.mqtt() as client:
        pub.push(fleet.repo, client, fleet.topics, [], None)
    assert versions(files(fleet.repo / "metadata"))["timestamp"] > versions(before.tuf)["timestamp"]  # newer

    out = fleet.fetch()
    assert_refused(out)
    assert_untouched(fleet, before)  # not even the newer timestamp is kept
    assert_reason(out, "expired")

    # Not bricked: the next genuine refresh is accepted and the bundle stays what it was.
    fleet.packager("refresh", *fleet.transport_args())
    again = fleet.fetch()
    assert again.ok, again
    assert fleet.trusted().bundles == before.bundles


# --- 5, 6: endless data ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [4 * CHUNK, 1000], ids=["beyond-chunk-size", "beyond-signed-length"])
def test_endless_last_chunk_is_refused(fleet: Fleet, extra: int) -> None:
    _, before = device_on_v1(fleet)
    v2 = make_bundle(fleet.tmp / "build", "digits", 2)
    fleet.publish(v2)
    sha, last = sha256_file(v2), chunk_count(v2) - 1
    genuine = chunk_of(v2, last)
    assert len(genuine) + 1000 <= CHUNK  # the short last chunk: 1000 more bytes still fit in a chunk
    fleet.put({f"targets/{sha}/{last}": genuine + os.urandom(extra)})

    out = fleet.fetch()
    assert_refused(out)
    assert_bundles_kept(fleet, before)
    assert last not in fleet.stored_chunks(sha)
    assert_only_genuine_chunks(fleet, v2)
    assert_reason(out, "too_large")


@pytest.mark.parametrize("role", ["timestamp", "root", "targets"])
def test_metadata_beyond_the_configured_bound(fleet: Fleet, role: str) -> None:
    bound = 8192
    fleet.write_config(limits=f"max_metadata_bytes = {bound}")
    _, before = device_on_v1(fleet)
    if role == "timestamp":
        # 12 000 bytes: above the configured bound, below the agent's built-in 16 KiB timestamp cap
        suffix, data = "tuf/timestamp.json", fleet.held("tuf/timestamp.json")
    elif role == "root":
        tuf_repo.rotate_keys(fleet.repo, "timestamp")  # a genuine root v2 (signed by all three root keys)
        with fleet.mqtt() as client:
            pub.push(fleet.repo, client, fleet.topics, [], None)
        suffix, data = "tuf/2.root.json", fleet.held("tuf/2.root.json")
    else:  # bounded by the length the snapshot signs for it, tighter than the configured bound
        fleet.publish(make_bundle(fleet.tmp / "build", "digits", 2))
        name = next(n for n in tuf_repo.current_metadata(fleet.repo) if n.endswith(".targets.json"))
        suffix, data = f"tuf/{name}", fleet.held(f"tuf/{name}")
    assert len(data) < bound
    padded = data + b" " * (12_000 - len(data))  # still the same valid JSON, signatures intact
    fleet.put({suffix: padded})

    out = fleet.fetch()
    assert_refused(out)
    if role == "targets":  # timestamp and snapshot were genuine and newer; the targets were refused
        assert_bundles_kept(fleet, before)
        assert fleet.trusted().tuf["targets.json"] == before.tuf["targets.json"]
    else:
        assert_untouched(fleet, before)
    assert_reason(out, "too_large")


# --- 7: signatures ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "reason"), [
    ("root-1-of-2", "threshold"),
    ("timestamp-bad-signature", "threshold"),
    ("timestamp-unknown-key", "unknown_key"),
])
def test_signatures_below_threshold_or_by_unknown_keys(fleet: Fleet, case: str, reason: str) -> None:
    _, before = device_on_v1(fleet)
    if case == "root-1-of-2":
        fleet.packager("keys", "rotate", "timestamp", *fleet.transport_args())  # root v2, 2 of 3 root keys needed
        md = Metadata[Root].from_bytes(fleet.held("tuf/2.root.json"))
        assert len(md.signatures) >= 2
        first = next(iter(md.signatures))
        md.signatures = {first: md.signatures[first]}
        fleet.put({"tuf/2.root.json": md.to_bytes()})
    else:
        ts = Metadata[Timestamp].from_bytes(fleet.held("tuf/timestamp.json"))
        ts.signed.version += 1  # a "newer" timestamp ...
        if case == "timestamp-unknown-key":
            ts.sign(CryptoSigner.generate_ed25519())  # ... signed by the attacker's own key instead
        # else: ... still carrying the genuine key's signature, which no longer verifies
        fleet.put({"tuf/timestamp.json": ts.to_bytes()})

    out = fleet.fetch()
    assert_refused(out)
    assert_untouched(fleet, before)
    assert_reason(out, reason)


# --- 8: root rotation ------------------------------------------------------------------------------------------


# Timing: these race a download against the test's own poll (kill it mid-way) on four broker kinds. They pass
# alone, but failed once in one of three clean full runs. Not understood in every case yet; a real failure fails
# every attempt. (The cut-connection test no longer races: its relay cuts after a byte count.)
_RACES_A_DOWNLOAD = pytest.mark.flaky(reruns=2)


@_RACES_A_DOWNLOAD
def test_valid_root_rotation_is_followed(any_fleet: Fleet) -> None:
    fleet = any_fleet
    v1, before = device_on_v1(fleet)
    assert versions(before.tuf)["root"] == 1
    fleet.packager("keys", "rotate", "root", *fleet.transport_args())  # v2: signed by old and new root keys
    out = fleet.fetch()
    assert out.ok, out
    assert versions(fleet.trusted().tuf)["root"] == 2

    # v3 signed by the new root keys only (the old ones are retired): the device follows because it trusts v2.
    fleet.packager("keys", "rotate", "timestamp", *fleet.transport_args())
    out = fleet.fetch()
    assert out.ok, out
    after = fleet.trusted()
    assert versions(after.tuf)["root"] == 3
    assert {"root_history/2.root.json", "root_history/3.root.json"} <= set(after.tuf)
    assert after.tuf["root.json"] == (fleet.repo / "root.json").read_bytes()
    assert out.out["sha256"] == sha256_file(v1) and after.bundles == before.bundles


def test_root_signed_only_by_unlisted_keys_is_refused(fleet: Fleet) -> None:
    _, before = device_on_v1(fleet)
    md = Metadata[Root].from_bytes((fleet.repo / "root.json").read_bytes())
    root = md.signed
    root.version += 1
    strangers = [CryptoSigner.generate_ed25519() for _ in range(3)]
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    for s in strangers:
        root.add_key(s.public_key, "root")
    md.signatures.clear()
    for s in strangers:  # self-consistent, but no key the device's root v1 lists
        md.sign(s, append=True)
    fleet.put({"tuf/2.root.json": md.to_bytes()})

    out = fleet.fetch()
    assert_refused(out)
    assert_untouched(fleet, before)
    assert versions(fleet.trusted().tuf)["root"] == 1
    assert_reason(out, "unknown_key")


# --- 9, 10: interrupted downloads of a large bundle ------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[str] | None = None,
             interval: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"edge-agent exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def finish(proc: subprocess.Popen[str], timeout: float = CMD_TIMEOUT) -> Outcome:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"edge-agent fetch did not finish within {timeout:g}s:\n{err}")
    return parse_outcome(proc.returncode, out, err)


def big_fleet(tmp: Path, broker: Mosquitto | Broker) -> tuple[Fleet, Path]:
    fleet = make_fleet(tmp, broker.url)
    bundle = make_bundle(tmp / "build", "big", 1, BIG)
    fleet.publish(bundle)
    return fleet, bundle


def assert_fetched(fleet: Fleet, out: Outcome, bundle: Path) -> None:
    sha = sha256_file(bundle)
    assert out.ok, out
    assert out.out["sha256"] == sha
    assert sha256_file(Path(out.out["path"])) == sha
    # nothing of the download is left behind: neither the bundle's partial file nor the deployment document's
    assert sorted((fleet.state / "chunks").iterdir()) == []


def test_broker_restart_mid_download(mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    broker = mosquitto_factory(persistent=True)  # retained chunks survive the restart
    fleet, bundle = big_fleet(tmp_path, broker)
    sha, total = sha256_file(bundle), chunk_count(bundle)

    proc = fleet.start_fetch()
    try:
        wait_for(lambda: chunk_written(fleet.state, sha, 0), 30, "the first stored chunk", proc)  # cheap: one slot
        broker.stop()
        interrupted_at = len(fleet.stored_chunks(sha))
        broker.start()
        out = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert interrupted_at < total, "the download finished before the broker went down"
    assert "lost connection" in out.stderr
    if out.rc == EXIT_TRANSPORT:  # allowed: a retry later completes the download
        out = fleet.fetch()
    assert_fetched(fleet, out, bundle)


def test_cut_connection_mid_download(broker: Broker, tmp_path: Path) -> None:
    fleet, bundle = big_fleet(tmp_path, broker)
    sha, total = sha256_file(bundle), chunk_count(bundle)
    # The relay cuts by itself a quarter of the way through the bundle's bytes: no race against the download.
    proxy = TcpRelay(broker.port, cut_after=bundle.stat().st_size // 4)
    fleet.write_config(mqtt_url=f"mqtt://127.0.0.1:{proxy.port}")
    proc = fleet.start_fetch()
    try:
        wait_for(proxy.was_cut.is_set, 60, "the relay's cut", proc, interval=0.05)
        interrupted_at = len(fleet.stored_chunks(sha))
        out = finish(proc)
    finally:
        proxy.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert interrupted_at < total, "the download finished before the connection was cut"
    assert "lost connection" in out.stderr
    if out.rc == EXIT_TRANSPORT:
        out = fleet.fetch()
    assert_fetched(fleet, out, bundle)
    assert proxy.accepted >= 2  # the agent really reconnected


@_RACES_A_DOWNLOAD
def test_agent_killed_mid_download_resumes(broker: Broker, tmp_path: Path) -> None:
    fleet, bundle = big_fleet(tmp_path, broker)  # the test deletes retained chunks: only its own fleet's
    sha, total = sha256_file(bundle), chunk_count(bundle)

    proc = fleet.start_fetch()
    try:
        wait_for(lambda: chunk_written(fleet.state, sha, total // 10), 30, "10% of the chunks", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = fleet.stored_chunks(sha)
    assert total // 10 <= len(kept) < total
    assert_only_genuine_chunks(fleet, bundle)

    # Proof that the restarted agent does not fetch them again: the broker no longer has them at all, so a
    # re-fetch of any of them would fail ("missing on the broker", exit 75).
    fleet.put({f"targets/{sha}/{i}": b"" for i in kept})  # an empty retained message clears the topic
    with fleet.mqtt() as client:
        assert client.get_retained(fleet.topics.chunks(sha, kept), timeout=10) == {}

    out = fleet.fetch()
    assert_fetched(fleet, out, bundle)
    assert fleet.stored_chunks(sha) == {}  # installed: the chunks are no longer needed
    leftovers = sorted(n for n in files(fleet.state / "bundles") if n != "big-1.bundle")
    assert leftovers == []  # the killed run's partial file was reused and renamed, not left behind
