"""Private keys at rest: every private key the packager writes (TUF online and root keys, the fleet CA, its own
broker identity, bundle content keys) is PKCS#8 PEM encrypted with a passphrase (cryptography's
BestAvailableEncryption), written 0600 from creation and never overwritten (`reencrypt` replaces a legacy plaintext
key by its encrypted copy in one rename).

The passphrase comes from, in order: `EDGESHIP_KEY_PASSPHRASE`; the file
`$CREDENTIALS_DIRECTORY/edgeship-key-passphrase` (systemd's `LoadCredential=`/`LoadCredentialEncrypted=`, so a
service never has it in its environment); a prompt when stdin is a terminal. Root keys: `EDGESHIP_ROOT_KEY_PASSPHRASE`,
else `EDGESHIP_KEY_PASSPHRASE`, else a prompt, and never the systemd credential (a service holding the online
passphrase must not open root keys with it); `packager keys init` warns when both passphrases are the same.
Nothing of this is our own cryptography: the encryption of the PEM is cryptography's (PBES2 today: PBKDF2-HMAC-SHA256
with 2048 iterations and AES-256-CBC, whatever `BestAvailableEncryption` picks tomorrow). 2048 iterations slow a
guesser little, so the passphrase itself must be strong: MIN_PASSPHRASE characters at least, a random one for
services (docs/security.md).
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from agent.fsutil import fsync_dir
from packager.errors import RepoError

log = logging.getLogger(__name__)

PASSPHRASE_ENV = "EDGESHIP_KEY_PASSPHRASE"
ROOT_PASSPHRASE_ENV = "EDGESHIP_ROOT_KEY_PASSPHRASE"
CREDENTIAL_NAME = "edgeship-key-passphrase"
MIN_PASSPHRASE = 12

KeyKind = Literal["online", "root"]
_cache: dict[KeyKind, bytes] = {}
# Typed once at a prompt and no key has decrypted with it yet: the first key written with it asks again.
_unconfirmed: set[KeyKind] = set()


def passphrase(kind: KeyKind = "online", *, confirm: bool = False) -> bytes:
    """The passphrase for `kind` keys (see the module doc); RepoError when there is none to be had. `confirm`:
    the keys are about to be created, so a prompt asks twice (a typo would lock them away for good)."""
    if kind in _cache:
        if confirm and kind in _unconfirmed:
            _confirm(kind)
        return _cache[kind]
    names = (ROOT_PASSPHRASE_ENV, PASSPHRASE_ENV) if kind == "root" else (PASSPHRASE_ENV,)
    value = next((os.environ[n] for n in names if os.environ.get(n)), None)
    if value is None and kind == "online":
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        cred = Path(cred_dir) / CREDENTIAL_NAME if cred_dir else None
        if cred is not None and cred.is_file():
            try:
                value = cred.read_text().rstrip("\n")
            except (OSError, UnicodeDecodeError) as e:
                raise RepoError(f"cannot read the key passphrase credential {cred}: {e}") from e
    prompted = value is None and sys.stdin.isatty()
    if prompted:
        value = _prompt(kind, confirm)
    if value is None:
        credential = f", or the systemd credential {CREDENTIAL_NAME}" if kind == "online" else ""
        raise RepoError(f"the {kind} private keys are encrypted at rest and no passphrase was given: set "
                        f"{' or '.join(names)}{credential} (or run in a terminal to be asked; docs/security.md)")
    if len(value) < MIN_PASSPHRASE:
        raise RepoError(f"the key passphrase is too short: at least {MIN_PASSPHRASE} characters")
    _cache[kind] = value.encode()
    if prompted and not confirm:
        _unconfirmed.add(kind)
    return _cache[kind]


def _prompt(kind: KeyKind, confirm: bool) -> str:
    try:
        value = getpass.getpass(f"passphrase for the packager's {kind} keys: ")
        if confirm and getpass.getpass(f"the {kind} keys' passphrase again: ") != value:
            raise RepoError("the two passphrases differ; nothing written")
    except EOFError as e:
        raise RepoError(f"no passphrase given for the packager's {kind} keys") from e
    return value


def _confirm(kind: KeyKind) -> None:
    try:
        again = getpass.getpass(f"the {kind} keys' passphrase again: ").encode()
    except EOFError as e:
        raise RepoError(f"no passphrase given for the packager's {kind} keys") from e
    if again != _cache[kind]:
        del _cache[kind]
        _unconfirmed.discard(kind)
        raise RepoError("the two passphrases differ; nothing written")
    _unconfirmed.discard(kind)


def forget_passphrases() -> None:
    """Drop cached passphrases (tests that change the environment)."""
    _cache.clear()
    _unconfirmed.clear()


def encrypted_pem(key: PrivateKeyTypes, kind: KeyKind = "online") -> bytes:
    """`key` as encrypted PKCS#8 PEM; a passphrase typed only once and not yet proven by a key is asked again."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(passphrase(kind, confirm=True)))


def write_private_key(path: Path, key: PrivateKeyTypes, kind: KeyKind = "online") -> Path:
    """Write `key` encrypted to a new file `path` (0600 from creation, O_EXCL: a key is never overwritten)."""
    data = encrypted_pem(key, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_new_private_file(path, data)
    except FileExistsError as e:
        raise RepoError(f"{path}: a key is already there; keys are never overwritten") from e
    fsync_dir(path.parent)
    return path


def reencrypt(path: Path, kind: KeyKind = "online") -> bool:
    """Encrypt the legacy plaintext key `path` in place: the encrypted copy is written beside it (0600, fsynced)
    and renamed over it, so the key is never missing nor half-written. False when it already was encrypted."""
    plain = _read(path)
    if is_encrypted(plain):
        return False
    try:
        key = serialization.load_pem_private_key(plain, None)
    except (ValueError, TypeError) as e:
        raise RepoError(f"cannot load private key {path}: {e}") from e
    data = encrypted_pem(key, kind)
    tmp = path.with_name(f".{path.name}.encrypting")
    tmp.unlink(missing_ok=True)  # ours, left by a crash before its rename: the plaintext original is still there
    try:
        write_new_private_file(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RepoError(f"cannot encrypt private key {path}: {e.strerror or e}") from e
    fsync_dir(path.parent)
    return True


def same_passphrases() -> bool:
    """Whether the root and the online keys were given the same passphrase (both already asked for)."""
    return "root" in _cache and _cache.get("root") == _cache.get("online")


def key_files(directory: Path) -> list[Path]:
    """The `*.pem` files of a key directory the packager owns, its subdirectories (`retired/`) included."""
    return sorted(directory.rglob("*.pem")) if directory.is_dir() else []


def encrypt_plaintext_keys(candidates: list[Path], kind: KeyKind = "online") -> list[Path]:
    """`reencrypt` every plaintext private key among `candidates` (files the packager wrote its own keys to; those
    missing or holding no private key are skipped); returns those it encrypted. The keys already encrypted among
    them are read first, so a passphrase other than theirs fails before anything is written."""
    found = [p for p in candidates if p.is_file() and not p.is_symlink() and b"PRIVATE KEY-----" in _read(p)]
    passphrase(kind, confirm=True)
    for path in found:
        if is_encrypted(_read(path)):
            load_private_key(path, kind)
    return [p for p in sorted(found) if reencrypt(p, kind)]


def check_passphrase_against(directory: Path, kind: KeyKind = "online") -> None:
    """Before a new key is written beside the repository's existing ones (the fleet CA, the escrow key): load one
    encrypted `*.pem` of `directory` with the passphrase at hand, so a new key never ends up under a passphrase its
    siblings do not share (RepoError, nothing written). A directory with no encrypted key proves nothing: the
    passphrase is then only confirmed (asked twice at a prompt)."""
    existing = sorted(p for p in directory.glob("*.pem") if p.is_file() and is_encrypted(_read(p)))
    passphrase(kind, confirm=not existing)
    if existing:
        load_private_key(existing[0], kind)


def private_dir(path: Path) -> Path:
    """`path` as a directory for private keys: created 0700, and made 0700 when it existed with a looser mode
    (mkdir's mode applies only on creation)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_new_private_file(path: Path, data: bytes) -> None:
    """`data` into a new file `path`, 0600 from creation (O_EXCL: FileExistsError if it exists), fsynced; the
    caller fsyncs the directory. Also how `packager device add` writes a device's unencrypted keys."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise RepoError(f"cannot read private key {path}: {e.strerror or e}") from e


def is_encrypted(pem: bytes) -> bool:
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem


def load_private_key(path: Path, kind: KeyKind = "online") -> PrivateKeyTypes:
    """Read a key written by `write_private_key`. An unencrypted key (written before keys were encrypted) still
    loads, with a warning naming `packager keys encrypt`; a wrong passphrase is RepoError."""
    data = _read(path)
    encrypted = is_encrypted(data)
    if not encrypted:
        log.warning("%s is not encrypted at rest: run `packager keys encrypt` (docs/security.md)", path)
    try:
        key = serialization.load_pem_private_key(data, passphrase(kind) if encrypted else None)
    except (ValueError, TypeError) as e:
        why = f"wrong passphrase for the {kind} keys, or a damaged file" if encrypted else str(e)
        raise RepoError(f"cannot load private key {path}: {why}") from e
    if encrypted:
        _unconfirmed.discard(kind)  # a key decrypted with it: no typo
    return key
