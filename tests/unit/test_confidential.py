"""Encrypted bundles, the pure parts: the file format (agent/trust/confidential.py), the key wrap and its binding,
the grants document, the device key file, and the packager's refusals (packager/confidential.py, publish.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.config import check_paths, parse_config
from agent.errors import BundleRejected, ConfigError
from agent.trust import confidential as fmt
from packager.errors import InputError

SHA = "ab" * 32
BUNDLE = "bundles/digits-1.bundle"


def _encrypted(tmp_path: Path, data: bytes, key: bytes) -> tuple[Path, fmt.Plaintext]:
    src = tmp_path / "plain.bundle"
    src.write_bytes(data)
    out = tmp_path / "cipher.bundle"
    with out.open("wb") as f:
        plain = fmt.encrypt_file(src, f, key)
    return out, plain


def _reject(reason: str, call) -> BundleRejected:  # type: ignore[no-untyped-def]
    with pytest.raises(BundleRejected) as info:
        call()
    assert info.value.reason == reason, info.value
    return info.value


def test_round_trip_streams_blocks_and_leaves_only_the_checked_plaintext(tmp_path: Path) -> None:
    data = os.urandom(3 * fmt.BLOCK + 123)  # several blocks, the last one short
    key = fmt.new_content_key()
    cipher, plain = _encrypted(tmp_path, data, key)
    raw = cipher.read_bytes()
    assert len(raw) == fmt.HEADER_LEN + len(data) + fmt.TAG_LEN
    assert data[1000:1064] not in raw and raw.startswith(fmt.MAGIC)
    out = tmp_path / "out.bundle"
    fmt.decrypt_file(cipher, out, key, plain)
    assert out.read_bytes() == data
    assert out.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: b"not an encrypted bundle at all", "format"),
        (lambda raw: b"EDGESHIP-EN", "format"),  # shorter than the header
        (lambda raw: b"GARBAGE-GARB" + raw[12:], "format"),  # bad magic
        (lambda raw: raw[:12] + b"\x02" + raw[13:], "format"),  # unknown format version
        (lambda raw: raw[:13] + b"\x09" + raw[14:], "format"),  # unknown algorithm
        (lambda raw: raw[: fmt.HEADER_LEN + 5], "format"),  # truncated: no room for the tag
        (lambda raw: raw[:-1], "size_mismatch"),  # truncated by one byte
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "decrypt_failed"),  # wrong tag
        (lambda raw: raw[:40] + bytes([raw[40] ^ 1]) + raw[41:], "decrypt_failed"),  # a flipped ciphertext bit
        (lambda raw: raw[:20] + bytes([raw[20] ^ 1]) + raw[21:], "decrypt_failed"),  # the nonce (authenticated)
    ],
)
def test_damaged_ciphertext_is_refused_and_nothing_is_left(tmp_path: Path, damage, reason: str) -> None:  # type: ignore[no-untyped-def]
    key = fmt.new_content_key()
    cipher, plain = _encrypted(tmp_path, os.urandom(5000), key)
    cipher.write_bytes(damage(cipher.read_bytes()))
    out = tmp_path / "out.bundle"
    _reject(reason, lambda: fmt.decrypt_file(cipher, out, key, plain))
    assert not out.exists()


def test_wrong_content_key_or_wrong_signed_plaintext_hash(tmp_path: Path) -> None:
    key = fmt.new_content_key()
    cipher, plain = _encrypted(tmp_path, os.urandom(5000), key)
    out = tmp_path / "out.bundle"
    _reject("decrypt_failed", lambda: fmt.decrypt_file(cipher, out, fmt.new_content_key(), plain))
    _reject("hash_mismatch", lambda: fmt.decrypt_file(cipher, out, key, fmt.Plaintext("0" * 64, plain.length)))
    assert not out.exists()


def test_the_wrapped_key_opens_only_for_its_device_and_its_bundle() -> None:
    device = X25519PrivateKey.generate()
    key = fmt.new_content_key()
    wrapped = fmt.wrap_key(key, device.public_key(), fmt.key_info(BUNDLE, SHA))
    assert fmt.unwrap_key(wrapped, device, fmt.key_info(BUNDLE, SHA)) == key
    # a grant that does not open is "key_unavailable": not blamed on the bundle (agent/deploy/machine.py)
    _reject("key_unavailable",
            lambda: fmt.unwrap_key(wrapped, X25519PrivateKey.generate(), fmt.key_info(BUNDLE, SHA)))
    # moved to another bundle, or to another ciphertext of the same path: the HPKE info no longer matches
    _reject("key_unavailable", lambda: fmt.unwrap_key(wrapped, device, fmt.key_info("bundles/digits-2.bundle", SHA)))
    _reject("key_unavailable", lambda: fmt.unwrap_key(wrapped, device, fmt.key_info(BUNDLE, "cd" * 32)))
    _reject("key_unavailable", lambda: fmt.unwrap_key("not base64!", device, fmt.key_info(BUNDLE, SHA)))


def test_key_problems_are_not_blamed_on_the_bundle_and_a_bad_tag_is() -> None:
    """A loosened or replaced key file during DOWNLOAD/VERIFY rolls back without putting the bundle on the rejected
    list (retried at the next poll); a ciphertext failing its GCM tag is a verdict on the bundle."""
    from agent.deploy.machine import NOT_BLAMED, State, failure_event

    assert "key_unavailable" in NOT_BLAMED and "decrypt_failed" not in NOT_BLAMED
    for state in (State.DOWNLOAD, State.VERIFY):
        assert failure_event(state, BundleRejected("x", reason="key_unavailable"))[1] in NOT_BLAMED


def test_a_full_disk_while_decrypting_is_a_storage_error_not_a_verdict(tmp_path: Path) -> None:
    """Too little free space is refused before decrypting, and a write that fails midway (here RLIMIT_FSIZE in a
    child process, a real EFBIG from the kernel) is TransportError "no_space": nothing left behind, the ciphertext
    untouched, the bundle not blamed."""
    import shutil
    import subprocess
    import sys

    from agent.errors import TransportError

    key = fmt.new_content_key()
    cipher, plain = _encrypted(tmp_path, os.urandom(3 * fmt.BLOCK), key)
    before = cipher.read_bytes()
    out = tmp_path / "out.bundle"
    real = shutil.disk_usage(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shutil, "disk_usage", lambda _p: real._replace(free=plain.length - 1))
        with pytest.raises(TransportError, match="bytes free") as info:
            fmt.decrypt_file(cipher, out, key, plain)
    assert info.value.reason == "no_space" and not out.exists()

    child = f"""
import resource, signal, sys
from pathlib import Path
from agent.errors import TransportError
from agent.trust import confidential as fmt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({fmt.BLOCK + 100}, resource.RLIM_INFINITY))
try:
    fmt.decrypt_file(Path({str(cipher)!r}), Path({str(out)!r}), bytes.fromhex({key.hex()!r}),
                     fmt.Plaintext({plain.sha256!r}, {plain.length}))
except TransportError as e:
    print(e.reason, e)
    sys.exit(0)
sys.exit(1)
"""
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and r.stdout.startswith("no_space"), (r.stdout, r.stderr)
    assert not out.exists() and cipher.read_bytes() == before


def test_grants_document_parsing() -> None:
    grants = fmt.Grants(BUNDLE, SHA, ("lab",), {"pi-1": "AAAA"})
    parsed = fmt.Grants.parse(grants.to_bytes(), "grants/digits-1.json")
    assert parsed == grants
    assert parsed.for_device("pi-1", BUNDLE, SHA) == "AAAA"
    _reject("not_granted", lambda: parsed.for_device("pi-2", BUNDLE, SHA))
    _reject("mismatch", lambda: parsed.for_device("pi-1", "bundles/digits-2.bundle", SHA))
    not_strings = json.dumps({**json.loads(grants.to_bytes()), "grants": {"a": 1}}).encode()
    for bad in (b"[]", b"{", b'{"schema": 1}', not_strings):
        _reject("malformed", lambda bad=bad: fmt.Grants.parse(bad, "g"))
    _reject("too_large", lambda: fmt.Grants.parse(b" " * (fmt.MAX_GRANTS_BYTES + 1), "g"))


def test_encryption_entry_of_the_signed_custom_metadata() -> None:
    entry = fmt.Encryption(fmt.SCHEME, "grants/digits-1.json", fmt.Plaintext(SHA, 10))
    assert fmt.Encryption.from_custom({"encrypted": entry.to_json()}, BUNDLE) == entry
    assert fmt.Encryption.from_custom({"name": "digits"}, BUNDLE) is None
    _reject("unsupported", lambda: fmt.Encryption.from_custom({"encrypted": {**entry.to_json(), "scheme": "x"}}, "b"))
    _reject("malformed", lambda: fmt.Encryption.from_custom({"encrypted": {"scheme": fmt.SCHEME}}, "b"))
    _reject("malformed", lambda: fmt.Encryption.from_custom({"encrypted": "yes"}, "b"))


def _key_file(path: Path, mode: int = 0o600) -> Path:
    path.write_bytes(X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(mode)
    return path


def test_device_key_file(tmp_path: Path) -> None:
    assert isinstance(fmt.load_device_key(_key_file(tmp_path / "k.pem")), X25519PrivateKey)
    with pytest.raises(ConfigError, match=r"mode 0644 lets others read the key"):
        fmt.load_device_key(_key_file(tmp_path / "open.pem", 0o644))
    with pytest.raises(ConfigError, match=r"cannot read it \(No such file"):
        fmt.load_device_key(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_bytes(b"junk")
    (tmp_path / "junk.pem").chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        fmt.load_device_key(tmp_path / "junk.pem")


def test_config_decrypt_key_file_is_relative_to_the_file_and_checked_at_start(tmp_path: Path) -> None:
    (tmp_path / "root.json").write_text('{"signed": {"_type": "root", "version": 1}, "signatures": []}')
    data = {"agent": {"device_id": "pi-1", "state_dir": "state"},
            "trust": {"root": "root.json", "decrypt_key_file": "device.key"}}
    cfg = parse_config(data, env={}, base_dir=tmp_path)
    assert cfg.trust.decrypt_key_file == str(tmp_path / "device.key")
    assert parse_config({**data, "trust": {"root": "root.json"}}, env={}).trust.decrypt_key_file == ""
    with pytest.raises(ConfigError, match=r"\[trust\] decrypt_key_file .*device.key: no such file"):
        check_paths(cfg)
    _key_file(tmp_path / "device.key", 0o640)
    with pytest.raises(ConfigError, match=r"\[trust\] decrypt_key_file .*: mode 0640 lets others read the key"):
        check_paths(cfg)
    (tmp_path / "device.key").chmod(0o600)
    check_paths(cfg)


def test_encrypt_without_a_device_in_the_group_is_refused_before_anything_is_signed(tmp_path: Path) -> None:
    from packager import publish as pub
    from packager import tuf_repo
    from tests.e2e.test_signed_fetch import make_bundle

    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    bundle = make_bundle(tmp_path / "build", "digits", 1)
    with pytest.raises(InputError, match=r"group 'lab' has no active \(unrevoked\) device") as info:
        pub.sign_bundle(repo, bundle, "lab", encrypt=True)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="--encrypt needs --group"):
        pub.sign_bundle(repo, bundle, None, encrypt=True)
    assert tuf_repo.referenced_targets(repo) == {}
    assert not (repo / "content-keys").exists()



def _register(repo: Path, device_id: str, group: str) -> X25519PrivateKey:
    from packager import devices

    key = X25519PrivateKey.generate()
    devices.register(repo, devices.DeviceRecord(device_id, group, 1, devices.public_b64(key.public_key()),
                                                devices.now_iso()))
    return key


def _grants(repo: Path, path: str) -> fmt.Grants:
    from packager import tuf_repo

    return fmt.Grants.parse(tuf_repo.target_file_path(repo, tuf_repo.referenced_targets(repo)[path]).read_bytes(), path)


def test_an_encrypted_bundle_stays_encrypted_and_its_grants_follow_its_groups(tmp_path: Path) -> None:
    """Published again for another group (without --encrypt), rolled out to a third, a device added later, a
    revoked device, unpublished: one ciphertext throughout, grants extended each time, dropped with the bundle."""
    from packager import confidential, devices, tuf_repo
    from packager import publish as pub
    from tests.e2e.test_signed_fetch import make_bundle

    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    keys = {d: _register(repo, d, g) for d, g in (("a1", "a"), ("b1", "b"), ("c1", "c"))}
    bundle = make_bundle(tmp_path / "build", "digits", 1)
    targets, _, sha = pub.sign_bundle(repo, bundle, "a", encrypt=True)
    assert [t.path for t in targets] == ["bundles/digits-1.bundle", "deployments/a.json", "grants/digits-1.json"]
    assert set(_grants(repo, "grants/digits-1.json").wrapped) == {"a1"}
    assert (repo / "content-keys" / "escrow.pem").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")

    _, _, sha_again = pub.sign_bundle(repo, bundle, "b")  # the same bundle for group b: still the same ciphertext
    assert sha_again == sha
    pub.sign_deployment(repo, "c", "bundles/digits-1.bundle", None)  # a rollout to group c
    grants = _grants(repo, "grants/digits-1.json")
    assert set(grants.wrapped) == {"a1", "b1", "c1"} and set(grants.groups) == {"a", "b", "c"}
    info = fmt.key_info("bundles/digits-1.bundle", sha)
    content_keys = {fmt.unwrap_key(grants.wrapped[d], keys[d], info) for d in keys}
    assert len(content_keys) == 1  # one content key, wrapped three times

    keys["b2"] = _register(repo, "b2", "b")
    assert confidential.grant_device(repo, "b2") == confidential.DeviceGrants(["grants/digits-1.json"], {})
    assert confidential.grant_device(repo, "b2").changed == []  # idempotent
    assert fmt.unwrap_key(_grants(repo, "grants/digits-1.json").wrapped["b2"], keys["b2"], info) in content_keys
    assert tuf_repo.referenced_targets(repo)["bundles/digits-1.bundle"].hashes["sha256"] == sha

    devices.mark_revoked(repo, "a1")
    with pytest.raises(InputError, match="revoked"):
        confidential.grant_device(repo, "a1")
    with pytest.raises(InputError, match=r"group 'a' has no active \(unrevoked\) device"):  # a1 was its only one
        pub.sign_bundle(repo, make_bundle(tmp_path / "build", "digits", 2), "a", encrypt=True)
    _, _, sha2 = pub.sign_bundle(repo, make_bundle(tmp_path / "build", "digits", 2), "b", encrypt=True)
    assert set(_grants(repo, "grants/digits-2.json").wrapped) == {"b1", "b2"}
    plain = make_bundle(tmp_path / "plain", "other", 1)
    pub.sign_bundle(repo, plain, "c", no_encrypt=True)  # group c was sent an encrypted bundle: plaintext is explicit
    with pytest.raises(InputError, match="already published unencrypted"):
        pub.sign_bundle(repo, plain, "c", encrypt=True)

    pub.sign_bundle(repo, plain, "a", no_encrypt=True)  # digits-1 deployed nowhere now: unpublishing it drops
    assert (repo / "content-keys" / "digits-1.json").exists()  # its grants and its escrowed content key too
    pub.unpublish(repo, ["digits-1"], None, pub.topics_for("default"), None)
    left = set(tuf_repo.referenced_targets(repo))
    assert not {"bundles/digits-1.bundle", "grants/digits-1.json"} & left and "grants/digits-2.json" in left
    assert not (repo / "content-keys" / "digits-1.json").exists() and (repo / "content-keys" / "digits-2.json").exists()
    assert sha2 != sha


def test_device_add_grants_the_groups_encrypted_bundles_to_the_key_it_writes(tmp_path: Path) -> None:
    """`packager device add` (packager/provision.py) registers the device and re-wraps for it; the decrypt.key it
    writes is what the agent loads as [trust] decrypt_key_file, and it opens the new grant."""
    from packager import provision, tuf_repo
    from packager import publish as pub
    from tests.e2e.test_signed_fetch import make_bundle

    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    _register(repo, "pi-1", "lab")
    _, _, sha = pub.sign_bundle(repo, make_bundle(tmp_path / "build", "digits", 1), "lab", encrypt=True)
    added = provision.add_device(repo, "pi-2", "lab", tmp_path / "pi-2", "mqtts://broker.example:8883")
    assert added.granted == ("grants/digits-1.json",)
    key = fmt.load_device_key(tmp_path / "pi-2" / "decrypt.key")
    wrapped = _grants(repo, "grants/digits-1.json").for_device("pi-2", "bundles/digits-1.bundle", sha)
    assert len(fmt.unwrap_key(wrapped, key, fmt.key_info("bundles/digits-1.bundle", sha))) == fmt.KEY_LEN
    assert provision.add_device(repo, "pi-3", "other", tmp_path / "pi-3", "mqtts://broker.example:8883").granted == ()


def test_encrypt_with_a_shadow_encrypts_both_bundles(tmp_path: Path) -> None:
    from agent.trust.confidential import Encryption
    from packager import publish as pub
    from packager import tuf_repo
    from tests.e2e.test_signed_fetch import make_bundle

    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    _register(repo, "pi-1", "lab")
    v1, v2 = make_bundle(tmp_path / "build", "digits", 1), make_bundle(tmp_path / "build", "digits", 2)
    targets, _, _ = pub.sign_bundle(repo, v1, "lab", shadow=v2, encrypt=True)
    assert [t.path for t in targets] == ["bundles/digits-1.bundle", "deployments/lab.json", "bundles/digits-2.bundle",
                                         "grants/digits-1.json", "grants/digits-2.json"]
    for tf in (targets[0], targets[2]):
        enc = Encryption.from_custom(dict(tf.custom), tf.path)
        assert enc is not None and set(_grants(repo, enc.grants).wrapped) == {"pi-1"}


def test_discarding_a_bundle_deletes_an_encrypted_ones_ciphertext_and_cut_decryption(tmp_path: Path) -> None:
    """A deployment dropped between DOWNLOAD and VERIFY (or killed mid-decryption) leaves its ciphertext in
    encrypted/ and maybe a partly decrypted file: the daemon deletes them with the bundle (agent/deploy/steps.py)."""
    from agent.deploy.machine import BundleRef
    from agent.deploy.steps import release_dir
    from tests.unit.test_steps import Rig

    rig = Rig(tmp_path)
    sha = "cd" * 32
    ref = BundleRef("digits", 3, sha, str(release_dir(tmp_path, "digits", 3, sha)))
    leftovers = [tmp_path / "encrypted" / "digits-3.bundle", tmp_path / "bundles" / ".digits-3.bundle.decrypting",
                 tmp_path / "bundles" / "digits-3.bundle"]
    kept = [tmp_path / "encrypted" / "digits-4.bundle", tmp_path / "bundles" / "digits-4.bundle"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    rig.steps.discard(ref)
    assert [p for p in leftovers if p.exists()] == [] and all(p.exists() for p in kept)


def _repo_with_encrypted_lab(tmp_path: Path) -> Path:
    from packager import publish as pub
    from packager import tuf_repo
    from tests.e2e.test_signed_fetch import make_bundle

    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    _register(repo, "pi-1", "lab")
    pub.sign_bundle(repo, make_bundle(tmp_path / "build", "digits", 1), "lab", encrypt=True)
    return repo


def test_a_group_sent_encrypted_bundles_gets_plaintext_only_with_no_encrypt(tmp_path: Path) -> None:
    """Forgetting --encrypt on the next version (publish or rollout) is refused; --no-encrypt is the explicit way
    out, and it is remembered. A group never sent an encrypted bundle is unaffected."""
    from packager import confidential, tuf_repo
    from packager import publish as pub
    from tests.e2e.test_signed_fetch import make_bundle

    repo = _repo_with_encrypted_lab(tmp_path)
    v2, v3 = make_bundle(tmp_path / "build", "digits", 2), make_bundle(tmp_path / "build", "digits", 3)
    before = set(tuf_repo.referenced_targets(repo))
    with pytest.raises(InputError, match=r"group lab takes encrypted bundles .* --no-encrypt") as info:
        pub.sign_bundle(repo, v2, "lab")
    assert "\n" not in str(info.value) and set(tuf_repo.referenced_targets(repo)) == before
    pub.sign_bundle(repo, v3, None)  # signed for nobody: allowed, but a rollout of it to lab is not
    with pytest.raises(InputError, match="roll out an encrypted version, or pass --no-encrypt"):
        pub.check_deployable(repo, "lab", "bundles/digits-3.bundle", no_encrypt=False)
    with pytest.raises(InputError, match="takes encrypted bundles"):
        pub.sign_deployment(repo, "lab", "bundles/digits-3.bundle", None)
    with pytest.raises(InputError, match="contradict"):
        pub.sign_bundle(repo, v2, "lab", encrypt=True, no_encrypt=True)
    pub.sign_bundle(repo, v2, "other")  # another group: plaintext as ever

    # a repository from before the setting: derived from the grants
    (repo / "content-keys" / "groups.json").unlink()
    assert confidential.group_is_confidential(repo, "lab") and not confidential.group_is_confidential(repo, "other")
    pub.check_deployable(repo, "lab", "bundles/digits-3.bundle", no_encrypt=True)
    assert not confidential.group_is_confidential(repo, "lab")
    pub.sign_deployment(repo, "lab", "bundles/digits-3.bundle", None)  # every later wave passes
    pub.sign_bundle(repo, v2, "lab")


def test_device_add_with_a_broken_bundle_registers_grants_the_rest_and_says_so(tmp_path: Path) -> None:
    """One encrypted bundle whose escrowed key is gone: `device add` grants the others, the device stays registered
    with its files written, and the error (non-zero exit) says to run `packager device grant`."""
    from packager import devices, provision
    from packager import publish as pub
    from packager.errors import RepoError
    from tests.e2e.test_signed_fetch import make_bundle

    repo = _repo_with_encrypted_lab(tmp_path)
    pub.sign_bundle(repo, make_bundle(tmp_path / "build", "digits", 2), "lab", encrypt=True)
    escrowed = repo / "content-keys" / "digits-1.json"
    saved = escrowed.read_bytes()
    escrowed.unlink()
    with pytest.raises(RepoError, match=r"pi-2 is registered .* not granted bundles/digits-1.bundle .* "
                                        r"`packager device grant pi-2`") as info:
        provision.add_device(repo, "pi-2", "lab", tmp_path / "pi-2", "mqtts://broker.example:8883")
    assert "\n" not in str(info.value)
    assert devices.get(repo, "pi-2").revoked is None and (tmp_path / "pi-2" / "decrypt.key").exists()
    assert "pi-2" in _grants(repo, "grants/digits-2.json").wrapped
    assert "pi-2" not in _grants(repo, "grants/digits-1.json").wrapped
    escrowed.write_bytes(b"{}")  # still broken: `device grant` pushes what it can and fails the same way
    with pytest.raises(RepoError, match=r"not granted bundles/digits-1\.bundle"):
        pub.grant(repo, "pi-2", None, pub.topics_for("default"), None)
    escrowed.write_bytes(saved)
    changed, _ = pub.grant(repo, "pi-2", None, pub.topics_for("default"), None)
    assert changed == ["grants/digits-1.json"] and "pi-2" in _grants(repo, "grants/digits-1.json").wrapped


def test_grants_the_devices_would_refuse_are_never_signed(tmp_path: Path) -> None:
    from packager import confidential, tuf_repo
    from packager import publish as pub
    from tests.e2e.test_signed_fetch import make_bundle

    repo = _repo_with_encrypted_lab(tmp_path)
    size = len(_grants(repo, "grants/digits-1.json").to_bytes())
    _register(repo, "pi-2", "lab")
    before = tuf_repo.referenced_targets(repo)["grants/digits-1.json"].hashes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fmt, "MAX_GRANTS_BYTES", size + 10)  # room for one device's grant, not two
        assert confidential.grant_device(repo, "pi-2").failed.keys() == {"bundles/digits-1.bundle"}
        assert tuf_repo.referenced_targets(repo)["grants/digits-1.json"].hashes == before
        with pytest.raises(InputError, match=r"grants/digits-2.json would be \d+ bytes, more than"):
            pub.sign_bundle(repo, make_bundle(tmp_path / "build", "digits", 2), "lab", encrypt=True)
    assert "bundles/digits-2.bundle" not in tuf_repo.referenced_targets(repo)


def test_re_granting_holds_the_grants_lock_and_drops_revoked_devices(tmp_path: Path) -> None:
    import fcntl
    import threading

    from packager import confidential, devices

    repo = _repo_with_encrypted_lab(tmp_path)
    (repo / "content-keys").chmod(0o755)
    _register(repo, "pi-2", "lab")
    devices.mark_revoked(repo, "pi-1")
    done = threading.Event()
    with (repo / "content-keys" / ".grants.lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: (confidential.grant_device(repo, "pi-2"), done.set()))
        worker.start()
        assert not done.wait(0.5)  # waits for whoever holds the lock between reading and re-signing the grants
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    worker.join(timeout=30)
    assert done.is_set()
    assert set(_grants(repo, "grants/digits-1.json").wrapped) == {"pi-2"}  # the revoked pi-1's entry is gone
    assert (repo / "content-keys").stat().st_mode & 0o777 == 0o700
