"""The fleet CA: the X.509 authority the broker trusts for client certificates (docs/security.md, "Device identity
and broker access"). Everything X.509 is cryptography's; this module only decides names, lifetimes and files.

It lives in the repository, `REPO/ca/`:

    ca.pem               the CA certificate (self-signed, EC P-256): the broker's `cafile`, every client's ca_file
    ca.key               its private key, encrypted at rest (packager/keystore.py)
    crl.pem              the certificate revocation list, signed by the CA: the broker's `crlfile`
    issued/<serial>.json one record per certificate issued: serial (hex), identity, role, dates, revoked

An identity is a certificate's subject common name, which Mosquitto's `use_identity_as_username` makes the MQTT
user name the ACL (packager/acl.py) grants topics to. A device's identity is its id; the packager's, the
dashboard's and an inference app's contain dots (`edgeship.packager.<fleet>`), which a device id never does
(agent/ids.py), so no device can be issued a name that holds their rights.

Lifetimes: the CA 20 years, client and broker certificates 10 years (a device is not re-provisioned in the field;
revocation, not expiry, is how one is cut off), the CRL's next update the CA's end. OpenSSL refuses every client
once the CRL's next update has passed, so a CRL that outlives the certificates it speaks about avoids that cliff.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.fsutil import write_atomic
from agent.ids import ID_RULE, is_id
from packager import keystore, tuf_repo
from packager.errors import InputError, RepoError

CA_DIR = "ca"
CA_VALIDITY = timedelta(days=20 * 365)
CERT_VALIDITY = timedelta(days=10 * 365)
Role = Literal["device", "packager", "dashboard", "app", "broker"]
ROLES_ISSUED_BY_NAME = ("packager", "dashboard", "app")  # `packager ca issue --role ...`
MAX_CN = 64  # RFC 5280's ub-common-name: a longer identity cannot be a certificate's common name
BROKER_CN = "edgeship.broker"  # a broker whose host name is longer: the name is in the SAN, which is what clients check
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Issued:
    """One certificate the CA signed."""

    serial: int
    identity: str
    role: str
    issued: str
    not_after: str
    revoked: str | None = None

    def to_json(self) -> bytes:
        d: dict[str, Any] = asdict(self)
        d["serial"] = f"{self.serial:x}"
        return json.dumps(d, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> Issued:
        try:
            d: Any = json.loads(data)
            return cls(serial=int(d["serial"], 16), identity=str(d["identity"]), role=str(d["role"]),
                       issued=str(d["issued"]), not_after=str(d["not_after"]),
                       revoked=None if d.get("revoked") is None else str(d["revoked"]))
        except (ValueError, TypeError, KeyError) as e:
            raise RepoError(f"corrupt certificate record {where}: {e}") from e


def ca_dir(repo: Path) -> Path:
    return repo / CA_DIR


def ca_cert_path(repo: Path) -> Path:
    return ca_dir(repo) / "ca.pem"


def ca_key_path(repo: Path) -> Path:
    return ca_dir(repo) / "ca.key"


def crl_path(repo: Path) -> Path:
    return ca_dir(repo) / "crl.pem"


def _issued_path(repo: Path, serial: int) -> Path:
    return ca_dir(repo) / "issued" / f"{serial:x}.json"


def identity_name(role: str, fleet: str, name: str | None = None) -> str:
    """The certificate identity of a role that is not a device: `edgeship.<role>.<fleet>` (and `.<name>` for an
    inference app). Dots keep it apart from every device id."""
    for label, value in (("--fleet", fleet), ("--name", name)):
        if value is not None and not is_id(value):
            raise InputError(f"{label} {value!r}: use {ID_RULE}")
    if role == "app":
        if name is None:
            raise InputError("an app identity needs --name")
        identity = f"edgeship.app.{fleet}.{name}"
    elif role in ("packager", "dashboard"):
        identity = f"edgeship.{role}.{fleet}"
    else:
        raise InputError(f"no identity role {role!r}: use one of {', '.join(ROLES_ISSUED_BY_NAME)}")
    if len(identity) > MAX_CN:
        raise InputError(f"identity {identity} is {len(identity)} characters; a certificate's common name (the "
                         f"broker's user name) holds at most {MAX_CN}: use a shorter fleet"
                         + (" or app name" if role == "app" else ""))
    return identity


def check_host(host: str) -> tuple[str, list[x509.GeneralName]]:
    """The broker host as it goes into the certificate, and its SAN entries: an IP address, or a DNS name of LDH
    labels (an internationalised name is turned into its A-labels); InputError for anything else."""
    try:
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise InputError(f"--host {host!r}: not a host name or IP address") from None
        if len(ascii_host) > 253 or not all(_LDH_LABEL.fullmatch(label) for label in ascii_host.split(".")):
            raise InputError(f"--host {host!r}: not a host name or IP address (labels of letters, digits and '-', "
                             "at most 63 each, 253 in all)") from None
        host, names = ascii_host, [x509.DNSName(ascii_host)]
    if host == "localhost":
        names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    return host, names


_held = threading.local()  # the locks this thread holds (an flock taken twice in one process would wait forever)


@contextlib.contextmanager
def locked(repo: Path) -> Iterator[None]:
    """The fleet CA's own lock (REPO/ca/.lock): issuing, revoking and re-signing the CRL one at a time, so two
    revocations never lose a serial and two `device add` never both create the CA. Re-entrant within a thread:
    `device add` holds it from its id check to the registration and issues inside (packager/provision.py)."""
    if not tuf_repo.metadata_dir(repo).is_dir():
        raise InputError(f"--repo {repo}: not a TUF repository (`packager keys init` creates one)")
    keystore.private_dir(ca_dir(repo))
    lock = ca_dir(repo).resolve() / ".lock"
    held: set[Path] = _held.__dict__.setdefault("locks", set())
    if lock in held:
        yield
        return
    with lock.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        held.add(lock)
        try:
            yield
        finally:
            held.discard(lock)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def require(repo: Path) -> None:
    """InputError unless `repo` has a fleet CA (commands that only read it must not answer for a missing one)."""
    if not exists(repo):
        raise InputError(f"--repo {repo}: no fleet CA in {ca_dir(repo)} (`packager ca init` or `packager device "
                         "add` creates it)")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _serial() -> int:
    return secrets.randbits(159) | 1 << 64  # positive, at most 20 octets (RFC 5280), never tiny


def _pem(cert: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def exists(repo: Path) -> bool:
    return ca_cert_path(repo).is_file()


def init_ca(repo: Path, name: str = "edgeship fleet CA") -> x509.Certificate:
    """Create the CA in `repo` (RepoError if one is there already): key (encrypted), certificate, empty CRL."""
    with locked(repo):
        return _init_ca(repo, name)


def _init_ca(repo: Path, name: str) -> x509.Certificate:
    if exists(repo) or ca_key_path(repo).exists():
        raise RepoError(f"{ca_dir(repo)}: the fleet CA exists already")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(_serial()).not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    # under the passphrase the repository's online keys open with, never a new one (that would lock one out)
    keystore.check_passphrase_against(tuf_repo.keys_dir(repo))
    keystore.write_private_key(ca_key_path(repo), key)  # first: a crash leaves no certificate without its key
    write_atomic(ca_cert_path(repo), _pem(cert))
    _write_crl(repo, cert, key)
    return cert


def ensure_ca(repo: Path) -> bool:
    """Create the CA unless it exists; True when it was created now."""
    with locked(repo):
        if exists(repo):
            return False
        _init_ca(repo, "edgeship fleet CA")
        return True


def load_ca(repo: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca_cert_path(repo).read_bytes())
    except FileNotFoundError as e:
        raise RepoError(f"no fleet CA in {ca_dir(repo)}: `packager ca init --repo {repo}` creates it") from e
    except ValueError as e:
        raise RepoError(f"{ca_cert_path(repo)}: not a PEM certificate ({e})") from e
    key = keystore.load_private_key(ca_key_path(repo))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RepoError(f"{ca_key_path(repo)}: not an EC key")
    return cert, key


def _leaf(repo: Path, subject_cn: str, eku: x509.ObjectIdentifier,
          san: x509.SubjectAlternativeName | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_cert, ca_key = load_ca(repo)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(_serial())
               .not_valid_before(now - timedelta(minutes=5))
               .not_valid_after(min(now + CERT_VALIDITY, ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _record(repo: Path, cert: x509.Certificate, identity: str, role: str) -> None:
    rec = Issued(cert.serial_number, identity, role, _now().isoformat(), cert.not_valid_after_utc.isoformat())
    path = _issued_path(repo, rec.serial)
    keystore.private_dir(path.parent)
    write_atomic(path, rec.to_json())


def forget(repo: Path, serial: int) -> None:
    """Drop the record of a certificate whose files could not be written (it was never handed out): no phantom in
    `ca list`, and nothing to revoke."""
    with locked(repo):
        _issued_path(repo, serial).unlink(missing_ok=True)


def issue_client(repo: Path, identity: str, role: Role) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A client certificate (EKU clientAuth) with CN = `identity`, recorded in REPO/ca/issued/. The caller writes
    the key where it belongs (a device's unencrypted into its directory, the packager's through keystore)."""
    with locked(repo):
        key, cert = _leaf(repo, identity, ExtendedKeyUsageOID.CLIENT_AUTH)
        _record(repo, cert, identity, role)
    return key, cert


def issue_server(repo: Path, host: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate (EKU serverAuth) for the broker at `host` (a DNS name or an IP address; `localhost`
    also gets 127.0.0.1 and ::1, so tests and one-machine setups can use either). The host is in the SAN, which
    is what TLS clients check; the common name is the host too when it fits in 64 characters, else BROKER_CN."""
    host, names = check_host(host)
    with locked(repo):
        key, cert = _leaf(repo, host if len(host) <= MAX_CN else BROKER_CN, ExtendedKeyUsageOID.SERVER_AUTH,
                          x509.SubjectAlternativeName(names))
        _record(repo, cert, host, "broker")
    return key, cert


def issued(repo: Path) -> list[Issued]:
    d = ca_dir(repo) / "issued"
    return [Issued.from_json(p.read_bytes(), p) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


def _crl_number(repo: Path) -> int:
    """The CRL number of the CRL in place (RFC 5280: every new CRL's is larger), 0 when there is none. A CRL that
    does not read is RepoError, never 0: the number must not go backwards (brokers may keep the higher one)."""
    try:
        crl = x509.load_pem_x509_crl(crl_path(repo).read_bytes())
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, x509.ExtensionNotFound) as e:
        raise RepoError(f"{crl_path(repo)}: cannot read its CRL number ({e}); restore it from a backup (a new CRL "
                        "must carry a larger number than the one brokers have)") from e


def _write_crl(repo: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
    now = _now()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
               .next_update(ca_cert.not_valid_after_utc)
               .add_extension(x509.CRLNumber(_crl_number(repo) + 1), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))  # RFC 5280 5.2.1: conforming CRL issuers include it
    for rec in issued(repo):
        if rec.revoked is not None:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(rec.serial)
                .revocation_date(datetime.fromisoformat(rec.revoked)).build())
    write_atomic(crl_path(repo), _pem(builder.sign(ca_key, hashes.SHA256())))


def revoke(repo: Path, serial: int) -> Issued:
    """Mark certificate `serial` revoked and re-sign the CRL (crl.pem) with every revoked serial."""
    with locked(repo):
        return _revoke(repo, serial)


def _revoke(repo: Path, serial: int) -> Issued:
    path = _issued_path(repo, serial)
    try:
        rec = Issued.from_json(path.read_bytes(), path)
    except FileNotFoundError as e:
        raise InputError(f"the fleet CA issued no certificate with serial {serial:x}") from e
    ca_cert, ca_key = load_ca(repo)
    if rec.revoked is None:
        rec = replace(rec, revoked=_now().isoformat())
        write_atomic(path, rec.to_json())
    _write_crl(repo, ca_cert, ca_key)  # also after a crash between the record and the CRL: re-signing mends it
    return rec


def cert_pem(cert: x509.Certificate) -> bytes:
    return _pem(cert)


def plain_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8: for a device or a broker, which start unattended and have no passphrase to ask for."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
