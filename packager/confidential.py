"""Confidential models on the packager's side: encrypt a bundle for the devices of a group, keep its content key,
and grant it to devices added later without re-encrypting (docs/security.md, "Confidential models").

Layout of `REPO/content-keys/` (never published; the repository directory stays on the packager host):
    escrow.pem               the repository's X25519 escrow key, encrypted at rest by packager/keystore.py
    <name>-<version>.json    {"bundle", "ciphertext_sha256", "escrow"}: the bundle's content key wrapped (HPKE) for
                             the escrow key, so a later grant needs the key passphrase but never the plaintext
                             (deleted by `packager unpublish` with its bundle)
    groups.json              {group: true|false}: whether a group takes only encrypted bundles (set by an encrypted
                             publish or rollout, cleared by `--no-encrypt`)
    .grants.lock             held from reading a grants document to re-signing it (extend_grants)

The file format, the key wrap and the grants document are agent/trust/confidential.py's: one definition, the one the
device reads.
"""

from __future__ import annotations

import fcntl
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tuf.api.metadata import TargetFile

from agent.bundle import Manifest, sha256_file
from agent.errors import BundleRejected
from agent.fsutil import write_atomic
from agent.trust import confidential as fmt
from packager import devices, keystore, tuf_repo
from packager.errors import InputError, RepoError

log = logging.getLogger(__name__)

CONTENT_KEYS_DIR = "content-keys"
ESCROW_KEY = "escrow.pem"
GROUPS_FILE = "groups.json"
GRANTS_LOCK = ".grants.lock"


def grants_target_path(name: str, version: int) -> str:
    return f"grants/{name}-{version}.json"


def content_keys_dir(repo: Path) -> Path:
    return repo / CONTENT_KEYS_DIR


def _content_keys_made(repo: Path) -> Path:
    """REPO/content-keys, made (0700) before anything is written into it."""
    return keystore.private_dir(content_keys_dir(repo))


def escrow_key(repo: Path) -> X25519PrivateKey:
    """The repository's escrow key, created (encrypted at rest) on first use."""
    path = content_keys_dir(repo) / ESCROW_KEY
    if not path.exists():
        _content_keys_made(repo)
        # under the passphrase the repository's online keys open with, never a new one (that would lock one out)
        keystore.check_passphrase_against(tuf_repo.keys_dir(repo))
        keystore.write_private_key(path, X25519PrivateKey.generate())
        log.info("created the content-key escrow key %s", path)
    key = keystore.load_private_key(path)
    if not isinstance(key, X25519PrivateKey):
        raise RepoError(f"{path} is not an X25519 key")
    return key


@dataclass(frozen=True)
class Encrypted:
    """A bundle encrypted for publishing: the ciphertext file and what its target, and its grants target, sign."""

    ciphertext: Path
    custom: dict[str, Any]  # the bundle target's custom metadata, `encrypted` included
    grants_target: str
    grants_file: Path
    grants_custom: dict[str, Any]


def group_recipients(repo: Path, group: str) -> list[devices.DeviceRecord]:
    """The active devices of `group`; InputError when there is none (nobody could decrypt the bundle)."""
    recipients = devices.active_devices(repo, group)
    if not recipients:
        raise InputError(f"group {group!r} has no active (unrevoked) device in {devices.registry_dir(repo)}: nobody "
                         "could decrypt an encrypted bundle for it (`packager device add` first)")
    return recipients


@contextmanager
def _grants_locked(repo: Path) -> Iterator[None]:
    """Serialises read-modify-write of grants documents and groups.json between packager processes (the TUF
    repository's own lock is taken inside, by tuf_repo.add_targets, and is not re-entrant)."""
    with (_content_keys_made(repo) / GRANTS_LOCK).open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _group_settings(repo: Path) -> dict[str, bool]:
    path = content_keys_dir(repo) / GROUPS_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise RepoError(f"{path} cannot be read: {e}") from e
    if not isinstance(doc, dict) or not all(isinstance(v, bool) for v in doc.values()):
        raise RepoError(f"{path} is not a {{group: true|false}} document")
    return doc


def _store_group_settings(repo: Path, groups: Sequence[str], confidential: bool) -> None:
    """Record `groups` as taking only encrypted bundles (or not); the caller holds _grants_locked."""
    settings = _group_settings(repo)
    if all(settings.get(g) is confidential for g in groups):
        return
    settings.update({g: confidential for g in groups})
    write_atomic(_content_keys_made(repo) / GROUPS_FILE,
                 json.dumps(settings, indent=1, sort_keys=True).encode() + b"\n", mode=0o600)


def set_group_confidential(repo: Path, group: str, confidential: bool) -> None:
    with _grants_locked(repo):
        _store_group_settings(repo, [group], confidential)


def group_is_confidential(repo: Path, group: str) -> bool:
    """Whether `group` takes only encrypted bundles: since an encrypted publish or rollout to it, until a
    `--no-encrypt` says otherwise. (A repository from before this setting: when a signed encrypted bundle is
    granted to the group.)"""
    settings = _group_settings(repo)
    if group in settings:
        return settings[group]
    return any(group in current_grants(repo, enc.grants).groups for _, enc in encrypted_targets(repo).values())


def check_plaintext_allowed(repo: Path, group: str, target_path: str, how: str) -> None:
    """InputError when `target_path` (not encrypted) would reach `group`, which takes only encrypted bundles."""
    if group_is_confidential(repo, group):
        raise InputError(f"group {group} takes encrypted bundles (it was sent one): {target_path} is not encrypted; "
                         f"{how}")


def _check_grants_size(doc: bytes, grants_target: str) -> None:
    """Devices refuse a grants document over MAX_GRANTS_BYTES (too_large): never sign one."""
    if len(doc) > fmt.MAX_GRANTS_BYTES:
        raise InputError(f"{grants_target} would be {len(doc)} bytes, more than the {fmt.MAX_GRANTS_BYTES} a "
                         "device accepts (about 30,000 grants): split the group")


@contextmanager
def encrypt_bundle(repo: Path, bundle: Path, target_path: str, manifest: Manifest, custom: dict[str, Any],
                   groups: Sequence[str]) -> Iterator[Encrypted]:
    """Encrypt `bundle` under a fresh content key, escrow the key, and grant it to the active devices of `groups`.
    The files live in a temporary directory inside REPO until the context ends (tuf_repo copies what it signs)."""
    recipients = [r for g in groups for r in group_recipients(repo, g)]
    escrow = escrow_key(repo)
    key = fmt.new_content_key()
    with tempfile.TemporaryDirectory(prefix=".encrypt-", dir=repo) as tmp:
        ciphertext = Path(tmp) / target_path.rpartition("/")[2]
        with ciphertext.open("wb") as out:
            plain = fmt.encrypt_file(bundle, out, key)
        sha = sha256_file(ciphertext)
        info = fmt.key_info(target_path, sha)
        record = {"bundle": target_path, "ciphertext_sha256": sha,
                  "escrow": fmt.wrap_key(key, escrow.public_key(), info)}
        keys_file = _escrow_record_path(repo, manifest.name, manifest.version)
        write_atomic(keys_file, json.dumps(record, indent=1).encode() + b"\n", mode=0o600)
        grants_path = grants_target_path(manifest.name, manifest.version)
        grants = fmt.Grants(target_path, sha, tuple(groups),
                            {r.device_id: fmt.wrap_key(key, r.public_key, info) for r in recipients})
        grants_file = Path(tmp) / grants_path.rpartition("/")[2]
        grants_bytes = grants.to_bytes()
        _check_grants_size(grants_bytes, grants_path)
        grants_file.write_bytes(grants_bytes)
        with _grants_locked(repo):
            _store_group_settings(repo, groups, True)
        encryption = fmt.Encryption(fmt.SCHEME, grants_path, fmt.Plaintext(plain.sha256, plain.length))
        yield Encrypted(ciphertext, {**custom, "encrypted": encryption.to_json()}, grants_path, grants_file,
                        {"grants_for": target_path})


def _escrow_record_path(repo: Path, name: str, version: int) -> Path:
    return _content_keys_made(repo) / f"{name}-{version}.json"


def forget_content_key(repo: Path, name: str, version: int) -> None:
    """Delete the escrowed content key of an unpublished bundle (nothing can be granted for it any more)."""
    (content_keys_dir(repo) / f"{name}-{version}.json").unlink(missing_ok=True)


def _content_key(repo: Path, tf: TargetFile, name: str, version: int) -> bytes:
    path = _escrow_record_path(repo, name, version)
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise RepoError(f"the content key of {tf.path} cannot be read from {path}: {e}") from e
    sha = tf.hashes["sha256"]
    if not isinstance(record, dict) or record.get("bundle") != tf.path or record.get("ciphertext_sha256") != sha:
        raise RepoError(f"{path} holds the content key of another ciphertext than the signed {tf.path}")
    try:
        return fmt.unwrap_key(str(record["escrow"]), escrow_key(repo), fmt.key_info(tf.path, sha))
    except (BundleRejected, KeyError) as e:
        raise RepoError(f"the escrowed content key of {tf.path} does not open with {ESCROW_KEY}: {e}") from e


def encrypted_targets(repo: Path) -> dict[str, tuple[TargetFile, fmt.Encryption]]:
    """Bundle target path -> (its TargetFile, its signed encryption entry), for every encrypted bundle."""
    out = {}
    for path, tf in tuf_repo.referenced_targets(repo).items():
        enc = fmt.Encryption.from_custom(dict(tf.custom), path)
        if enc is not None:
            out[path] = (tf, enc)
    return out


def current_grants(repo: Path, grants_target: str) -> fmt.Grants:
    tf = tuf_repo.referenced_targets(repo).get(grants_target)
    if tf is None:
        raise RepoError(f"{grants_target} is not signed in {repo}")
    return fmt.Grants.parse(tuf_repo.target_file_path(repo, tf).read_bytes(), grants_target)


def extend_grants(repo: Path, bundle_tf: TargetFile, enc: fmt.Encryption, groups: Sequence[str] = ()) -> bool:
    """Add `groups` to the bundle's grants and wrap its content key for every active device of its groups not
    granted yet; entries of revoked devices are dropped. Re-signs the grants target when anything changed (True
    then). Holds the grants lock from reading the document to re-signing it. The ciphertext, its target and its hash
    stay as they are."""
    with _grants_locked(repo):
        if groups:
            _store_group_settings(repo, groups, True)
        grants = current_grants(repo, enc.grants)
        all_groups = tuple(dict.fromkeys((*grants.groups, *groups)))
        wanted = [r for g in all_groups for r in devices.active_devices(repo, g)]
        missing = [r for r in wanted if r.device_id not in grants.wrapped]
        revoked = {r.device_id for r in devices.all_devices(repo) if r.revoked is not None}
        wrapped = {d: w for d, w in grants.wrapped.items() if d not in revoked}
        if not missing and all_groups == grants.groups and len(wrapped) == len(grants.wrapped):
            return False
        custom: dict[str, Any] = dict(bundle_tf.custom)
        if missing:
            key = _content_key(repo, bundle_tf, str(custom["name"]), int(custom["version"]))
            info = fmt.key_info(bundle_tf.path, bundle_tf.hashes["sha256"])
            wrapped.update({r.device_id: fmt.wrap_key(key, r.public_key, info) for r in missing})
        new = fmt.Grants(grants.bundle, grants.ciphertext_sha256, all_groups, wrapped).to_bytes()
        _check_grants_size(new, enc.grants)
        with tempfile.TemporaryDirectory(prefix=".grant-", dir=repo) as tmp:
            doc = Path(tmp) / enc.grants.rpartition("/")[2]
            doc.write_bytes(new)
            tuf_repo.add_targets(repo, [(enc.grants, doc, {"grants_for": bundle_tf.path})],
                                 chunk_size=tuf_repo.DEFAULT_CHUNK_SIZE)
    log.info("granted %s to %s", bundle_tf.path, ", ".join(r.device_id for r in missing) or "no new device")
    return True


@dataclass(frozen=True)
class DeviceGrants:
    """What grant_device did: the grants targets re-signed (to push), and the bundles it could not grant, why."""

    changed: list[str]
    failed: dict[str, str]  # bundle target path -> the error


def grant_device(repo: Path, device_id: str) -> DeviceGrants:
    """Wrap the content key of every encrypted bundle granted to the device's group for this device (a device
    added after the bundle was published); re-signs those grants targets. A bundle that cannot be granted (its
    escrow record or grants document unreadable, the grants too large) is logged and reported in `failed`; the
    others are granted all the same."""
    record = devices.get(repo, device_id)
    if record.revoked is not None:
        raise InputError(f"device {device_id} was revoked on {record.revoked}: it is granted nothing new")
    changed, failed = [], {}
    for path, (tf, enc) in encrypted_targets(repo).items():
        try:
            if record.group in current_grants(repo, enc.grants).groups and extend_grants(repo, tf, enc):
                changed.append(enc.grants)
                log.info("re-wrapped the content key of %s for %s", path, device_id)
        except (RepoError, InputError, BundleRejected, OSError) as e:
            log.warning("cannot grant %s to %s: %s", path, device_id, e)
            failed[path] = str(e)
    return DeviceGrants(changed, failed)
