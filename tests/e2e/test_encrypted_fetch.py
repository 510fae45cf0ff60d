"""End to end: confidential models. `packager publish --encrypt` over a real Mosquitto (and into a mirror tree);
devices run the real `edge-agent fetch` (and once the `edge-agent run` daemon).

What is shown: the broker and the mirror hold no plaintext of the bundle; a granted device gets the exact bundle; a
device without a grant, or without a key, refuses `not_granted` and one with a wrong key file `key_unavailable`
(not blamed on the bundle: fixed on the device, retried at the next poll), each leaving its trusted state as it
was; a tampered grants document is refused by TUF; a device added later is granted by re-wrapping the content key
(the ciphertext target keeps its hash) and then fetches; a second fetch downloads nothing of the ciphertext again;
the next version of an encrypted group's bundle goes out in plaintext only with --no-encrypt.

The fleet, device and bundle helpers are tests/e2e/test_signed_fetch.py's (and test_daemon.py's for the daemon).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.bundle import sha256_file, verify_bundle
from agent.trust import confidential as fmt
from examples.local_broker import Mosquitto, free_port
from packager import devices, tuf_repo
from tests.conftest import stored_chunks
from tests.e2e.test_daemon import Bundles, is_event
from tests.e2e.test_daemon import Device as Daemon
from tests.e2e.test_daemon import bundles as bundles  # its fixtures, reused by the daemon test
from tests.e2e.test_daemon import own_device as own_device
from tests.e2e.test_signed_fetch import (
    BIN,
    CMD_TIMEOUT,
    GROUP,
    Fleet,
    Outcome,
    Trusted,
    assert_reason,
    files,
    make_bundle,
    make_fleet,
    parse_outcome,
)

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    """The packager's passphrase stays (its keys are encrypted at rest); the agent reads only its config file."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_") or k == "EDGESHIP_KEY_PASSPHRASE"}


@dataclass
class Device:
    """One more device of a fleet: its own key, config and state directory."""

    fleet: Fleet
    id: str
    key: X25519PrivateKey

    @property
    def dir(self) -> Path:
        return self.fleet.tmp / "devices" / self.id

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def config(self) -> Path:
        return self.dir / "agent.toml"

    def write_config(self, key_file: Path | None, *, mqtt_url: str = "", mirror: str = "") -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        decrypt = f'decrypt_key_file = "{key_file}"\n' if key_file is not None else ""
        self.config.write_text(
            f'[agent]\ndevice_id = "{self.id}"\nstate_dir = "{self.state}"\nfleet = "{self.fleet.name}"\n'
            f'group = "{GROUP}"\n[mqtt]\nurl = "{mqtt_url or self.fleet.broker_url}"\nconnect_timeout_s = 2.0\n'
            f'[trust]\nroot = "{self.fleet.tmp / "provisioned-root.json"}"\n{decrypt}'
            f'[mirror]\nhttp = "{mirror}"\n[limits]\nchunk_timeout_s = 20.0\n')

    def key_file(self, key: X25519PrivateKey | None = None) -> Path:
        path = self.dir / f"decrypt-{uuid.uuid4().hex[:6]}.key"
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write((key or self.key).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
        return path

    def fetch(self) -> Outcome:
        r = subprocess.run([str(BIN / "edge-agent"), "fetch", "--config", str(self.config), "--json"],
                           cwd=self.fleet.tmp, env=_env(), capture_output=True, text=True, timeout=CMD_TIMEOUT,
                           check=False)
        return parse_outcome(r.returncode, r.stdout, r.stderr)

    def trusted(self) -> Trusted:
        return Trusted(files(self.state / "tuf"), files(self.state / "bundles"), files(self.state / "deployments"))


def register(fleet: Fleet, device_id: str, group: str = GROUP) -> Device:
    key = X25519PrivateKey.generate()
    devices.register(fleet.repo, devices.DeviceRecord(device_id, group, 1, devices.public_b64(key.public_key()),
                                                      devices.now_iso()))
    return Device(fleet, device_id, key)


def provisioned(fleet: Fleet, device_id: str) -> Device:
    dev = register(fleet, device_id)
    dev.write_config(dev.key_file())
    return dev


def packager(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "packager"), *args], cwd=fleet.tmp, env=_env(), capture_output=True,
                          text=True, timeout=CMD_TIMEOUT, check=False)


def publish_encrypted(fleet: Fleet, bundle: Path, *extra: str) -> str:
    r = packager(fleet, "publish", str(bundle), *fleet.transport_args(), "--group", GROUP, "--encrypt", *extra)
    assert r.returncode == 0, f"packager publish --encrypt failed ({r.returncode}):\n{r.stderr}"
    return r.stdout


def retained(fleet: Fleet) -> dict[str, bytes]:
    """Every retained message under the fleet's prefix."""
    with fleet.mqtt() as client:
        sub = client.subscribe_stream([fleet.topics.prefix + "#"])
        try:
            out = {}
            while (msg := sub.get(timeout=1.5)) is not None:
                out[msg.topic] = msg.payload
            return out
        finally:
            sub.close()


@contextlib.contextmanager
def serve_directory(directory: Path, seen: list[str] | None = None) -> Iterator[str]:
    """`directory` over HTTP on a free port while the context lasts: its base URL. Each request's path is appended
    to `seen` when given."""
    handler = type("_Recording", (_QuietHandler,), {"seen": seen if seen is not None else []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    seen: list[str]

    def log_message(self, format: str, *args: object) -> None:
        self.seen.append(self.path)


def model_member(bundle: Path, dest: Path) -> bytes:
    verify_bundle(bundle, dest=dest)
    return (dest / "model.int8.onnx").read_bytes()


@pytest.fixture
def fleet(mosquitto: Mosquitto, tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path, mosquitto.url)


# --- tests ------------------------------------------------------------------------------------------------------


def test_broker_and_mirror_see_only_ciphertext_and_a_granted_device_gets_the_bundle(fleet: Fleet) -> None:
    granted = provisioned(fleet, "pi-1")
    bundle = make_bundle(fleet.tmp / "build", "digits", 1)
    mirror = fleet.tmp / "mirror"
    out = publish_encrypted(fleet, bundle, "--http-dir", str(mirror))
    assert "encrypted" in out

    # what anyone reading the broker or the mirror sees: no tar header, no manifest, no slice of the model
    model = model_member(bundle, fleet.tmp / "plain")
    secrets = [b"manifest.json", b"golden", model[:64], model[len(model) // 2:len(model) // 2 + 64], model[-64:]]
    held = retained(fleet)
    assert any("/targets/" in t for t in held)
    mirrored = {k: v for k, v in files(mirror).items() if isinstance(v, bytes)}
    for where, payloads in (("broker", held), ("mirror", mirrored)):
        for name, payload in payloads.items():
            for secret in secrets:
                assert secret not in payload, f"{where} {name} holds plaintext ({secret[:16]!r})"
    signed = tuf_repo.referenced_targets(fleet.repo)
    tf = signed["bundles/digits-1.bundle"]
    assert tf.hashes["sha256"] != sha256_file(bundle)
    assert tf.custom["encrypted"]["plaintext_sha256"] == sha256_file(bundle)
    assert "grants/digits-1.json" in signed
    assert b"manifest.json" not in tuf_repo.target_file_path(fleet.repo, tf).read_bytes()

    result = granted.fetch()
    assert result.ok, result
    assert result.out == {"name": "digits", "version": 1, "sha256": tf.hashes["sha256"],
                          "path": str(granted.state / "bundles" / "digits-1.bundle")}
    assert granted.trusted().bundles == {"digits-1.bundle": bundle.read_bytes()}
    assert list((granted.state / "encrypted").iterdir()) == []  # the ciphertext is gone once decrypted
    assert granted.state.stat().st_mode & 0o777 == 0o700

    # the same device, fresh, from the mirror alone (nothing listens on its broker port): grants come from there too
    from_mirror = register(fleet, "pi-mirror")
    key_file, dead_broker = from_mirror.key_file(), f"mqtt://127.0.0.1:{free_port()}"
    with serve_directory(mirror) as base:
        from_mirror.write_config(key_file, mqtt_url=dead_broker, mirror=base)
        result = from_mirror.fetch()
    assert_reason(result, "not_granted")  # registered after the publish: the mirror holds no grant for it yet
    r = packager(fleet, "device", "grant", "pi-mirror", "--repo", str(fleet.repo), "--http-dir", str(mirror))
    assert r.returncode == 0, r.stderr
    with serve_directory(mirror) as base:
        from_mirror.write_config(key_file, mqtt_url=dead_broker, mirror=base)
        result = from_mirror.fetch()
    assert result.ok, result
    assert from_mirror.trusted().bundles == {"digits-1.bundle": bundle.read_bytes()}

    # fetched again (a VERIFY re-run, another `edge-agent fetch`): the decrypted bundle is used, nothing of the
    # ciphertext is downloaded again
    seen: list[str] = []
    with serve_directory(mirror, seen) as base:
        from_mirror.write_config(key_file, mqtt_url=dead_broker, mirror=base)
        again = from_mirror.fetch()
    assert again.ok and again.out == result.out, again
    assert seen and not [p for p in seen if tf.hashes["sha256"] in p], seen
    assert from_mirror.trusted().bundles == {"digits-1.bundle": bundle.read_bytes()}


def test_devices_that_cannot_read_it_refuse_and_keep_their_state(fleet: Fleet) -> None:
    provisioned(fleet, "pi-1")
    wrong = register(fleet, "pi-wrong")  # registered, granted, but its config names another key
    wrong.write_config(wrong.key_file(X25519PrivateKey.generate()))
    stranger = Device(fleet, "pi-stranger", X25519PrivateKey.generate())  # never registered: no grant
    stranger.write_config(stranger.key_file())
    keyless = Device(fleet, "pi-keyless", X25519PrivateKey.generate())  # no [trust] decrypt_key_file
    keyless.write_config(None)
    publish_encrypted(fleet, make_bundle(fleet.tmp / "build", "digits", 1))
    cipher_sha = tuf_repo.referenced_targets(fleet.repo)["bundles/digits-1.bundle"].hashes["sha256"]

    for dev, reason in ((stranger, "not_granted"), (keyless, "not_granted"), (wrong, "key_unavailable")):
        first = dev.fetch()  # a first fetch: the device trusted nothing before
        assert_reason(first, reason)
        assert dev.trusted().bundles == {} and dev.trusted().deployments == {}, dev.id  # no partial file either
        # refused at CHECK: not one chunk of a ciphertext the device could not decrypt was downloaded
        assert not (dev.state / "encrypted").exists() and stored_chunks(dev.state, cipher_sha) == {}, dev.id
        before = dev.trusted()
        again = dev.fetch()
        assert_reason(again, reason)
        after = dev.trusted()
        assert (after.tuf, after.bundles, after.deployments) == (before.tuf, before.bundles, before.deployments)
    assert str(stranger.id) in stranger.fetch().out["error"]


def test_a_tampered_grants_document_is_refused_by_tuf(fleet: Fleet) -> None:
    dev = provisioned(fleet, "pi-1")
    publish_encrypted(fleet, make_bundle(fleet.tmp / "build", "digits", 1))
    grants_tf = tuf_repo.referenced_targets(fleet.repo)["grants/digits-1.json"]
    sha = grants_tf.hashes["sha256"]
    genuine = fleet.held(f"targets/{sha}/0")
    # the attacker on the broker swaps in a grant wrapped for its own key, same length
    attacker = X25519PrivateKey.generate()
    doc = fmt.Grants.parse(genuine, "g")
    forged_key = fmt.wrap_key(os.urandom(32), attacker.public_key(), b"x")
    forged = fmt.Grants(doc.bundle, doc.ciphertext_sha256, doc.groups, {**doc.wrapped, "pi-1": forged_key})
    fleet.put({f"targets/{sha}/0": forged.to_bytes()})

    out = dev.fetch()
    assert_reason(out, "hash_mismatch")
    assert dev.trusted().bundles == {}


def test_a_device_added_later_is_granted_without_reencrypting(fleet: Fleet) -> None:
    provisioned(fleet, "pi-1")
    bundle = make_bundle(fleet.tmp / "build", "digits", 1)
    publish_encrypted(fleet, bundle)
    signed = tuf_repo.referenced_targets(fleet.repo)
    cipher_sha, grants_sha = signed["bundles/digits-1.bundle"].hashes["sha256"], \
        signed["grants/digits-1.json"].hashes["sha256"]

    late = provisioned(fleet, "pi-late")
    before = late.trusted()
    assert_reason(late.fetch(), "not_granted")  # not granted yet: refused, nothing kept
    assert late.trusted().bundles == before.bundles == {}

    r = packager(fleet, "device", "grant", "pi-late", *fleet.transport_args())
    assert r.returncode == 0, r.stderr
    assert "grants/digits-1.json" in r.stdout
    signed = tuf_repo.referenced_targets(fleet.repo)
    assert signed["bundles/digits-1.bundle"].hashes["sha256"] == cipher_sha  # the ciphertext did not change
    assert signed["grants/digits-1.json"].hashes["sha256"] != grants_sha
    grants = fmt.Grants.parse(tuf_repo.target_file_path(fleet.repo, signed["grants/digits-1.json"]).read_bytes(),
                              "g")
    assert set(grants.wrapped) == {"pi-1", "pi-late"}

    out = late.fetch()
    assert out.ok, out
    assert late.trusted().bundles == {"digits-1.bundle": bundle.read_bytes()}

    # a revoked device gets no grant in a bundle published later (it keeps what it had)
    devices.mark_revoked(fleet.repo, "pi-late")
    publish_encrypted(fleet, make_bundle(fleet.tmp / "build", "digits", 2))
    v2 = fmt.Grants.parse(tuf_repo.target_file_path(
        fleet.repo, tuf_repo.referenced_targets(fleet.repo)["grants/digits-2.json"]).read_bytes(), "g")
    assert set(v2.wrapped) == {"pi-1"}
    assert_reason(late.fetch(), "not_granted")
    assert late.trusted().bundles == {"digits-1.bundle": bundle.read_bytes()}


def test_publish_encrypt_refuses_a_group_without_devices(fleet: Fleet) -> None:
    r = packager(fleet, "publish", str(make_bundle(fleet.tmp / "build", "digits", 1)), *fleet.transport_args(),
                 "--group", GROUP, "--encrypt")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "has no active (unrevoked) device" in r.stderr, r.stderr
    assert tuf_repo.referenced_targets(fleet.repo) == {}


def _worker(dev: Device, *args: str) -> tuple[int, dict[str, object]]:
    """One step of the real fetch worker (what the daemon runs for CHECK, DOWNLOAD and VERIFY)."""
    import json
    import sys

    from agent.config import load_config
    from agent.deploy.fetch_worker import config_document

    doc = dev.dir / "worker-config.json"
    doc.write_text(json.dumps(config_document(load_config(dev.config, env={}))))
    r = subprocess.run([sys.executable, "-m", "agent.deploy.fetch_worker", "--config", str(doc), *args],
                       cwd=Path(__file__).resolve().parents[2], env=_env(), capture_output=True, text=True,
                       timeout=CMD_TIMEOUT, check=False)
    return r.returncode, json.loads(r.stdout.splitlines()[-1])


def test_a_key_file_broken_after_check_is_not_blamed_on_the_bundle(fleet: Fleet) -> None:
    """The key file loosened (or replaced) between CHECK and DOWNLOAD/VERIFY: `key_unavailable`, which the state
    machine never puts on the rejected list, and the ciphertext already downloaded is kept for the retry."""
    from agent.deploy.machine import NOT_BLAMED

    dev = provisioned(fleet, "pi-1")
    publish_encrypted(fleet, make_bundle(fleet.tmp / "build", "digits", 1))
    rc, checked = _worker(dev, "--step", "check")
    assert rc == 0, checked
    sha = str(checked["sha256"])
    rc, downloaded = _worker(dev, "--step", "download", "--sha256", sha)
    assert rc == 0 and (dev.state / "encrypted" / "digits-1.bundle").is_file(), downloaded
    key_file = next(dev.dir.glob("decrypt-*.key"))
    key_file.chmod(0o644)
    rc, failed = _worker(dev, "--step", "verify", "--sha256", sha)
    assert rc == 1 and failed["reason"] == "key_unavailable" and failed["reason"] in NOT_BLAMED, failed
    assert (dev.state / "encrypted" / "digits-1.bundle").is_file()
    dev.write_config(dev.key_file(X25519PrivateKey.generate()))  # replaced by another key: the grant does not open
    rc, failed = _worker(dev, "--step", "verify", "--sha256", sha)
    assert rc == 1 and failed["reason"] == "key_unavailable", failed
    dev.write_config(dev.key_file())  # fixed on the device: the retry verifies
    rc, verified = _worker(dev, "--step", "verify", "--sha256", sha)
    assert rc == 0 and dev.trusted().bundles.keys() == {"digits-1.bundle"}, verified


def test_a_key_file_broken_between_download_and_decryption_keeps_the_ciphertext(fleet: Fleet) -> None:
    """The same within one fetch (CHECK, DOWNLOAD, VERIFY in one process, as `edge-agent fetch` runs them): the key
    file goes unusable after the ciphertext is downloaded; decryption refuses `key_unavailable` and keeps it."""
    from agent.config import load_config
    from agent.errors import BundleRejected
    from agent.trust.fetch import BundleSource, with_source

    dev = provisioned(fleet, "pi-1")
    publish_encrypted(fleet, make_bundle(fleet.tmp / "build", "digits", 1))
    ciphertext = dev.state / "encrypted" / "digits-1.bundle"

    def fetch_with_key_broken_after_download(source: BundleSource) -> None:
        cand = source.check()
        path = source.download(cand)
        assert path == ciphertext and path.is_file()
        next(dev.dir.glob("decrypt-*.key")).chmod(0o644)
        source.verify(cand, path)

    with pytest.raises(BundleRejected) as e:
        with_source(load_config(dev.config, env={}), fetch_with_key_broken_after_download)
    assert e.value.reason == "key_unavailable" and ciphertext.is_file()


def test_the_next_version_goes_out_in_plaintext_only_when_asked(fleet: Fleet) -> None:
    """`publish digits-2 --group lab` after `publish digits-1 --encrypt --group lab`: refused, nothing signed, until
    --no-encrypt says plaintext is meant."""
    provisioned(fleet, "pi-1")
    publish_encrypted(fleet, make_bundle(fleet.tmp / "build", "digits", 1))
    v2 = make_bundle(fleet.tmp / "build", "digits", 2)
    r = packager(fleet, "publish", str(v2), *fleet.transport_args(), "--group", GROUP)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--no-encrypt" in r.stderr, r.stderr
    assert "bundles/digits-2.bundle" not in tuf_repo.referenced_targets(fleet.repo)
    r = packager(fleet, "publish", str(v2), *fleet.transport_args(), "--group", GROUP, "--no-encrypt")
    assert r.returncode == 0, r.stderr
    assert "encrypted" not in tuf_repo.referenced_targets(fleet.repo)["bundles/digits-2.bundle"].custom


# --- the daemon -------------------------------------------------------------------------------------------------


def _daemon_key(dev: Daemon) -> X25519PrivateKey:
    """A decrypt key for the daemon's device, named in its config ([trust] decrypt_key_file)."""
    key = X25519PrivateKey.generate()
    key_file = dev.tmp / "decrypt.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    dev.config.write_text(dev.config.read_text().replace("[serve]\n", f'decrypt_key_file = "{key_file}"\n[serve]\n', 1))
    return key


def _packager(dev: Daemon, *args: str) -> None:
    r = subprocess.run([str(BIN / "packager"), *args, "--repo", str(dev.repo), "--broker", dev.broker.url, "--fleet",
                        dev.fleet], cwd=dev.tmp, env=_env(), capture_output=True, text=True, timeout=CMD_TIMEOUT,
                       check=False)
    assert r.returncode == 0, f"packager {args[0]} failed ({r.returncode}):\n{r.stderr}"


def test_the_daemon_deploys_an_encrypted_bundle(own_device: Callable[..., Daemon], bundles: Bundles) -> None:
    dev = own_device()
    key = _daemon_key(dev)
    devices.register(dev.repo, devices.DeviceRecord(dev.id, GROUP, 1, devices.public_b64(key.public_key()),
                                                    devices.now_iso()))
    mark = dev.events.mark()
    dev.start()
    _packager(dev, "publish", str(bundles.v1), "--group", GROUP, "--encrypt")
    dev.events.wait(is_event(frm="commit", to="idle", version=1), "encrypted v1 committed", mark)
    status, doc = dev.infer(bundles.x[:2])
    assert status == 200 and doc["model_version"] == "1", doc
    assert (dev.state_dir / "bundles" / "digits-1.bundle").read_bytes() == bundles.v1.read_bytes()


def test_the_daemon_waits_for_its_grant_then_deploys(own_device: Callable[..., Daemon], bundles: Bundles) -> None:
    """A daemon meets an encrypted deployment it holds no grant for: every check says not_granted, nothing is
    downloaded, nothing is rejected for good, the agent keeps running; once granted it deploys at the next check."""
    dev = own_device()
    key = _daemon_key(dev)
    other = X25519PrivateKey.generate()  # the group's only registered device when the bundle is published
    devices.register(dev.repo, devices.DeviceRecord("pi-other", GROUP, 1, devices.public_b64(other.public_key()),
                                                    devices.now_iso()))
    _packager(dev, "publish", str(bundles.v1), "--group", GROUP, "--encrypt")
    mark = dev.events.mark()
    dev.start()
    dev.events.wait(is_event(frm="check", to="idle", reason="check_failed: not_granted"), "two not_granted checks",
                    mark, count=2)
    assert dev.running and dev.state().current is None and dict(dev.state().rejected) == {}
    assert not (dev.state_dir / "encrypted").exists() or list((dev.state_dir / "encrypted").iterdir()) == []

    devices.register(dev.repo, devices.DeviceRecord(dev.id, GROUP, 2, devices.public_b64(key.public_key()),
                                                    devices.now_iso()))
    _packager(dev, "device", "grant", dev.id)
    dev.events.wait(is_event(frm="commit", to="idle", version=1), "v1 committed once granted", mark)
    assert (dev.state_dir / "bundles" / "digits-1.bundle").read_bytes() == bundles.v1.read_bytes()
