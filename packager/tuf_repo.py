"""The packager's TUF repository on disk, built with python-tuf's Metadata API (see docs/transport.md).

Layout of `REPO/`:
    root.json   copy of the newest root, for provisioning devices
    metadata/   <N>.root.json, <N>.targets.json,
                <N>.snapshot.json, timestamp.json
    targets/    <sha256>.<basename> copies of every target (consistent snapshots: a file never changes)
    keys/       online Ed25519 keys for targets, snapshot and timestamp (encrypted PKCS#8 PEM, mode 0600, in a
                0700 directory: packager/keystore.py)
    repo.json   the expiry periods chosen at init, reused by every later signing
Root keys live in a separate directory (default `REPO/../<repo-name>-root-keys/`) meant to be kept offline, encrypted
with the root passphrase; only init and `rotate_keys` read or write them, never publishing or `refresh`.

Every change is one commit: new versioned files are written first (temp file + fsync + os.replace) and
`timestamp.json` last, so a crash leaves either the old or the new repository state visible to clients, never a
mix. Mutating calls hold an exclusive lock on `REPO/.lock` so a cron `refresh` cannot race a `publish`.
Every signing and every metadata write on the packager side is in this module (python-tuf's Metadata API,
securesystemslib's signers). One other packager module imports python-tuf: packager/publish.py takes the
`TargetFile`s this module returns to name what it pushes (hashes, signed chunk plan). The chunk hashes signed here
come from the agent's own `agent.trust.chunks.chunk_hashes`, the definition the agent checks against.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (
    TOP_LEVEL_ROLE_NAMES,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    T,
    TargetFile,
    Targets,
    Timestamp,
)

from agent.fsutil import fsync_dir, write_atomic
from agent.trust.chunks import MAX_CHUNK_SIZE, chunk_hashes  # the agent refuses larger chunks; sign none bigger
from packager import keystore
from packager.errors import RepoError

logger = logging.getLogger(__name__)

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
DEFAULT_CHUNK_SIZE = 128 * 1024
_HASH = "sha256"
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSIONED_RE = re.compile(r"^([1-9][0-9]*)\.(root|targets|snapshot)\.json$")


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        period: timedelta = getattr(self, role)
        return period

    def to_json(self) -> dict[str, float]:
        return {role: self.of(role).total_seconds() for role in ("root", *ONLINE_ROLES)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Expiry:
        return cls(**{role: timedelta(seconds=float(d[role])) for role in ("root", *ONLINE_ROLES)})


# --- paths ---------------------------------------------------------------------------------------------------


def metadata_dir(repo: Path) -> Path:
    return repo / "metadata"


def targets_dir(repo: Path) -> Path:
    return repo / "targets"


def keys_dir(repo: Path) -> Path:
    return repo / "keys"


def default_root_key_dir(repo: Path) -> Path:
    return repo.parent / f"{repo.name}-root-keys"


def provisioning_root(repo: Path) -> Path:
    """The root.json to install on devices (always a copy of the newest `<N>.root.json`)."""
    return repo / "root.json"


def target_file_path(repo: Path, tf: TargetFile) -> Path:
    """Where the repository keeps the bytes of `tf`: `targets/<sha256>.<basename>`."""
    path = targets_dir(repo) / _stored_name(tf)
    if not path.is_file():
        raise RepoError(f"repository {repo} lacks the file for target {tf.path} (expected {path})")
    return path


def _stored_name(tf: TargetFile) -> str:
    return f"{tf.hashes[_HASH]}.{tf.path.rpartition('/')[2]}"


# --- public operations ---------------------------------------------------------------------------------------


def init_repo(repo: Path, root_key_dir: Path | None = None, root_keys: int = 3, root_threshold: int = 2,
              expiry: Expiry = Expiry(), *, now: datetime | None = None) -> None:
    """Create a new repository with fresh keys: root (`root_threshold` of `root_keys`), one key per online role."""
    if not 1 <= root_threshold <= root_keys:
        raise RepoError(f"root threshold must be between 1 and the number of root keys ({root_keys}), "
                        f"got {root_threshold}")
    root_key_dir = root_key_dir if root_key_dir is not None else default_root_key_dir(repo)
    if metadata_dir(repo).exists() or (repo / "repo.json").exists():
        raise RepoError(f"{repo} already holds a TUF repository; refusing to overwrite it")
    if root_key_dir.exists() and any(root_key_dir.glob("*.pem")):
        raise RepoError(f"root key directory {root_key_dir} already holds keys; refusing to mix key sets")
    now = _now(now)
    # Both passphrases before anything is written: none to be had leaves no half-made repository behind.
    keystore.passphrase("root", confirm=True)
    keystore.passphrase("online", confirm=True)
    for d in (metadata_dir(repo), targets_dir(repo)):
        d.mkdir(parents=True, exist_ok=True)
    keystore.private_dir(keys_dir(repo))
    keystore.private_dir(root_key_dir)
    write_atomic(repo / "repo.json", json.dumps({"expiry_seconds": expiry.to_json()}, indent=2).encode() + b"\n")

    root = Root(expires=now + expiry.root, consistent_snapshot=True)
    root_signers = [_new_key(root_key_dir, "root") for _ in range(root_keys)]
    for s in root_signers:
        root.add_key(s.public_key, "root")
    root.roles["root"].threshold = root_threshold
    signers: dict[str, list[Signer]] = {"root": list(root_signers)}
    for role in ONLINE_ROLES:
        s = _new_key(keys_dir(repo), role)
        root.add_key(s.public_key, role)
        signers[role] = [s]

    root_md = Metadata(root)
    _sign(root_md, root_signers)
    state = _State(
        root=root_md,
        targets=Metadata(Targets(expires=now + expiry.targets)),
        snapshot=Metadata(Snapshot(expires=now + expiry.snapshot)),
        timestamp=Metadata(Timestamp(expires=now + expiry.timestamp)),
    )
    _commit(repo, state, set(ONLINE_ROLES), signers, now, expiry, bump=False, new_root=True)
    logger.info("initialised TUF repository %s (root keys in %s)", repo, root_key_dir)


def add_target(repo: Path, target_path: str, data_file: Path, custom: Mapping[str, Any] | None = None,
               chunk_size: int = DEFAULT_CHUNK_SIZE, *, now: datetime | None = None) -> TargetFile:
    """Add (or replace) one target; see add_targets."""
    return add_targets(repo, [(target_path, data_file, custom or {})], chunk_size, now=now)[0]


def add_targets(repo: Path, items: Sequence[tuple[str, Path, Mapping[str, Any]]],
                chunk_size: int = DEFAULT_CHUNK_SIZE, *, now: datetime | None = None) -> list[TargetFile]:
    """Add several targets in one new targets/snapshot/timestamp version (a bundle and its deployment doc).

    Each file is copied to `targets/<sha256>.<basename>`; its signed custom metadata is `custom` plus
    `chunk_size` and `chunks` (sha256 of each chunk) so agents can check every chunk as it arrives.
    """
    if not items:
        raise RepoError("no targets given")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise RepoError(f"chunk size must be between 1 and {MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    paths = [p for p, _, _ in items]
    if len(set(paths)) != len(paths):
        raise RepoError("the same target path is given twice")
    for p in paths:
        _check_target_path(p)
    with _locked(repo):
        state = _load(repo)
        signers = _online_signers(repo, state.root.signed, ["targets", "snapshot", "timestamp"])
        added = []
        for target_path, data_file, custom in items:
            tf = _store_target(repo, target_path, data_file, custom, chunk_size)
            state.targets.signed.targets[target_path] = tf
            added.append(tf)
        _commit(repo, state, {"targets"}, signers, _now(now), _read_expiry(repo))
    return added


def remove_target(repo: Path, target_path: str, *, now: datetime | None = None) -> None:
    """Drop `target_path` from the targets metadata (new version). The stored file stays: older snapshots that
    clients may still be reading refer to it."""
    with _locked(repo):
        state = _load(repo)
        if target_path not in state.targets.signed.targets:
            raise RepoError(f"{target_path} is not a target of repository {repo}")
        signers = _online_signers(repo, state.root.signed, ["targets", "snapshot", "timestamp"])
        del state.targets.signed.targets[target_path]
        _commit(repo, state, {"targets"}, signers, _now(now), _read_expiry(repo))


def refresh(repo: Path, force_snapshot: bool = False, *, now: datetime | None = None) -> list[str]:
    """Re-sign timestamp (always), snapshot and targets (when forced or within half their period of expiring).

    Run it well within the timestamp period (e.g. every few hours): devices refuse expired metadata.
    Returns the metadata file names written.
    """
    with _locked(repo):
        state = _load(repo)
        expiry = _read_expiry(repo)
        now = _now(now)
        changed = {"timestamp"}
        if force_snapshot or _due(state.snapshot.signed, expiry.snapshot, now):
            changed.add("snapshot")
        if _due(state.targets.signed, expiry.targets, now):
            changed.add("targets")
        if _due(state.root.signed, expiry.root, now):
            # Root keys are offline: say so loudly instead of failing the online refresh.
            logger.warning("root metadata of %s expires at %s: sign a new root (rotate_keys) before then",
                           repo, state.root.signed.expires.isoformat())
        roles = _cascade(changed)
        signers = _online_signers(repo, state.root.signed, sorted(roles))
        return _commit(repo, state, changed, signers, now, expiry)


def rotate_keys(repo: Path, role: str, root_key_dir: Path | None = None, *, now: datetime | None = None) -> None:
    """Replace the key(s) of `role` and publish a new root listing them.

    The new root is signed by the current root keys (at least their threshold); for a root rotation also by the
    new root keys, so clients can verify the chain old -> new. Replaced key files are moved to `retired/`
    beside them, never deleted. For an online role its metadata (and snapshot/timestamp) is re-signed with the
    new key in the same commit.
    """
    if role not in TOP_LEVEL_ROLE_NAMES:
        raise RepoError(f"unknown role {role!r}; expected one of {', '.join(sorted(TOP_LEVEL_ROLE_NAMES))}")
    root_key_dir = root_key_dir if root_key_dir is not None else default_root_key_dir(repo)
    with _locked(repo):
        state = _load(repo)
        expiry = _read_expiry(repo)
        now = _now(now)
        old_root = state.root.signed
        root_keys = _load_keys(root_key_dir, "root")
        old_root_signers = _signers(root_keys, root_key_dir, old_root, "root")
        # Every key of the directory the new one joins is read first: it is then written under the passphrase
        # they were read with, never under a mistyped one.
        key_dir = root_key_dir if role == "root" else keys_dir(repo)
        dir_keys = root_keys if role == "root" else _load_keys(key_dir)
        new_root = Metadata[Root].from_bytes(state.raw["root"]).signed
        new_root.version += 1
        new_root.expires = now + expiry.root
        old_keyids = list(new_root.roles[role].keyids)
        # Saved before the commit: an unreferenced key after a crash is harmless, a lost one is not.
        new_signers = [_new_key(key_dir, role, dir_keys) for _ in range(max(1, len(old_keyids)))]
        for keyid in old_keyids:
            new_root.revoke_key(keyid, role)
        for s in new_signers:
            new_root.add_key(s.public_key, role)

        root_md = Metadata(new_root)
        if role == "root":
            _sign(root_md, [*old_root_signers, *new_signers])
        else:
            _sign(root_md, old_root_signers)
        result = new_root.get_root_verification_result(old_root, root_md.signed_bytes, root_md.signatures)
        if not result.verified:
            raise RepoError(f"new root v{new_root.version} would not verify against v{old_root.version}; "
                            "nothing written")
        state.root = root_md
        if role == "root":
            _commit(repo, state, set(), {}, now, expiry, new_root=True)
        else:
            signers = _online_signers(repo, new_root, sorted(_cascade({role})), fresh={role: new_signers},
                                      available=dir_keys)
            _commit(repo, state, {role}, signers, now, expiry, new_root=True)
        _retire_keys(key_dir, dir_keys, old_keyids)
    logger.info("rotated %s key(s) of %s; root is now v%d", role, repo, new_root.version)


def current_metadata(repo: Path) -> dict[str, bytes]:
    """The metadata a client may fetch, named as on the wire: every `<N>.root.json`, `timestamp.json` and the
    current `<N>.snapshot.json` and `<N>.targets.json`."""
    state = _load(repo)
    out = {f"{v}.root.json": _read(metadata_dir(repo) / f"{v}.root.json") for v in _root_versions(repo)}
    out[f"{state.snapshot.signed.version}.snapshot.json"] = state.raw["snapshot"]
    out[f"{state.targets.signed.version}.targets.json"] = state.raw["targets"]
    out["timestamp.json"] = state.raw["timestamp"]
    return out


def referenced_targets(repo: Path) -> dict[str, TargetFile]:
    """Target path -> TargetFile of the current targets metadata."""
    return dict(_load(repo).targets.signed.targets)


# --- loading -------------------------------------------------------------------------------------------------


@dataclass
class _State:
    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]
    # Bytes as they are on disk: meta hashes must be over exactly these bytes.
    raw: dict[str, bytes] = field(default_factory=dict)


def _load(repo: Path) -> _State:
    """Read the current state by following timestamp -> snapshot -> targets, and check every signature."""
    mdir = metadata_dir(repo)
    if not mdir.is_dir():
        raise RepoError(f"no TUF repository at {repo} (missing {mdir}); create one with init")
    versions = _root_versions(repo)
    if not versions:
        raise RepoError(f"corrupt repository {repo}: no <N>.root.json in {mdir}")
    raw = {"root": _read(mdir / f"{versions[-1]}.root.json"), "timestamp": _read(mdir / "timestamp.json")}
    root = _parse(raw["root"], Root, f"{versions[-1]}.root.json")
    timestamp = _parse(raw["timestamp"], Timestamp, "timestamp.json")
    snap_name = f"{timestamp.signed.snapshot_meta.version}.snapshot.json"
    raw["snapshot"] = _read(mdir / snap_name)
    snapshot = _parse(raw["snapshot"], Snapshot, snap_name)
    targets_meta = snapshot.signed.meta.get("targets.json")
    if targets_meta is None:
        raise RepoError(f"corrupt repository {repo}: {snap_name} does not list targets.json")
    targets_name = f"{targets_meta.version}.targets.json"
    raw["targets"] = _read(mdir / targets_name)
    targets = _parse(raw["targets"], Targets, targets_name)
    # Refuse to re-sign anything that is not what we signed (a tampered or half-restored repository).
    try:
        root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
        for md in (timestamp, snapshot, targets):
            root.signed.verify_delegate(md.signed.type, md.signed_bytes, md.signatures)
    except RepositoryError as e:
        raise RepoError(f"corrupt repository {repo}: {e}") from e
    return _State(root, targets, snapshot, timestamp, raw)


def _root_versions(repo: Path) -> list[int]:
    versions = []
    for p in metadata_dir(repo).glob("*.root.json"):
        m = _VERSIONED_RE.fullmatch(p.name)
        if m:
            versions.append(int(m.group(1)))
    return sorted(versions)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise RepoError(f"corrupt repository: cannot read {path}: {e.strerror}") from e


def _parse(data: bytes, cls: type[T], name: str) -> Metadata[T]:
    try:
        md = Metadata[T].from_bytes(data)
    except RepositoryError as e:
        raise RepoError(f"corrupt repository: {name} is not valid TUF metadata: {e}") from e
    if not isinstance(md.signed, cls):
        raise RepoError(f"corrupt repository: {name} holds {md.signed.type} metadata")
    return md


def _read_expiry(repo: Path) -> Expiry:
    path = repo / "repo.json"
    if not path.exists():
        return Expiry()
    try:
        return Expiry.from_json(json.loads(path.read_bytes())["expiry_seconds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RepoError(f"corrupt repository: cannot read expiry periods from {path}: {e}") from e


# --- keys ----------------------------------------------------------------------------------------------------


_Keys = dict[str, tuple[Path, CryptoSigner]]


def _kind(role: str) -> keystore.KeyKind:
    return "root" if role == "root" else "online"


def _new_key(directory: Path, role: str, into: _Keys | None = None) -> CryptoSigner:
    """A fresh Ed25519 key for `role`, written encrypted to `directory` (keystore: 0600, O_EXCL) and added to
    `into` when given. The signer is built from the key object: securesystemslib's `private_bytes` is plaintext."""
    keystore.private_dir(directory)
    key = Ed25519PrivateKey.generate()
    signer = CryptoSigner(key)
    path = keystore.write_private_key(directory / f"{role}-{signer.public_key.keyid[:16]}.pem", key, _kind(role))
    if into is not None:
        into[signer.public_key.keyid] = (path, signer)
    return signer


def _load_keys(directory: Path, kind: keystore.KeyKind = "online") -> _Keys:
    """keyid -> (file, signer) for every PEM key in `directory` (keys are matched by id, not by file name), each
    decrypted once per operation."""
    out: _Keys = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.pem")):
        try:
            signer = CryptoSigner(keystore.load_private_key(path, kind))
        except ValueError as e:  # a key type securesystemslib cannot sign with
            raise RepoError(f"cannot load private key {path}: {e}") from e
        out[signer.public_key.keyid] = (path, signer)
    return out


def _signers(available: _Keys, directory: Path, root: Root, role: str) -> list[Signer]:
    wanted = root.roles[role]
    found: list[Signer] = [available[k][1] for k in wanted.keyids if k in available]
    if len(found) < wanted.threshold:
        raise RepoError(f"{role} needs {wanted.threshold} of its keys to sign but {directory} holds "
                        f"{len(found)} of them")
    return found


def _online_signers(repo: Path, root: Root, roles: Iterable[str], fresh: Mapping[str, list[CryptoSigner]] | None = None,
                    available: _Keys | None = None) -> dict[str, list[Signer]]:
    """Signers for the online `roles` from REPO/keys (read once, or `available` when already read); the root
    keys are never touched."""
    fresh = fresh or {}
    roles = list(roles)
    if available is None and any(r not in fresh for r in roles):
        available = _load_keys(keys_dir(repo))
    return {r: list(fresh[r]) if r in fresh else _signers(available or {}, keys_dir(repo), root, r) for r in roles}


def _retire_keys(directory: Path, available: _Keys, keyids: Iterable[str]) -> None:
    """Move replaced keys to `retired/` (kept, e.g. to sign a recovery root, never deleted)."""
    retired = directory / "retired"
    for keyid in keyids:
        if keyid in available:
            keystore.private_dir(retired)
            path = available[keyid][0]
            os.replace(path, retired / path.name)
    fsync_dir(directory)


# --- writing -------------------------------------------------------------------------------------------------


def _cascade(changed: set[str]) -> set[str]:
    """A new targets needs a new snapshot, a new snapshot a new timestamp."""
    roles = set(changed)
    if "targets" in roles:
        roles.add("snapshot")
    if "snapshot" in roles:
        roles.add("timestamp")
    return roles


def _commit(repo: Path, state: _State, changed: set[str], signers: Mapping[str, list[Signer]], now: datetime,
            expiry: Expiry, bump: bool = True, new_root: bool = False) -> list[str]:
    """Sign the changed online roles (and what depends on them) and write one consistent new state.

    Order: versioned targets/snapshot, then the root, then timestamp.json, the one file that makes the new state
    visible. Returns the file names written.
    """
    roles = _cascade(changed)
    mdir = metadata_dir(repo)
    writes: list[tuple[str, bytes]] = []
    if "targets" in roles:
        data = _resign(state.targets, signers["targets"], now + expiry.targets, bump)
        state.raw["targets"] = data
        writes.append((f"{state.targets.signed.version}.targets.json", data))
    if "snapshot" in roles:
        state.snapshot.signed.meta["targets.json"] = _metafile(state.targets.signed.version, state.raw["targets"])
        data = _resign(state.snapshot, signers["snapshot"], now + expiry.snapshot, bump)
        state.raw["snapshot"] = data
        writes.append((f"{state.snapshot.signed.version}.snapshot.json", data))
    if new_root:
        data = state.root.to_bytes()
        state.raw["root"] = data
        writes.append((f"{state.root.signed.version}.root.json", data))
        writes.append(("root.json", data))
    if "timestamp" in roles:
        state.timestamp.signed.snapshot_meta = _metafile(state.snapshot.signed.version, state.raw["snapshot"])
        data = _resign(state.timestamp, signers["timestamp"], now + expiry.timestamp, bump)
        state.raw["timestamp"] = data
        writes.append(("timestamp.json", data))
    for name, data in writes:
        write_atomic(provisioning_root(repo) if name == "root.json" else mdir / name, data)
    return [name for name, _ in writes]


def _resign(md: Metadata[Any], signers: Sequence[Signer], expires: datetime, bump: bool) -> bytes:
    if bump:
        md.signed.version += 1
    md.signed.expires = expires
    _sign(md, signers)
    data: bytes = md.to_bytes()
    return data


def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)


def _metafile(version: int, data: bytes) -> MetaFile:
    # Length bounds the client's download; the hash pins the exact file (mix-and-match protection).
    return MetaFile(version=version, length=len(data), hashes={_HASH: hashlib.sha256(data).hexdigest()})


def _store_target(repo: Path, target_path: str, data_file: Path, custom: Mapping[str, Any],
                  chunk_size: int) -> TargetFile:
    """Copy `data_file` into `targets/<sha256>.<basename>`, hashing the whole file and each chunk in one pass."""
    try:
        json.dumps(dict(custom))
    except (TypeError, ValueError) as e:
        raise RepoError(f"custom metadata for {target_path} is not JSON: {e}") from e
    tdir = targets_dir(repo)
    fd, tmp_name = tempfile.mkstemp(prefix=".incoming.", suffix=".tmp", dir=tdir)
    try:
        whole = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, data_file.open("rb") as f:

            def copy(chunk: bytes) -> None:
                whole.update(chunk)
                out.write(chunk)

            chunks = chunk_hashes(f, chunk_size, each=copy)  # the agent's definition: what it checks is what we sign
            length = out.tell()
            out.flush()
            os.fsync(out.fileno())
        tf = TargetFile(length, {_HASH: whole.hexdigest()}, target_path,
                        {"custom": {**custom, "chunk_size": chunk_size, "chunks": chunks}})
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, tdir / _stored_name(tf))  # content-addressed: same name means same bytes
    except OSError as e:
        raise RepoError(f"cannot add target {target_path} from {data_file}: {e.strerror or e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    fsync_dir(tdir)
    return tf


def _check_target_path(path: str) -> None:
    parts = path.split("/")
    if not all(_SEGMENT_RE.fullmatch(p) for p in parts) or any(set(p) == {"."} for p in parts):
        raise RepoError(f"invalid target path {path!r}: use relative segments of letters, digits, '.', '_', '-'")


@contextlib.contextmanager
def _locked(repo: Path) -> Iterator[None]:
    if not metadata_dir(repo).is_dir():
        raise RepoError(f"no TUF repository at {repo} (missing {metadata_dir(repo)}); create one with init")
    with (repo / ".lock").open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def _due(signed: Signed, period: timedelta, now: datetime) -> bool:
    """Re-sign once less than half the period is left."""
    return signed.expires - now < period / 2
