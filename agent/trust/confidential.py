"""Encrypted bundles: the one definition of their format, used by the packager to write them and by the fetch worker
to read them (docs/security.md, "Confidential models"; docs/bundle-format.md, "Encrypted bundles").

An encrypted bundle is a TUF target like any other: TUF signs and verifies the ciphertext. Its file is

    header   magic b"EDGESHIP-ENC", format version (1 byte, 1), algorithm (1 byte, 1 = AES-256-GCM), 12-byte nonce
    body     the bundle encrypted with AES-256-GCM under a fresh random 32-byte content key, the header as AAD
    tag      the 16-byte GCM tag

The content key reaches a device wrapped for that device's X25519 key with HPKE (RFC 9180, base mode,
DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM; cryptography's implementation), in a grants document that is
its own signed TUF target (`grants/<name>-<version>.json`). The HPKE `info` names the bundle's target path and the
ciphertext's sha256, so a wrapped key cannot be moved to another bundle. Nothing here is our own cryptography:
AES-GCM and HPKE are cryptography's; this module only frames them.

Decryption streams: the device holds one block of the bundle in memory at a time. GCM's tag is checked only at the
end, so plaintext reaches a temporary file before it is authenticated; that is safe here because the ciphertext was
already verified against its signed sha256 by TUF before the first byte is decrypted, the plaintext is checked
against its own signed sha256 and length afterwards, the temporary file lives in the 0700 state directory, and it
is deleted on any failure before anything reads it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.config import refuse_loose_key_mode
from agent.errors import BundleRejected, ConfigError, TransportError
from agent.fsutil import fsync_dir

SCHEME = "aes-256-gcm+hpke-x25519-sha256-aes-256-gcm/1"  # names the file format and the key wrap together
MAGIC = b"EDGESHIP-ENC"
FORMAT_VERSION = 1
ALG_AES_256_GCM = 1
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 32
_HEADER = struct.Struct(f"!{len(MAGIC)}sBB{NONCE_LEN}s")
HEADER_LEN = _HEADER.size
BLOCK = 1 << 20  # bytes in memory at once while encrypting or decrypting
GRANTS_SCHEMA = 1
MAX_GRANTS_BYTES = 4 << 20  # ~30,000 devices' grants; a document beyond this is refused before parsing
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_INFO_LABEL = b"edgeship content key/1"


@dataclass(frozen=True)
class Header:
    nonce: bytes

    def to_bytes(self) -> bytes:
        return _HEADER.pack(MAGIC, FORMAT_VERSION, ALG_AES_256_GCM, self.nonce)

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """The header at the start of `data`; anything else is BundleRejected "format"."""
        if len(data) < HEADER_LEN:
            raise BundleRejected("encrypted bundle: shorter than its header", reason="format")
        magic, version, alg, nonce = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BundleRejected("encrypted bundle: not an edgeship encrypted bundle (bad magic)", reason="format")
        if version != FORMAT_VERSION or alg != ALG_AES_256_GCM:
            raise BundleRejected(f"encrypted bundle: unknown format version {version} or algorithm {alg}",
                                 reason="format")
        return cls(nonce)


@dataclass(frozen=True)
class Plaintext:
    sha256: str
    length: int


def new_content_key() -> bytes:
    return os.urandom(KEY_LEN)


def encrypt_file(src: Path, dst: IO[bytes], key: bytes) -> Plaintext:
    """Write `src` encrypted under `key` to `dst` (header, body, tag); the plaintext's sha256 and length."""
    header = Header(os.urandom(NONCE_LEN))
    enc = Cipher(algorithms.AES(key), modes.GCM(header.nonce)).encryptor()
    enc.authenticate_additional_data(header.to_bytes())
    dst.write(header.to_bytes())
    digest, length = hashlib.sha256(), 0
    with src.open("rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
            length += len(block)
            dst.write(enc.update(block))
    dst.write(enc.finalize())
    dst.write(enc.tag)
    return Plaintext(digest.hexdigest(), length)


def decrypt_file(src: Path, dst: Path, key: bytes, expected: Plaintext) -> None:
    """Decrypt `src` into the new file `dst` (0600), streaming; `dst` exists afterwards only if the GCM tag, the
    plaintext's sha256 and its length all check out. BundleRejected "format", "size_mismatch", "decrypt_failed",
    "hash_mismatch" or "unreadable" (the ciphertext); TransportError "no_space" when `dst` cannot be written (a full
    disk is no verdict on the bundle: the caller keeps the ciphertext and retries), checked up front too."""
    free = shutil.disk_usage(dst.parent).free
    if free < expected.length:
        raise TransportError(f"cannot decrypt into {dst.parent}: {free} bytes free, the bundle needs "
                             f"{expected.length}", reason="no_space")
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise _storage_error(dst, e) from e
    ok = False
    try:
        with src.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            header_bytes = f.read(HEADER_LEN)
            header = Header.parse(header_bytes)
            body = size - HEADER_LEN - TAG_LEN
            if body < 0:
                raise BundleRejected("encrypted bundle: truncated (no room for its tag)", reason="format")
            if body != expected.length:
                raise BundleRejected(f"encrypted bundle: {body} bytes of ciphertext, the plaintext is signed as "
                                     f"{expected.length}", reason="size_mismatch")
            f.seek(size - TAG_LEN)
            tag = f.read(TAG_LEN)
            f.seek(HEADER_LEN)
            dec = Cipher(algorithms.AES(key), modes.GCM(header.nonce, tag)).decryptor()
            dec.authenticate_additional_data(header_bytes)
            digest, left = hashlib.sha256(), body
            while left:
                block = f.read(min(BLOCK, left))
                if not block:
                    raise BundleRejected("encrypted bundle: shorter than it was a moment ago", reason="unreadable")
                left -= len(block)
                plain = dec.update(block)
                digest.update(plain)
                _write(fd, dst, plain)
            try:
                _write(fd, dst, dec.finalize())
            except InvalidTag as e:
                raise BundleRejected("encrypted bundle: the AES-GCM tag does not verify (wrong content key or "
                                     "damaged ciphertext)", reason="decrypt_failed") from e
            if digest.hexdigest() != expected.sha256:
                raise BundleRejected("encrypted bundle: the decrypted bundle does not match its signed sha256",
                                     reason="hash_mismatch")
            try:
                os.fsync(fd)
            except OSError as e:
                raise _storage_error(dst, e) from e
        ok = True
    except OSError as e:  # the ciphertext's side: every write to `dst` is _write's
        raise BundleRejected(f"cannot decrypt {src} into {dst}: {e.strerror or e}", reason="unreadable") from e
    finally:
        os.close(fd)
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
    fsync_dir(dst.parent)


def _write(fd: int, dst: Path, data: bytes) -> None:
    """All of `data` to `fd` (unbuffered: a write error surfaces here, never later in a close)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise _storage_error(dst, e) from e


def _storage_error(dst: Path, e: OSError) -> TransportError:
    """The plaintext's side failed (a full disk, a quota, an I/O error): the device's storage, not the bundle."""
    return TransportError(f"cannot write the decrypted bundle {dst}: {e.strerror or e}", reason="no_space")


# --- the key wrap (HPKE) -------------------------------------------------------------------------------------


def key_info(bundle_target: str, ciphertext_sha256: str) -> bytes:
    """HPKE `info`: binds a wrapped content key to one bundle target and one ciphertext."""
    return b"\0".join((_INFO_LABEL, bundle_target.encode(), ciphertext_sha256.encode()))


def wrap_key(content_key: bytes, recipient: X25519PublicKey, info: bytes) -> str:
    return base64.b64encode(_SUITE.encrypt(content_key, recipient, info=info)).decode()


def unwrap_key(wrapped: str, key: X25519PrivateKey, info: bytes) -> bytes:
    """The content key from `wrapped`; BundleRejected "key_unavailable" when it does not open with `key` and `info`
    (the device's key, not the bundle, is what is wrong: the bundle is not blamed)."""
    try:
        content_key = _SUITE.decrypt(base64.b64decode(wrapped, validate=True), key, info=info)
    except (InvalidTag, ValueError, binascii.Error) as e:
        raise BundleRejected("this device's grant does not unwrap with its key (another device's key, a replaced "
                             "key file, or a grant made for another bundle)", reason="key_unavailable") from e
    if len(content_key) != KEY_LEN:
        raise BundleRejected("this device's grant holds no AES-256 key", reason="key_unavailable")
    return content_key


def load_device_key(path: Path) -> X25519PrivateKey:
    """The device's X25519 private key (unencrypted PKCS#8 PEM). ConfigError when the file is missing, readable by
    group or others, or not an X25519 key."""
    where = f"[trust] decrypt_key_file {path}"
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(64 << 10)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror})") from e
    refuse_loose_key_mode(where, mode)  # checked on the file read, not on the path again
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: not an unencrypted PEM private key ({e})") from e
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"{where}: not an X25519 key")
    return key


# --- the signed metadata ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encryption:
    """The `encrypted` entry of an encrypted bundle's signed custom metadata."""

    scheme: str
    grants: str  # the grants document's target path
    plaintext: Plaintext

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "grants": self.grants, "plaintext_sha256": self.plaintext.sha256,
                "plaintext_length": self.plaintext.length}

    @classmethod
    def from_custom(cls, custom: Any, where: str) -> Encryption | None:
        """From a target's signed custom metadata; None when the target is not encrypted."""
        raw = custom.get("encrypted") if isinstance(custom, dict) else None
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise BundleRejected(f"{where}: the signed `encrypted` entry is not an object", reason="malformed")
        scheme, grants = raw.get("scheme"), raw.get("grants")
        sha, length = raw.get("plaintext_sha256"), raw.get("plaintext_length")
        if scheme != SCHEME:
            raise BundleRejected(f"{where}: encrypted with {scheme!r}, this agent reads {SCHEME!r}",
                                 reason="unsupported")
        if not isinstance(grants, str) or not grants.startswith("grants/") or not isinstance(sha, str) \
                or len(sha) != 64 or isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise BundleRejected(f"{where}: the signed `encrypted` entry is incomplete", reason="malformed")
        return cls(scheme, grants, Plaintext(sha, length))


@dataclass(frozen=True)
class Grants:
    """A grants document: which devices hold the bundle's content key, each wrapped for that device's key."""

    bundle: str
    ciphertext_sha256: str
    groups: tuple[str, ...]  # the groups whose devices are granted, now and when added later
    wrapped: dict[str, str]  # device id -> base64 HPKE ciphertext of the content key

    def to_bytes(self) -> bytes:
        doc = {"schema": GRANTS_SCHEMA, "scheme": SCHEME, "bundle": self.bundle,
               "ciphertext_sha256": self.ciphertext_sha256, "groups": sorted(self.groups),
               "grants": dict(sorted(self.wrapped.items()))}
        return json.dumps(doc, indent=1).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes, where: str) -> Grants:
        if len(data) > MAX_GRANTS_BYTES:
            raise BundleRejected(f"{where}: more than {MAX_GRANTS_BYTES} bytes", reason="too_large")
        try:
            doc = json.loads(data)
            ok = isinstance(doc, dict) and doc.get("schema") == GRANTS_SCHEMA and doc.get("scheme") == SCHEME \
                and isinstance(doc.get("bundle"), str) and isinstance(doc.get("ciphertext_sha256"), str) \
                and isinstance(doc.get("groups"), list) and all(isinstance(g, str) for g in doc["groups"]) \
                and isinstance(doc.get("grants"), dict) \
                and all(isinstance(k, str) and isinstance(v, str) for k, v in doc["grants"].items())
        except ValueError as e:
            raise BundleRejected(f"{where}: not JSON: {e}", reason="malformed") from e
        if not ok:
            raise BundleRejected(f"{where}: not a grants document of schema {GRANTS_SCHEMA}", reason="malformed")
        return cls(doc["bundle"], doc["ciphertext_sha256"], tuple(doc["groups"]), dict(doc["grants"]))

    def for_device(self, device_id: str, bundle: str, ciphertext_sha256: str) -> str:
        """This device's wrapped key for exactly this bundle; BundleRejected "mismatch" or "not_granted"."""
        if (self.bundle, self.ciphertext_sha256) != (bundle, ciphertext_sha256):
            raise BundleRejected(f"the grants for {bundle} name {self.bundle} ({self.ciphertext_sha256[:12]})",
                                 reason="mismatch")
        wrapped = self.wrapped.get(device_id)
        if wrapped is None:
            raise BundleRejected(f"{bundle} is encrypted and not granted to device {device_id!r} (its group's "
                                 "devices are granted when it is published or when they are added)",
                                 reason="not_granted")
        return wrapped
