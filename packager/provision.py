"""`packager device add/revoke/list` and the files `packager ca issue/broker-cert` write (docs/packager.md,
docs/security.md "Device identity and broker access").

`add_device` writes everything a device needs into a new directory, or nothing: the files go into a temporary
directory beside it, renamed into place at the end, and the device is registered (packager/devices.py) only once
they are there (a failed registration removes them again):

    agent.toml    [agent] id/fleet/group, [mqtt] url + ca/cert/key files, [trust] root + decrypt_key_file, with
                  the paths the files will have on the device (`device_dir`, default /etc/edge-agent)
    root.json     the repository's root metadata (the device's TUF trust anchor)
    ca.pem        the fleet CA (pinned: the agent trusts no other CA for the broker)
    client.pem    the device's certificate, CN = its id, signed by the fleet CA
    client.key    its private key, 0600, unencrypted (a device starts unattended: nobody types a passphrase)
    decrypt.key   its X25519 private key for confidential models (PKCS#8 PEM), 0600, unencrypted;
                  only the public half stays in the registry
    credentials.conf  with `systemd_credentials`: a drop-in for edge-agent.service that hands both keys to the
                  service as systemd credentials (`LoadCredential=`), and agent.toml reads them from
                  CREDENTIALS_DIR: edge-agent.service's DynamicUser= user cannot read root's 0600 files in the
                  device dir, while systemd gives it its credentials 0400, owned by that user
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import cast

from cryptography.hazmat.primitives import serialization

from agent.fsutil import fsync_dir
from agent.ids import ID_RULE, is_id
from agent.transport.mqtt import parse_broker_url
from agent.transport.topics import Topics
from packager import confidential, devices, fleet_ca, keystore, tuf_repo
from packager.acl import mosquitto_acl
from packager.errors import InputError, RepoError

DEFAULT_DEVICE_DIR = PurePosixPath("/etc/edge-agent")  # edge-agent install's --config-dir
DEFAULT_STATE_DIR = PurePosixPath("/var/lib/edge-agent")
FILES = ("agent.toml", "root.json", "ca.pem", "client.pem", "client.key", "decrypt.key")
CREDENTIAL_FILES = ("client.key", "decrypt.key")  # handed to the service by `LoadCredential=` when asked
CREDENTIALS_DIR = PurePosixPath("/run/credentials/edge-agent.service")  # systemd's $CREDENTIALS_DIRECTORY for it
DROP_IN = "credentials.conf"


@dataclass(frozen=True)
class Provisioned:
    record: devices.DeviceRecord
    out: Path
    created_ca: bool
    granted: tuple[str, ...] = ()  # grants documents of encrypted bundles re-signed for the device (confidential.py)


def check_id(label: str, value: str) -> str:
    if not is_id(value):
        raise InputError(f"{label} {value!r}: use {ID_RULE}")
    return value


def _toml_str(value: str) -> str:
    if any(c in value for c in '"\\\n') or not value.isprintable():
        raise InputError(f"{value!r}: a path or URL for agent.toml must not hold quotes, backslashes or control "
                         "characters")
    return f'"{value}"'


def agent_toml(device_id: str, group: str, fleet: str, broker: str, device_dir: PurePosixPath,
               state_dir: PurePosixPath, systemd_credentials: bool = False) -> str:
    """The device's config (docs/agent-config.md); every file it names is one `add_device` writes (the keys, with
    `systemd_credentials`, as systemd hands them to edge-agent.service)."""
    def at(name: str) -> str:
        where = CREDENTIALS_DIR if systemd_credentials and name in CREDENTIAL_FILES else device_dir
        return _toml_str(str(where / name))

    return "\n".join([
        "# written by `packager device add`: the files named here come with it (docs/security.md)",
        "[agent]",
        f'device_id = "{device_id}"',
        f'fleet = "{fleet}"',
        f'group = "{group}"',
        f"state_dir = {_toml_str(str(state_dir))}",
        "",
        "[mqtt]",
        f"url = {_toml_str(broker)}",
        f"ca_file = {at('ca.pem')}",
        f"cert_file = {at('client.pem')}",
        f"key_file = {at('client.key')}",
        "",
        "[trust]",
        f"root = {at('root.json')}",
        f"decrypt_key_file = {at('decrypt.key')}",
        "",
    ])


def credentials_drop_in(device_dir: PurePosixPath) -> str:
    """edge-agent.service.d/credentials.conf: the device's keys as credentials of the service (see module doc)."""
    return "\n".join([
        "# written by `packager device add --systemd-credentials`: install as",
        "# /etc/systemd/system/edge-agent.service.d/credentials.conf, then systemctl daemon-reload (docs/security.md)",
        "[Service]",
        *(f"LoadCredential={name}:{_toml_str(str(device_dir / name))[1:-1]}" for name in CREDENTIAL_FILES),
        "",
    ])


def check_broker(broker: str) -> str:
    """Every URL mqtts:// (a client certificate travels only over TLS)."""
    urls = [u.strip() for u in broker.split(",")]
    try:
        addresses = [parse_broker_url(u) for u in urls]
    except ValueError as e:
        raise InputError(f"--broker: {e}") from e
    if not all(a.tls for a in addresses):
        raise InputError(f"--broker {broker}: a device with a client certificate needs mqtts:// URLs")
    return ",".join(urls)


def _write_public(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _new_out_dir(out: Path) -> Path:
    """A temporary directory beside `out` (same file system: the final rename is atomic); `out` must not exist."""
    if out.exists():
        raise InputError(f"--out {out}: exists already; give a new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise InputError(f"--out {out}: cannot create it ({e.strerror or e})") from e


def add_device(repo: Path, device_id: str, group: str, out: Path, broker: str, fleet: str = "default", *,
               device_dir: PurePosixPath = DEFAULT_DEVICE_DIR,
               state_dir: PurePosixPath = DEFAULT_STATE_DIR, systemd_credentials: bool = False) -> Provisioned:
    check_id("device id", device_id)
    check_id("--group", group)
    check_id("--fleet", fleet)
    broker = check_broker(broker)
    if not device_dir.is_absolute() or not state_dir.is_absolute():
        raise InputError("--device-dir and --state-dir are paths on the device: give absolute paths")
    root = tuf_repo.provisioning_root(repo)
    if not root.is_file():
        raise InputError(f"--repo {repo}: no {root} (`packager keys init` creates the repository)")
    config = agent_toml(device_id, group, fleet, broker, device_dir, state_dir, systemd_credentials)
    # the CA's lock from the id check to the registration: of two `device add` of one id the second fails here,
    # before it issues a certificate that no record would name (`device revoke` could not revoke it)
    with fleet_ca.locked(repo):
        if (devices.registry_dir(repo) / f"{device_id}.json").exists():
            raise InputError(f"device {device_id} is already registered; ids are never reused")
        tmp = _new_out_dir(out)  # before the CA: a refused --out leaves no CA behind
        serial: int | None = None
        try:
            created = fleet_ca.ensure_ca(repo)
            key, cert = fleet_ca.issue_client(repo, device_id, "device")
            serial = cert.serial_number
            decrypt = devices.new_decryption_key()
            decrypt_pem = decrypt.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
            keystore.write_new_private_file(tmp / "client.key", fleet_ca.plain_key_pem(key))
            keystore.write_new_private_file(tmp / "decrypt.key", decrypt_pem)
            _write_public(tmp / "client.pem", fleet_ca.cert_pem(cert))
            _write_public(tmp / "ca.pem", fleet_ca.ca_cert_path(repo).read_bytes())
            _write_public(tmp / "root.json", root.read_bytes())
            _write_public(tmp / "agent.toml", config.encode())
            if systemd_credentials:
                _write_public(tmp / DROP_IN, credentials_drop_in(device_dir).encode())
            tmp.chmod(0o700)
            os.rename(tmp, out)  # fails if `out` appeared meanwhile: never mixes with someone else's files
            fsync_dir(out.parent)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if serial is not None:
                fleet_ca.forget(repo, serial)
            if isinstance(e, OSError):
                raise RepoError(f"--out {out}: {e.strerror or e} (nothing written)") from e
            raise
        record = devices.DeviceRecord(device_id=device_id, group=group, cert_serial=cert.serial_number,
                                      x25519_public=devices.public_b64(decrypt.public_key()), added=devices.now_iso())
        try:
            devices.register(repo, record)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            fleet_ca.forget(repo, cert.serial_number)  # a certificate nobody holds: no record, nothing to revoke
            raise
    # the group's encrypted bundles, re-wrapped for the new device (signed, not pushed: the next push carries them);
    # one that cannot be granted leaves the device registered and usable: exit non-zero, `device grant` finishes
    granted = confidential.grant_device(repo, device_id)
    if granted.failed:
        raise RepoError(f"device {device_id} is registered and its files are in {out}, but not granted "
                        f"{'; '.join(f'{p} ({why})' for p, why in granted.failed.items())}: fix that and run "
                        f"`packager device grant {device_id}`")
    return Provisioned(record, out, created, tuple(granted.changed))


def revoke_device(repo: Path, device_id: str) -> devices.DeviceRecord:
    """Revoke the device's certificate (the CRL is re-signed), then mark it revoked in the registry."""
    record = devices.get(repo, device_id)
    if record.revoked is not None:
        raise InputError(f"device {device_id} was already revoked on {record.revoked}")
    fleet_ca.revoke(repo, record.cert_serial)
    return devices.mark_revoked(repo, device_id)


def revoke_certificate(repo: Path, serial: int) -> fleet_ca.Issued:
    """`packager ca revoke`: any certificate but a device's that the registry names as its active one (`device
    revoke` revokes that and marks the device revoked). A device certificate no active record names (an orphan:
    left by a `device add` that raced another before the CA's lock covered registration) is revoked here."""
    with fleet_ca.locked(repo):  # no `device add` registers between the check and the revocation
        named = [r.device_id for r in devices.active_devices(repo) if r.cert_serial == serial]
        if named:
            raise InputError(f"certificate {serial:x} is device {named[0]}'s: `packager device revoke {named[0]}` "
                             "revokes it and marks the device revoked")
        return fleet_ca.revoke(repo, serial)


def issue_identity(repo: Path, role: str, fleet: str, out: Path, name: str | None = None) -> tuple[str, Path, Path]:
    """The packager's, the dashboard's or an inference app's certificate and key (encrypted through keystore:
    they live on workstations, not unattended devices) into `out`, with ca.pem; (identity, cert path, key path)."""
    identity = fleet_ca.identity_name(role, fleet, name)
    cert_path, key_path, ca_copy = out / f"{identity}.pem", out / f"{identity}.key", out / "ca.pem"
    for p in (cert_path, key_path):
        if p.exists():
            raise InputError(f"{p}: exists already; certificates and keys are never overwritten")
    created_out = _private_out_dir(out)  # before anything is signed: no certificate whose files cannot be written
    written: list[Path] = []
    serial: int | None = None
    try:
        fleet_ca.ensure_ca(repo)
        keystore.passphrase()
        key, cert = fleet_ca.issue_client(repo, identity, cast(fleet_ca.Role, role))
        serial = cert.serial_number
        written.append(keystore.write_private_key(key_path, key))
        _write_public(cert_path, fleet_ca.cert_pem(cert))
        written.append(cert_path)
        if not ca_copy.exists():
            _write_public(ca_copy, fleet_ca.ca_cert_path(repo).read_bytes())
            written.append(ca_copy)
    except BaseException as e:
        _abandon(e, repo, serial, written, out, created_out)
        raise
    return identity, cert_path, key_path


def _private_out_dir(out: Path) -> bool:
    """Create `out` 0700 (it receives private keys) unless it is a directory already; True when created now.
    InputError when it cannot be made or written into, before anything is issued."""
    try:
        created = not out.exists()
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        if created:
            out.chmod(0o700)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create it ({e.strerror or e})") from e
    if not os.access(out, os.W_OK | os.X_OK):
        if created:
            out.rmdir()
        raise InputError(f"--out {out}: cannot write into it")
    return created


def _undo(written: list[Path], created_dir: Path | None) -> None:
    for p in written:
        p.unlink(missing_ok=True)
    if created_dir is not None:
        shutil.rmtree(created_dir, ignore_errors=True)


def _abandon(e: BaseException, repo: Path, serial: int | None, written: list[Path], out: Path,
             created_out: bool) -> None:
    """Undo an issue that failed half-way: its files, `out` when it was made for them, the CA's record of the
    certificate; an OSError becomes one line naming `out` (the caller re-raises anything else)."""
    _undo(written, out if created_out else None)
    if serial is not None:
        fleet_ca.forget(repo, serial)
    if isinstance(e, OSError):
        raise RepoError(f"--out {out}: {e.strerror or e} (nothing issued)") from e


def broker_files(repo: Path, host: str, out: Path) -> list[Path]:
    """Mosquitto's server certificate for `host`, its key (0600, unencrypted: Mosquitto starts unattended), the CA
    and the current CRL, into `out` (which must not hold them yet)."""
    fleet_ca.check_host(host)  # a refused host leaves nothing behind
    paths = [out / n for n in ("broker.pem", "broker.key", "ca.pem", "crl.pem")]
    for p in paths:
        if p.exists():
            raise InputError(f"{p}: exists already; give a new --out directory")
    created_out = _private_out_dir(out)
    written: list[Path] = []
    serial: int | None = None
    try:
        fleet_ca.ensure_ca(repo)
        key, cert = fleet_ca.issue_server(repo, host)
        serial = cert.serial_number
        for path, data, write in ((paths[1], fleet_ca.plain_key_pem(key), keystore.write_new_private_file),
                                  (paths[0], fleet_ca.cert_pem(cert), _write_public),
                                  (paths[2], fleet_ca.ca_cert_path(repo).read_bytes(), _write_public),
                                  (paths[3], fleet_ca.crl_path(repo).read_bytes(), _write_public)):
            write(path, data)
            written.append(path)
    except BaseException as e:
        _abandon(e, repo, serial, written, out, created_out)
        raise
    return paths


def app_names(repo: Path, fleet: str) -> list[str]:
    """Inference apps of `fleet` with a certificate not revoked (their `user` blocks in the ACL)."""
    head = fleet_ca.identity_name("app", fleet, "x")[:-1]
    return sorted({r.identity[len(head):] for r in fleet_ca.issued(repo)
                   if r.role == "app" and r.revoked is None and r.identity.startswith(head)})


def acl_text(repo: Path, fleet: str) -> str:
    check_id("--fleet", fleet)
    return mosquitto_acl(Topics(f"edgeship/{fleet}/"), fleet, app_names(repo, fleet))


def mosquitto_listener(port: int, files_dir: str, acl_file: str) -> str:
    """The mosquitto.conf lines for a listener that takes only clients with a fleet certificate."""
    return "\n".join([
        f"listener {port}",
        f"cafile {files_dir}/ca.pem",
        f"certfile {files_dir}/broker.pem",
        f"keyfile {files_dir}/broker.key",
        f"crlfile {files_dir}/crl.pem",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {acl_file}",
    ]) + "\n"
