"""The fleet CA (packager/fleet_ca.py) and device provisioning (packager/provision.py): certificates checked with
cryptography's own verification, files and modes, all-or-nothing `device add`, revocation into the CRL, and the
one-line errors of `packager ca` / `packager device`."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import re
import shutil
import stat
import subprocess
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


def test_the_ca_key_is_encrypted_at_rest_and_the_ca_is_made_once(tmp_path: Path) -> None:
    repo = tmp_path / "repo"  # its own: the module's repository collects revocations from other tests
    tuf_repo.init_repo(repo)
    fleet_ca.init_ca(repo)
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
    issued_before = fleet_ca.issued(repo)
    with pytest.raises(InputError, match="registry refused"):
        provision.add_device(repo, "dev-x", "lab", out, BROKER)
    assert os.listdir(tmp_path) == []  # neither the directory nor its temporary sibling
    assert fleet_ca.issued(repo) == issued_before  # nor a certificate record nobody holds
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


def _records(repo: Path) -> set[int]:
    return {r.serial for r in fleet_ca.issued(repo)}


def test_certificates_use_only_what_ecdsa_tls_needs_and_the_crl_names_its_key(repo: Path) -> None:
    for _, cert in (fleet_ca.issue_client(repo, "cam-ku", "device"), fleet_ca.issue_server(repo, "broker.example")):
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and not usage.key_agreement and not usage.key_encipherment
    fleet_ca.revoke(repo, fleet_ca.issue_client(repo, "cam-aki", "device")[1].serial_number)
    crl = x509.load_pem_x509_crl(fleet_ca.crl_path(repo).read_bytes())
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = _ca(repo).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_a_crl_that_does_not_read_is_refused_not_numbered_from_zero(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    fleet_ca.init_ca(repo)
    serial = fleet_ca.issue_client(repo, "cam-crl", "app")[1].serial_number
    fleet_ca.crl_path(repo).write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    with pytest.raises(RepoError, match="CRL number"):
        fleet_ca.revoke(repo, serial)


def test_the_ca_and_issued_identities_are_private_directories(repo: Path, tmp_path: Path) -> None:
    provision.issue_identity(repo, "packager", "f7", tmp_path / "ids")
    for d in (fleet_ca.ca_dir(repo), fleet_ca.ca_dir(repo) / "issued", tmp_path / "ids"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


@pytest.mark.parametrize(("host", "san"), [
    ("exämple.com", "xn--exmple-cua.com"),
    (".".join(["a" * 60] * 4), ".".join(["a" * 60] * 4)),  # 243 characters: in the SAN, the CN stays short
])
def test_broker_hosts_go_into_the_san_as_ascii_dns_names(repo: Path, host: str, san: str) -> None:
    _, cert = fleet_ca.issue_server(repo, host)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [san]
    assert _cn(cert) == (san if len(san) <= 64 else fleet_ca.BROKER_CN)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("packager: error: "), err
    return err


@pytest.mark.parametrize("host", ["a\nb.example", "a,b.example", "a#b", "a:b", "a" * 64 + ".example", "x" * 254,
                                  "-a.example", "a..b", "*.example"])
def test_hosts_that_are_not_ldh_labels_are_refused_leaving_nothing(repo: Path, tmp_path: Path, host: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = _records(repo)
    assert "--host" in _cli(["ca", "broker-cert", f"--host={host}", "--out", str(tmp_path / "b"),
                             "--repo", str(repo)], capsys)
    assert not (tmp_path / "b").exists() and _records(repo) == before


def test_identities_longer_than_a_common_name_are_refused(repo: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    fleet = "f" * 50
    before = _records(repo)
    assert "at most 64" in _cli(["ca", "issue", "--role", "dashboard", "--fleet", fleet, "--out",
                                 str(tmp_path / "i"), "--repo", str(repo)], capsys)
    assert not (tmp_path / "i").exists() and _records(repo) == before
    with pytest.raises(InputError, match="app name"):
        fleet_ca.identity_name("app", "f" * 40, "n" * 20)
    assert len(fleet_ca.identity_name("dashboard", "f" * 45)) == 64


@pytest.mark.parametrize("command", [["ca", "issue", "--role", "packager"], ["ca", "broker-cert", "--host", "b.ex"]])
@pytest.mark.parametrize("out", ["/proc/nope", "{tmp}/afile/x"])
def test_an_out_directory_that_cannot_be_written_issues_nothing(repo: Path, tmp_path: Path, command: list[str],
                                                                 out: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("a file, not a directory")
    before = _records(repo)
    assert "--out" in _cli([*command, "--out", out.replace("{tmp}", str(tmp_path)), "--repo", str(repo)], capsys)
    assert _records(repo) == before  # no certificate recorded whose key was never written


def test_a_write_that_fails_after_issuing_forgets_the_certificate(repo: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    before = _records(repo)

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(provision, "_write_public", disk_full)
    with pytest.raises(RepoError, match="No space left"):
        provision.broker_files(repo, "b.example", tmp_path / "b")
    with pytest.raises(RepoError, match="No space left"):
        provision.issue_identity(repo, "packager", "f8", tmp_path / "i")
    with pytest.raises(RepoError, match="No space left"):
        provision.add_device(repo, "dev-full", "lab", tmp_path / "d", BROKER)
    assert _records(repo) == before and os.listdir(tmp_path) == []


def test_device_add_refused_for_its_out_directory_creates_no_ca(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="exists already"):
        provision.add_device(repo, "dev-t", "lab", tmp_path / "taken", BROKER)
    assert not fleet_ca.exists(repo) and not fleet_ca.ca_key_path(repo).exists()


@pytest.mark.parametrize("argv", [["ca", "acl"], ["ca", "list"], ["ca", "revoke", "abc"]])
def test_ca_commands_on_a_repository_without_a_ca_are_errors(tmp_path: Path, argv: list[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    for where in (tmp_path / "nope", repo):
        assert "no fleet CA" in _cli([*argv, "--repo", str(where)], capsys)


def _revoke_all(repo: str, serials: list[int]) -> None:
    for serial in serials:
        fleet_ca.revoke(Path(repo), serial)


def test_concurrent_revocations_lose_no_serial(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    fleet_ca.init_ca(repo)
    serials = [fleet_ca.issue_client(repo, f"cam-{i}", "device")[1].serial_number for i in range(24)]
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_revoke_all, args=(str(repo), serials[i::4])) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert _crl_serials(repo) == set(serials)
    assert _crl_number(repo) == 1 + len(serials)  # one CRL per revocation, each numbered one higher


def test_device_keys_as_systemd_credentials_of_the_dynamic_user_service(repo: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """edge-agent.service runs as a DynamicUser= that cannot read root's 0600 keys: with --systemd-credentials the
    keys reach it through LoadCredential= (0400, its own), and agent.toml reads them where systemd puts them."""
    out = tmp_path / "dev-cred"
    provision.add_device(repo, "dev-cred", "lab", out, BROKER, systemd_credentials=True)
    cfg = tomllib.loads((out / "agent.toml").read_text())
    assert cfg["mqtt"]["key_file"] == "/run/credentials/edge-agent.service/client.key"
    assert cfg["trust"]["decrypt_key_file"] == "/run/credentials/edge-agent.service/decrypt.key"
    assert cfg["mqtt"]["cert_file"] == "/etc/edge-agent/client.pem"
    drop_in = (out / provision.DROP_IN).read_text()
    assert "LoadCredential=client.key:/etc/edge-agent/client.key" in drop_in
    assert "LoadCredential=decrypt.key:/etc/edge-agent/decrypt.key" in drop_in
    # the unit with the drop-in: systemd reads every line of it, and the sandbox's score is unchanged
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (tests/unit/test_systemd_units.py says why CI has it)")
    units = tmp_path / "units"
    (units / "edge-agent.service.d").mkdir(parents=True)
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "edge-agent.service").read_text()
    (units / "edge-agent.service").write_text(re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", unit))
    (units / "edge-agent.service.d" / provision.DROP_IN).write_text(drop_in)
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"}
    r = subprocess.run([analyze, "verify", str(units / "edge-agent.service")], env=env, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    shown = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(units / "edge-agent.service")],
                           env=env, capture_output=True, text=True, check=False).stdout
    assert float(re.findall(r"Overall exposure level for edge-agent.service: ([0-9.]+)", shown)[0]) <= 2.0
    # the agent takes keys as systemd hands them over (0400): agent.toml made for a stand-in credentials dir
    creds = tmp_path / "credentials"
    creds.mkdir()
    monkeypatch.setattr(provision, "CREDENTIALS_DIR", PurePosixPath(creds))
    for name in provision.CREDENTIAL_FILES:
        (creds / name).write_bytes((out / name).read_bytes())
        (creds / name).chmod(0o400)
    doc = tomllib.loads(provision.agent_toml("dev-cred", "lab", "default", BROKER, PurePosixPath(out),
                                             PurePosixPath(tmp_path / "state"), systemd_credentials=True))
    assert parse_config(doc, {}).mqtt.key_file == str(creds / "client.key")
    check_paths(parse_config(doc, {}))
