"""The fleet CA (packager/fleet_ca.py) and device provisioning (packager/provision.py): certificates checked with
cryptography's own verification, files and modes, all-or-nothing `device add`, revocation into the CRL, and the
one-line errors of `packager ca` / `packager device`."""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from pathlib import Path, PurePosixPath

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import check_paths, parse_config
from agent.errors import ConfigError
from agent.ids import is_id
from packager import devices, fleet_ca, keystore, provision, tuf_repo
from packager.cli import main
from packager.errors import InputError, RepoError

BROKER = "mqtts://broker.example:8883"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("ca") / "repo"
    tuf_repo.init_repo(repo)
    fleet_ca.init_ca(repo)
    return repo


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _ca(repo: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(fleet_ca.ca_cert_path(repo).read_bytes())


def _crl_serials(repo: Path) -> set[int]:
    crl = x509.load_pem_x509_crl(fleet_ca.crl_path(repo).read_bytes())
    assert crl.is_signature_valid(_ca(repo).public_key())  # type: ignore[arg-type]
    return {r.serial_number for r in crl}


def _crl_number(repo: Path) -> int:
    crl = x509.load_pem_x509_crl(fleet_ca.crl_path(repo).read_bytes())
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


def test_the_ca_key_is_encrypted_at_rest_and_the_ca_is_made_once(repo: Path) -> None:
    assert keystore.is_encrypted(fleet_ca.ca_key_path(repo).read_bytes())
    assert stat.S_IMODE(fleet_ca.ca_key_path(repo).stat().st_mode) == 0o600
    ca = _ca(repo)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _crl_serials(repo) == set()
    with pytest.raises(RepoError, match="exists already"):
        fleet_ca.init_ca(repo)


def test_client_certificates_name_the_identity_and_chain_to_the_ca(repo: Path) -> None:
    _, a = fleet_ca.issue_client(repo, "cam-1", "device")
    _, b = fleet_ca.issue_client(repo, "cam-2", "device")
    for cert, name in ((a, "cam-1"), (b, "cam-2")):
        cert.verify_directly_issued_by(_ca(repo))
        assert _cn(cert) == name
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert a.serial_number != b.serial_number and a.serial_number.bit_length() > 64
    assert {(r.identity, r.role) for r in fleet_ca.issued(repo)} >= {("cam-1", "device"), ("cam-2", "device")}


def test_the_broker_certificate_serves_its_host_and_localhost_addresses(repo: Path) -> None:
    _, cert = fleet_ca.issue_server(repo, "localhost")
    cert.verify_directly_issued_by(_ca(repo))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(InputError):
        fleet_ca.issue_server(repo, "bad host")


@pytest.mark.parametrize(("role", "name"), [("packager", None), ("dashboard", None), ("app", "cam")])
def test_role_identities_can_never_be_device_ids(role: str, name: str | None) -> None:
    identity = fleet_ca.identity_name(role, "f1", name)
    assert "f1" in identity and not is_id(identity)


def test_identity_names_refuse_what_they_cannot_hold() -> None:
    with pytest.raises(InputError, match="--name"):
        fleet_ca.identity_name("app", "f1")
    with pytest.raises(InputError, match="--fleet"):
        fleet_ca.identity_name("packager", "f.1")
    with pytest.raises(InputError, match="role"):
        fleet_ca.identity_name("device", "f1")


def test_device_add_writes_a_working_device_directory(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "dev-a"
    p = provision.add_device(repo, "dev-a", "lab", out, BROKER, "f1", device_dir=PurePosixPath(out),
                             state_dir=PurePosixPath(tmp_path / "state"))
    assert sorted(os.listdir(out)) == sorted(provision.FILES)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for private in ("client.key", "decrypt.key"):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600
        assert not keystore.is_encrypted((out / private).read_bytes())
    assert (out / "root.json").read_bytes() == tuf_repo.provisioning_root(repo).read_bytes()
    assert (out / "ca.pem").read_bytes() == fleet_ca.ca_cert_path(repo).read_bytes()
    cert = x509.load_pem_x509_certificate((out / "client.pem").read_bytes())
    cert.verify_directly_issued_by(_ca(repo))
    assert _cn(cert) == "dev-a"
    key = serialization.load_pem_private_key((out / "client.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()

    cfg = parse_config(tomllib.loads((out / "agent.toml").read_text()), {})
    check_paths(cfg)  # every file it names is there, with the right modes
    assert (cfg.agent.device_id, cfg.agent.fleet, cfg.agent.group, cfg.mqtt.url) == ("dev-a", "f1", "lab", BROKER)
    assert (cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file, cfg.trust.decrypt_key_file) == (
        str(out / "ca.pem"), str(out / "client.pem"), str(out / "client.key"), str(out / "decrypt.key"))

    record = devices.get(repo, "dev-a")
    assert record == p.record and record.cert_serial == cert.serial_number and record.group == "lab"
    decrypt = serialization.load_pem_private_key((out / "decrypt.key").read_bytes(), None)
    assert isinstance(decrypt, X25519PrivateKey)
    assert record.x25519_public == devices.public_b64(decrypt.public_key())
    assert b"PRIVATE" not in devices._path(repo, "dev-a").read_bytes()


def test_device_add_writes_all_or_nothing(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "dev-x"

    def refuse(repo: Path, record: devices.DeviceRecord) -> Path:
        raise InputError("registry refused")

    monkeypatch.setattr(devices, "register", refuse)
    with pytest.raises(InputError, match="registry refused"):
        provision.add_device(repo, "dev-x", "lab", out, BROKER)
    assert os.listdir(tmp_path) == []  # neither the directory nor its temporary sibling
    monkeypatch.undo()

    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="exists already"):
        provision.add_device(repo, "dev-y", "lab", tmp_path / "taken", BROKER)
    for bad in ("mqtt://broker:1883", "mqtts://a:1,mqtt://b:2", "http://x"):
        with pytest.raises(InputError, match="--broker"):
            provision.add_device(repo, "dev-y", "lab", tmp_path / "y", bad)
    with pytest.raises(InputError, match="device id"):
        provision.add_device(repo, "dev.y", "lab", tmp_path / "y", BROKER)
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    with pytest.raises(InputError, match="dev-y"):
        devices.get(repo, "dev-y")


def test_revoking_a_device_puts_its_serial_in_the_signed_crl(repo: Path, tmp_path: Path) -> None:
    p = provision.add_device(repo, "dev-r", "lab", tmp_path / "r", BROKER)
    other = provision.add_device(repo, "dev-s", "lab", tmp_path / "s", BROKER)
    number = _crl_number(repo)
    rec = provision.revoke_device(repo, "dev-r")
    assert rec.revoked is not None and _crl_number(repo) == number + 1
    serials = _crl_serials(repo)
    assert p.record.cert_serial in serials and other.record.cert_serial not in serials
    assert [d.device_id for d in devices.active_devices(repo)].count("dev-r") == 0
    with pytest.raises(InputError, match="already revoked"):
        provision.revoke_device(repo, "dev-r")
    with pytest.raises(InputError, match="already registered"):
        provision.add_device(repo, "dev-r", "lab", tmp_path / "r2", BROKER)


def test_identities_for_workstations_are_encrypted_and_apps_enter_the_acl(repo: Path, tmp_path: Path) -> None:
    identity, cert, key = provision.issue_identity(repo, "app", "f9", tmp_path, "door")
    assert identity == "edgeship.app.f9.door" and keystore.is_encrypted(key.read_bytes())
    assert _cn(x509.load_pem_x509_certificate(cert.read_bytes())) == identity
    assert "user edgeship.app.f9.door" in provision.acl_text(repo, "f9")
    with pytest.raises(InputError, match="exists already"):
        provision.issue_identity(repo, "app", "f9", tmp_path, "door")
    serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    fleet_ca.revoke(repo, serial)
    assert "door" not in provision.acl_text(repo, "f9") and serial in _crl_serials(repo)


@pytest.mark.parametrize(("argv", "message"), [
    (["device", "add", "dev-z", "--group", "lab", "--out", "{tmp}/z", "--broker", "mqtt://b:1883"],
     "needs mqtts://"),
    (["device", "revoke", "nobody"], "no device nobody"),
    (["ca", "revoke", "zz"], "expected hex digits"),
    (["ca", "issue", "--role", "app", "--out", "{tmp}/i"], "needs --name"),
])
def test_cli_errors_are_one_line_and_exit_2(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             argv: list[str], message: str) -> None:
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--repo", str(repo)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_the_agent_refuses_a_client_key_others_may_read_or_that_is_encrypted(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "dev-k"
    provision.add_device(repo, "dev-k", "lab", out, BROKER, device_dir=PurePosixPath(out),
                         state_dir=PurePosixPath(tmp_path / "state"))
    doc = tomllib.loads((out / "agent.toml").read_text())
    key = out / "client.key"
    key.chmod(0o640)
    with pytest.raises(ConfigError, match=r"\[mqtt\] key_file .*0640"):
        check_paths(parse_config(doc, {}))
    key.chmod(0o600)
    key.write_bytes(keystore.encrypted_pem(serialization.load_pem_private_key(key.read_bytes(), None)))
    with pytest.raises(ConfigError, match=r"\[mqtt\] key_file .*encrypted"):
        check_paths(parse_config(doc, {}))


@pytest.mark.parametrize(("mqtt", "message"), [
    ({"url": BROKER, "cert_file": "c.pem"}, "both or neither"),
    ({"url": BROKER, "key_file": "k.pem"}, "both or neither"),
    ({"url": "mqtt://broker:1883", "cert_file": "c.pem", "key_file": "k.pem"}, "needs mqtts://"),
    ({"url": BROKER, "cert_file": "c.pem", "key_file": "k.pem"}, "cert_file needs ca_file"),
])
def test_client_certificate_settings_that_cannot_work_are_config_errors(mqtt: dict[str, str], message: str) -> None:
    doc = {"agent": {"device_id": "d", "state_dir": "/tmp/x"}, "trust": {"root": "/tmp/root.json"}, "mqtt": mqtt}
    with pytest.raises(ConfigError, match=message):
        parse_config(doc, {})


def test_ca_revoke_leaves_devices_to_device_revoke(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    p = provision.add_device(repo, "dev-c", "lab", tmp_path / "c", BROKER)
    assert main(["ca", "revoke", f"{p.record.cert_serial:x}", "--repo", str(repo)]) == 2
    assert "packager device revoke" in capsys.readouterr().err
    assert p.record.cert_serial not in _crl_serials(repo) and devices.get(repo, "dev-c").revoked is None


def test_the_listener_docs_security_md_shows_is_the_one_printed() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    shown = doc.split("prints the listener for `mosquitto.conf`:\n\n```\n", 1)[1].split("```", 1)[0]
    assert shown == provision.mosquitto_listener(8883, "/etc/mosquitto/edgeship", "/etc/mosquitto/edgeship.acl")
