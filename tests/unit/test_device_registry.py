"""The device registry's one-record-per-id rule under concurrency (packager/devices.py register, packager/provision.py
add_device), and `packager ca revoke` of a device certificate no active record names."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from packager import devices, fleet_ca, provision, tuf_repo
from packager.cli import main
from packager.errors import InputError

BROKER = "mqtts://broker.example:8883"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    fleet_ca.init_ca(repo)
    return repo


def _record(device_id: str, serial: int) -> devices.DeviceRecord:
    return devices.DeviceRecord(device_id=device_id, group="lab", cert_serial=serial,
                                x25519_public=devices.public_b64(devices.new_decryption_key().public_key()),
                                added=devices.now_iso())


def _race(run: Callable[[int], object], n: int) -> tuple[list[object], list[BaseException]]:
    """Run `run(i)` for i < n in n threads released together; (results, errors)."""
    start = threading.Barrier(n)
    results: list[object] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        start.wait()
        try:
            results.append(run(i))
        except BaseException as e:  # collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_registering_an_id_twice_is_refused_and_keeps_the_first_record(repo: Path) -> None:
    devices.register(repo, _record("dev-1", 1))
    with pytest.raises(InputError, match="already registered"):
        devices.register(repo, _record("dev-1", 2))
    assert devices.get(repo, "dev-1").cert_serial == 1
    assert [p.name for p in devices.registry_dir(repo).iterdir()] == ["dev-1.json"]  # no temporary file left


def test_of_racing_registrations_of_one_id_exactly_one_wins(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_exists = Path.exists
    seen = threading.Barrier(8)

    def exists_after_all_looked(self: Path, *a: object, **k: object) -> bool:  # every racer past any exists() check
        answer = real_exists(self, *a, **k)  # type: ignore[arg-type]
        if self.parent == devices.registry_dir(repo):
            seen.wait(timeout=5)
        return answer

    monkeypatch.setattr(Path, "exists", exists_after_all_looked)
    results, errors = _race(lambda i: devices.register(repo, _record("dev-1", 100 + i)), 8)
    assert len(results) == 1 and len(errors) == 7
    assert all(isinstance(e, InputError) and "already registered" in str(e) for e in errors)
    assert devices.get(repo, "dev-1").cert_serial in range(100, 108)
    assert [p.name for p in devices.registry_dir(repo).iterdir()] == ["dev-1.json"]


def test_racing_device_adds_of_one_id_issue_one_certificate(repo: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    issue = fleet_ca.issue_client

    def slow_issue(*a: object, **k: object) -> object:  # the other add gets every chance to issue meanwhile
        out = issue(*a, **k)  # type: ignore[arg-type]
        threading.Event().wait(0.3)
        return out

    monkeypatch.setattr(fleet_ca, "issue_client", slow_issue)
    results, errors = _race(lambda i: provision.add_device(repo, "dev-1", "lab", tmp_path / f"out{i}", BROKER), 2)
    assert len(results) == 1 and len(errors) == 1 and isinstance(errors[0], InputError)
    issued = [r.serial for r in fleet_ca.issued(repo) if r.identity == "dev-1"]
    assert issued == [devices.get(repo, "dev-1").cert_serial]
    assert sum((tmp_path / f"out{i}").exists() for i in range(2)) == 1


def _crl_serials(repo: Path) -> set[int]:
    return {r.serial_number for r in x509.load_pem_x509_crl(fleet_ca.crl_path(repo).read_bytes())}


def test_ca_revoke_revokes_an_orphan_device_certificate_but_not_a_registered_one(
        repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = provision.add_device(repo, "dev-1", "lab", tmp_path / "out", BROKER)
    _, orphan = fleet_ca.issue_client(repo, "dev-1", "device")  # what a lost race used to leave behind
    assert main(["ca", "revoke", f"{orphan.serial_number:x}", "--repo", str(repo)]) == 0
    assert orphan.serial_number in _crl_serials(repo)
    assert main(["ca", "revoke", f"{p.record.cert_serial:x}", "--repo", str(repo)]) == 2
    assert "packager device revoke dev-1" in capsys.readouterr().err
    assert p.record.cert_serial not in _crl_serials(repo) and devices.get(repo, "dev-1").revoked is None
