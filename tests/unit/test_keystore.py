"""Keys at rest (packager/keystore.py, packager/tuf_repo.py, `packager keys encrypt`): every private key the packager
writes is encrypted PKCS#8 PEM, 0600 in a 0700 directory; a wrong or missing passphrase is one line and exit 2;
a repository made before keys were encrypted is converted in place and still signs; the online operations never
read the root keys, and `packager refresh` finds its passphrase in a systemd credential as the refresh unit gives
it (no EDGESHIP_KEY_PASSPHRASE, the root keys out of reach)."""

from __future__ import annotations

import importlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from examples.local_broker import Mosquitto
from packager import confidential, fleet_ca, keystore, tuf_repo
from packager.errors import RepoError

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = os.environ["EDGESHIP_KEY_PASSPHRASE"]  # tests/conftest.py


def packager(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`packager ...` as a child without a terminal (stdin /dev/null: no prompt is possible)."""
    return subprocess.run([sys.executable, "-m", "packager.cli", *args], cwd=ROOT, env=env if env is not None
                          else dict(os.environ), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, check=False)


def env_without_passphrase(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (keystore.PASSPHRASE_ENV, keystore.ROOT_PASSPHRASE_ENV,
                                                           "CREDENTIALS_DIRECTORY")}
    return {**env, **extra}


def key_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.pem"))


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("packager: error: "), r.stderr
    return lines[0]


@pytest.fixture(autouse=True)
def fresh_passphrases() -> Iterator[None]:
    keystore.forget_passphrases()
    yield
    keystore.forget_passphrases()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository made by the command line, as an operator makes it."""
    r = packager("keys", "init", "--repo", str(tmp_path / "repo"))
    assert r.returncode == 0, r.stderr
    return tmp_path / "repo"


def test_keys_init_writes_every_key_encrypted_and_private(repo: Path) -> None:
    root_dir = tuf_repo.default_root_key_dir(repo)
    keys = key_files(tuf_repo.keys_dir(repo), root_dir)
    assert len(keys) == 6
    for d in (tuf_repo.keys_dir(repo), root_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        pem = path.read_bytes()
        assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        with pytest.raises(TypeError):  # nothing readable without the passphrase
            serialization.load_pem_private_key(pem, None)
        serialization.load_pem_private_key(pem, PASSPHRASE.encode())


def test_wrong_passphrase_is_one_line_and_exit_2(repo: Path) -> None:
    before = sorted(p.name for p in tuf_repo.metadata_dir(repo).iterdir())
    line = one_line_error(packager("refresh", "--repo", str(repo),
                                   env=env_without_passphrase(EDGESHIP_KEY_PASSPHRASE="not-the-passphrase")))
    assert "wrong passphrase for the online keys" in line
    assert sorted(p.name for p in tuf_repo.metadata_dir(repo).iterdir()) == before  # nothing signed


def test_no_passphrase_and_no_terminal_is_one_line_and_exit_2(tmp_path: Path, repo: Path) -> None:
    line = one_line_error(packager("refresh", "--repo", str(repo), env=env_without_passphrase()))
    assert "EDGESHIP_KEY_PASSPHRASE" in line
    # asked for before connecting: the missing passphrase is the error, not the broker nobody listens as
    line = one_line_error(packager("refresh", "--repo", str(repo), "--broker", "mqtt://127.0.0.1:1",
                                   env=env_without_passphrase()))
    assert "EDGESHIP_KEY_PASSPHRASE" in line
    # init asks before it writes: no half-made repository
    line = one_line_error(packager("keys", "init", "--repo", str(tmp_path / "other"), env=env_without_passphrase()))
    assert "EDGESHIP_ROOT_KEY_PASSPHRASE or EDGESHIP_KEY_PASSPHRASE" in line
    assert not (tmp_path / "other").exists() and not (tmp_path / "other-root-keys").exists()
    line = one_line_error(packager("keys", "init", "--repo", str(tmp_path / "other"),
                                   env=env_without_passphrase(EDGESHIP_KEY_PASSPHRASE="short")))
    assert f"at least {keystore.MIN_PASSPHRASE} characters" in line


def test_a_prompt_asks_twice_before_keys_are_made(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(keystore.PASSPHRASE_ENV)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["a-long-passphrase-1", "a-long-passphrase-2"])
    monkeypatch.setattr(keystore.getpass, "getpass", lambda prompt: next(answers))
    with pytest.raises(RepoError, match="the two passphrases differ"):
        tuf_repo.init_repo(tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    answers = iter(["a-long-passphrase-1"])
    assert keystore.passphrase("online") == b"a-long-passphrase-1"  # reading keys: asked once


def test_a_passphrase_typed_once_is_asked_again_before_a_key_is_written_with_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """E.g. `device add` creating the fleet CA: no key has proven the passphrase typed once."""
    monkeypatch.delenv(keystore.PASSPHRASE_ENV)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["a-long-passphrase-1", "a-long-passphrase-2", "a-long-passphrase-1", "a-long-passphrase-1"])
    monkeypatch.setattr(keystore.getpass, "getpass", lambda prompt: next(answers))
    assert keystore.passphrase() == b"a-long-passphrase-1"
    with pytest.raises(RepoError, match="the two passphrases differ"):
        keystore.write_private_key(tmp_path / "ca.key", Ed25519PrivateKey.generate())
    assert not (tmp_path / "ca.key").exists()
    keystore.write_private_key(tmp_path / "ca.key", Ed25519PrivateKey.generate())  # typed twice alike: written
    keystore.load_private_key(tmp_path / "ca.key")
    keystore.write_private_key(tmp_path / "other.key", Ed25519PrivateKey.generate())  # proven by a key: not asked
    with pytest.raises(StopIteration):
        next(answers)


def _make_legacy(keys: list[Path]) -> list[Path]:
    """Rewrite `keys` as the packager wrote them before this change: plaintext PKCS#8 PEM."""
    for path in keys:
        key = serialization.load_pem_private_key(path.read_bytes(), PASSPHRASE.encode())
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o644)  # the migration's files are 0600 from their creation, whatever the old ones were
    return keys


def test_keys_encrypt_converts_a_legacy_repository(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    root_dir = tuf_repo.default_root_key_dir(repo)
    tuf_repo.rotate_keys(repo, "timestamp")  # a retired key too
    keys = _make_legacy(key_files(tuf_repo.keys_dir(repo), root_dir))
    assert len(keys) == 7 and any(p.parent.name == "retired" for p in keys)
    tuf_repo.refresh(repo)  # a legacy repository still signs, and says what to do
    assert "packager keys encrypt" in caplog.text
    # a crash of an earlier run after writing an encrypted copy, before its rename: the plaintext key is intact
    stale = keys[0].with_name(f".{keys[0].name}.encrypting")
    stale.write_bytes(b"half")

    r = packager("keys", "encrypt", "--repo", str(repo))
    assert r.returncode == 0, r.stderr
    assert "7 private key(s) encrypted" in r.stdout
    assert key_files(tuf_repo.keys_dir(repo), root_dir) == keys  # same files, none lost or added
    for path in keys:
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for d in (repo, root_dir) for p in d.rglob(".*.encrypting")]
    # signing still works, online and root
    assert packager("refresh", "--repo", str(repo), "--force-snapshot").returncode == 0
    tuf_repo.rotate_keys(repo, "root")
    assert (tuf_repo.metadata_dir(repo) / "3.root.json").is_file()
    r = packager("keys", "encrypt", "--repo", str(repo))  # idempotent
    assert r.returncode == 0 and "0 private key(s) encrypted" in r.stdout


def test_keys_encrypt_refuses_a_passphrase_other_than_the_keys_already_encrypted(repo: Path) -> None:
    online = key_files(tuf_repo.keys_dir(repo))
    _make_legacy(online[:1])  # a half-converted repository: one plaintext key beside two encrypted
    line = one_line_error(packager("keys", "encrypt", "--repo", str(repo),
                                   env=env_without_passphrase(EDGESHIP_KEY_PASSPHRASE="another-passphrase")))
    assert "wrong passphrase" in line
    assert not keystore.is_encrypted(online[0].read_bytes())  # nothing written under the wrong passphrase
    line = one_line_error(packager("keys", "encrypt", "--repo", str(repo), "--root-key-dir", str(repo / "nowhere")))
    assert "no such directory" in line


def test_online_operations_never_read_root_keys(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[tuple[Path, str]] = []
    load = keystore.load_private_key

    def spy(path: Path, kind: keystore.KeyKind = "online") -> object:
        read.append((path, kind))
        return load(path, kind)

    monkeypatch.setattr(keystore, "load_private_key", spy)
    bundle = tmp_path / "model.bin"
    bundle.write_bytes(b"weights" * 1000)
    tuf_repo.add_target(repo, "bundles/model-1.bundle", bundle)
    tuf_repo.refresh(repo, force_snapshot=True)
    tuf_repo.remove_target(repo, "bundles/model-1.bundle")
    assert read and all(kind == "online" and path.parent == tuf_repo.keys_dir(repo) for path, kind in read)


def test_refresh_as_the_unit_runs_it(repo: Path, tmp_path: Path, mosquitto: Mosquitto) -> None:
    """edgeship-refresh.service: the passphrase only as a systemd credential, the root keys out of reach."""
    root_dir = tuf_repo.default_root_key_dir(repo)
    root_dir.rename(tmp_path / "offline-media")
    root_dir.mkdir(mode=0o000)  # InaccessiblePaths= leaves an empty, unreadable directory in its place
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / keystore.CREDENTIAL_NAME).write_text(PASSPHRASE + "\n")
    env = env_without_passphrase(CREDENTIALS_DIRECTORY=str(creds))
    r = packager("refresh", "--repo", str(repo), "--broker", mosquitto.url, "--fleet", "keystore-test", env=env)
    assert r.returncode == 0, r.stderr
    assert "re-signed timestamp" in r.stdout
    # the same service asked to rotate a key cannot: root keys are not there
    line = one_line_error(packager("keys", "rotate", "timestamp", "--repo", str(repo), env=env))
    assert "root needs 2 of its keys" in line


def test_new_keys_are_written_only_under_the_repositorys_passphrase(repo: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet CA or escrow key made under another passphrase would lock out every command needing it with the
    online keys: the passphrase is checked against an existing online key before either is written."""
    other = env_without_passphrase(EDGESHIP_KEY_PASSPHRASE="another-passphrase")
    line = one_line_error(packager("device", "add", "d1", "--group", "lab", "--repo", str(repo), "--out",
                                   str(tmp_path / "d1"), "--broker", "mqtts://broker.example:8883", env=other))
    assert "wrong passphrase" in line
    assert not fleet_ca.ca_key_path(repo).exists() and not (tmp_path / "d1").exists()
    monkeypatch.setenv(keystore.PASSPHRASE_ENV, "another-passphrase")
    with pytest.raises(RepoError, match="wrong passphrase"):
        confidential.escrow_key(repo)
    assert not (confidential.content_keys_dir(repo) / confidential.ESCROW_KEY).exists()
    # with the repository's passphrase both are made, and keys encrypt still opens everything
    monkeypatch.setenv(keystore.PASSPHRASE_ENV, PASSPHRASE)
    keystore.forget_passphrases()
    confidential.escrow_key(repo)
    assert packager("device", "add", "d1", "--group", "lab", "--repo", str(repo), "--out", str(tmp_path / "d1"),
                    "--broker", "mqtts://broker.example:8883").returncode == 0
    assert packager("keys", "encrypt", "--repo", str(repo)).returncode == 0


def test_root_keys_never_take_the_services_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / keystore.CREDENTIAL_NAME).write_text(PASSPHRASE + "\n")
    for name in (keystore.PASSPHRASE_ENV, keystore.ROOT_PASSPHRASE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert keystore.passphrase("online") == PASSPHRASE.encode()
    with pytest.raises(RepoError, match=keystore.ROOT_PASSPHRASE_ENV) as e:
        keystore.passphrase("root")
    assert keystore.CREDENTIAL_NAME not in str(e.value)


def test_keys_init_warns_when_root_and_online_keys_share_a_passphrase(tmp_path: Path) -> None:
    same = packager("keys", "init", "--repo", str(tmp_path / "a"), env=env_without_passphrase(
        EDGESHIP_KEY_PASSPHRASE=PASSPHRASE))
    assert same.returncode == 0 and "warning" in same.stderr and keystore.ROOT_PASSPHRASE_ENV in same.stderr
    own = packager("keys", "init", "--repo", str(tmp_path / "b"), env=env_without_passphrase(
        EDGESHIP_KEY_PASSPHRASE=PASSPHRASE, EDGESHIP_ROOT_KEY_PASSPHRASE="the-root-keys-own"))
    assert own.returncode == 0 and own.stderr == ""


def test_keys_encrypt_touches_only_the_packagers_own_keys(repo: Path) -> None:
    """A device's or a broker's --out under REPO keeps its plaintext key (the agent and Mosquitto read it
    unattended); the fleet CA key of a legacy repository is encrypted."""
    assert packager("device", "add", "d1", "--group", "lab", "--repo", str(repo), "--out", str(repo / "out" / "d1"),
                    "--broker", "mqtts://broker.example:8883").returncode == 0
    assert packager("ca", "broker-cert", "--host", "broker.example", "--repo", str(repo), "--out",
                    str(repo / "out" / "broker")).returncode == 0
    _make_legacy([fleet_ca.ca_key_path(repo)])
    r = packager("keys", "encrypt", "--repo", str(repo))
    assert r.returncode == 0, r.stderr
    assert "1 private key(s) encrypted" in r.stdout and keystore.is_encrypted(fleet_ca.ca_key_path(repo).read_bytes())
    for key in (repo / "out" / "d1" / "client.key", repo / "out" / "d1" / "decrypt.key",
                repo / "out" / "broker" / "broker.key"):
        assert not keystore.is_encrypted(key.read_bytes()), key


def test_the_demo_gives_passphrases_to_packager_commands_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/demo.py: the agents, the dashboard and the training run never see the caller's passphrase."""
    monkeypatch.setenv(keystore.PASSPHRASE_ENV, "the-callers-real-passphrase")
    monkeypatch.setenv(keystore.ROOT_PASSPHRASE_ENV, "the-callers-root-passphrase")
    sys.modules.pop("examples.demo", None)
    demo = importlib.import_module("examples.demo")
    try:
        assert keystore.PASSPHRASE_ENV not in demo.CHILD_ENV and keystore.ROOT_PASSPHRASE_ENV not in demo.CHILD_ENV
        assert demo.PACKAGER_ENV[keystore.PASSPHRASE_ENV] == "the-callers-real-passphrase"
        assert demo.PACKAGER_ENV[keystore.ROOT_PASSPHRASE_ENV] == "the-callers-root-passphrase"
    finally:
        sys.modules.pop("examples.demo", None)


def test_a_new_private_file_is_0600_from_creation_and_never_overwrites(tmp_path: Path) -> None:
    """The one writer of new private files: the packager's keys and a device's (packager/provision.py)."""
    path = tmp_path / "k.pem"
    old_umask = os.umask(0)  # a 0600 file even where the umask would leave it world-readable
    try:
        keystore.write_new_private_file(path, b"secret")
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"secret" and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        keystore.write_new_private_file(path, b"other")
    assert path.read_bytes() == b"secret"
