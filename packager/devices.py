"""The packager's registry of provisioned devices: `REPO/devices/<id>.json`, one file per device, written
atomically. A record holds what the packager needs to know about a device after `packager device add`: its group,
the serial of its client certificate (for revocation), and the public half of its X25519 key, which bundle content
keys are wrapped for (docs/security.md). Private keys never enter the registry; a device's X25519 private key is
written once into the directory handed to the device and not kept here.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.fsutil import write_atomic
from agent.ids import ID_RULE, is_id
from packager.errors import InputError, RepoError

REGISTRY_DIR = "devices"


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    group: str
    cert_serial: int  # the serial of its client certificate from the fleet CA (hex in the CRL and in logs)
    x25519_public: str  # base64 of the raw 32-byte public key
    added: str  # ISO 8601 UTC
    revoked: str | None = None  # ISO 8601 UTC once revoked

    @property
    def public_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(base64.b64decode(self.x25519_public, validate=True))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> DeviceRecord:
        try:
            d: Any = json.loads(data)
            rec = cls(device_id=str(d["device_id"]), group=str(d["group"]), cert_serial=int(d["cert_serial"]),
                      x25519_public=str(d["x25519_public"]), added=str(d["added"]),
                      revoked=None if d.get("revoked") is None else str(d["revoked"]))
            rec.public_key  # noqa: B018 - a record whose key does not parse is corrupt, said here and not later
        except (ValueError, TypeError, KeyError) as e:
            raise RepoError(f"corrupt device record {where}: {e}") from e
        return rec


def registry_dir(repo: Path) -> Path:
    return repo / REGISTRY_DIR


def _path(repo: Path, device_id: str) -> Path:
    if not is_id(device_id):
        raise InputError(f"device id {device_id!r}: use {ID_RULE}")
    return registry_dir(repo) / f"{device_id}.json"


def new_decryption_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_b64(key: X25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def register(repo: Path, record: DeviceRecord) -> Path:
    """Add a new device; an id already registered (revoked or not) is refused: ids are never reused."""
    path = _path(repo, record.device_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    # exclusive: of two registrations of one id, exactly one wins (the temporary name is not *.json: all_devices
    # never reads it)
    try:
        write_atomic(path, record.to_json(), exclusive=True)
    except FileExistsError as e:
        raise InputError(f"device {record.device_id} is already registered ({path}); ids are never reused") from e
    return path


def get(repo: Path, device_id: str) -> DeviceRecord:
    path = _path(repo, device_id)
    try:
        return DeviceRecord.from_json(path.read_bytes(), path)
    except FileNotFoundError as e:
        raise InputError(f"no device {device_id} in {registry_dir(repo)}") from e


def all_devices(repo: Path) -> list[DeviceRecord]:
    """Every registered device, revoked ones included, by id."""
    d = registry_dir(repo)
    return [DeviceRecord.from_json(p.read_bytes(), p) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


def active_devices(repo: Path, group: str | None = None) -> list[DeviceRecord]:
    """Devices not revoked, of `group` when given."""
    return [r for r in all_devices(repo) if r.revoked is None and (group is None or r.group == group)]


def group_registry(repo: Path) -> dict[str, str] | None:
    """Device id -> group of every device not revoked; None when the repository registers no device at all (the
    fleet view then takes each device's group from its own state)."""
    records = all_devices(repo)
    return {r.device_id: r.group for r in records if r.revoked is None} if records else None


def mark_revoked(repo: Path, device_id: str) -> DeviceRecord:
    rec = get(repo, device_id)
    if rec.revoked is not None:
        raise InputError(f"device {device_id} was already revoked on {rec.revoked}")
    rec = replace(rec, revoked=now_iso())
    write_atomic(_path(repo, device_id), rec.to_json())
    return rec
