"""`edge-agent install` as a real process into temporary directories (every path is an option; no root needed):
config and trust root written with their modes, the state directory created 0700, the unit rendered for these
paths (and accepted by `systemd-analyze verify` when it is installed), the runtime probe's import check run in real
child processes, including one made to die with SIGILL (EDGESHIP_PROBE_FAULT, honoured only in the probe's child),
which is recorded and shown by `edge-agent status`; reruns, conflicts and --force; bad input exits 2."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import cli, install
from agent.config import load_config
from agent.install import hidden_by_sandbox, render_unit, set_keys, unit_template, unit_word
from packager import tuf_repo

BIN = Path(sys.executable).parent
TEMPLATE = """# a device's config
[agent]
device_id = "pi-1"   # this device
state_dir = "/somewhere/else"

[mqtt]
url = "mqtt://192.0.2.1:1883"
"""


@pytest.fixture(scope="module")
def root_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo") / "repo"
    tuf_repo.init_repo(repo)
    return tuf_repo.provisioning_root(repo)


def run(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_")}
    return subprocess.run([str(BIN / "edge-agent"), *args], capture_output=True, text=True, timeout=300,
                          env={**base, **(env or {})}, cwd=tmp, check=False)


def install_args(tmp: Path, config: Path, root: Path, *extra: str) -> list[str]:
    return ["install", "--config", str(config), "--root", str(root), "--config-dir", str(tmp / "etc"),
            "--state-dir", str(tmp / "state"), "--unit-dir", str(tmp / "units"), *extra]


def test_install_writes_everything_and_probes_the_runtimes(tmp_path: Path, root_json: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(TEMPLATE)
    r = run(tmp_path, *install_args(tmp_path, config, root_json), "--json",
            env={"EDGESHIP_PROBE_FAULT": "onnx:SIGILL"})
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    etc, state, unit = tmp_path / "etc", tmp_path / "state", tmp_path / "units" / "edge-agent.service"
    assert sorted(out["written"]) == sorted(map(str, (etc / "agent.toml", etc / "root.json", unit)))

    # the config: the given file, with the installed state_dir and root; comments kept
    installed = (etc / "agent.toml").read_text()
    assert installed.startswith("# a device's config\n[agent]\n")
    assert f'state_dir = "{state}"' in installed and "/somewhere/else" not in installed
    assert f'[trust]\nroot = "{etc / "root.json"}"' in installed
    assert (etc / "root.json").read_bytes() == root_json.read_bytes()
    assert stat.S_IMODE((etc / "agent.toml").stat().st_mode) == 0o600
    assert stat.S_IMODE((etc / "root.json").stat().st_mode) == 0o644
    assert state.is_dir() and stat.S_IMODE(state.stat().st_mode) == 0o700

    # the unit: this venv's edge-agent, the installed config, the state directory
    text = unit.read_text()
    assert f"\nExecStart={BIN / 'edge-agent'} run --config ${{CREDENTIALS_DIRECTORY}}/agent.toml\n" in text
    assert f"\nLoadCredential=agent.toml:{etc / 'agent.toml'}\n" in text  # the 0600 config, for the dynamic user
    assert f"\nReadWritePaths={state}\n" in text and "StateDirectory=" not in text
    assert out["warnings"] and "outside /var/lib" in out["warnings"][0]
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                           timeout=60, check=False)
        assert v.returncode == 0, v.stderr

    # the runtimes: onnxruntime died with SIGILL in its probe child and is recorded; LiteRT imported
    by_format = {row["format"]: row for row in out["runtimes"]}
    assert by_format["onnx"]["usable"] is False and "SIGILL" in by_format["onnx"]["why"], by_format
    assert by_format["tflite"]["usable"] is True, by_format
    st = run(tmp_path, "status", "--config", str(etc / "agent.toml"), "--json")
    assert st.returncode == 0, st.stderr
    assert [(u["format"], u["usable"]) for u in json.loads(st.stdout)["unusable_runtimes"]] == [("onnx", False)]

    # a rerun changes nothing; a different config is refused without --force, and replaced with it
    again = run(tmp_path, *install_args(tmp_path, config, root_json), "--json", "--no-probe")
    assert again.returncode == 0, again.stderr
    assert sorted(json.loads(again.stdout)["unchanged"]) == sorted(out["written"])
    config.write_text(TEMPLATE.replace("pi-1", "pi-2"))
    refused = run(tmp_path, *install_args(tmp_path, config, root_json), "--no-probe")
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"edge-agent: config: {etc / 'agent.toml'} exists and differs: --force replaces it"
    forced = run(tmp_path, *install_args(tmp_path, config, root_json), "--no-probe", "--force")
    assert forced.returncode == 0, forced.stderr
    assert 'device_id = "pi-2"' in (etc / "agent.toml").read_text()
    assert "next: systemctl daemon-reload && systemctl enable --now edge-agent.service" in forced.stdout


@pytest.mark.parametrize(("change", "message"), [
    ({"root": "not-root"}, "not TUF root metadata"),
    ({"config": "[agent]\ndevice_id = 'a b'\n"}, "[agent] device_id"),
    ({"prefix": "/nonexistent/venv"}, "no bin/edge-agent there"),
    ({"state_dir": "relative/state"}, "give an absolute path"),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, root_json: Path, change: dict[str, str],
                                         message: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(change.get("config", TEMPLATE))
    root = root_json
    if "root" in change:
        root = tmp_path / "bad-root.json"
        root.write_text(json.dumps({"signed": {"_type": "targets"}}))
    args = install_args(tmp_path, config, root, "--no-probe")
    if "prefix" in change:
        args += ["--prefix", change["prefix"]]
    if "state_dir" in change:
        args[args.index("--state-dir") + 1] = change["state_dir"]
    r = run(tmp_path, *args)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "etc").exists() and not (tmp_path / "units").exists()  # nothing written


def test_render_unit_under_var_lib_uses_state_directory() -> None:
    text = render_unit(unit_template(), prefix=Path("/opt/edgeship"), config=Path("/etc/edge-agent/agent.toml"),
                       state_dir=Path("/var/lib/edge-agent"))
    assert text == (Path(__file__).resolve().parents[2] / "systemd" / "edge-agent.service").read_text()
    other = render_unit(unit_template(), prefix=Path("/srv/venv"), config=Path("/etc/x/agent.toml"),
                        state_dir=Path("/var/lib/models/agent"))
    assert "\nStateDirectory=models/agent\n" in other
    assert "\nExecStart=/srv/venv/bin/edge-agent run --config ${CREDENTIALS_DIRECTORY}/agent.toml\n" in other
    assert "\nLoadCredential=agent.toml:/etc/x/agent.toml\n" in other


def test_set_keys_replaces_in_place_or_adds() -> None:
    toml = '[agent]\nstate_dir = "/x"  # old\n\n[mqtt]\nurl = "mqtt://h"\n'
    out = set_keys(toml, {("agent", "state_dir"): "/new", ("trust", "root"): "/etc/r.json",
                          ("mqtt", "ca_file"): "/ca"})
    assert out == ('[agent]\nstate_dir = "/new"\n\n[mqtt]\nca_file = "/ca"\nurl = "mqtt://h"\n\n'
                   '[trust]\nroot = "/etc/r.json"\n')


def snapshot(tmp: Path) -> dict[str, bytes | None]:
    """Every file and directory under `tmp` (None for a directory) with its bytes."""
    return {str(p.relative_to(tmp)): (None if p.is_dir() else p.read_bytes()) for p in sorted(tmp.rglob("*"))}


@pytest.mark.parametrize(("case", "message"), [
    ("config_dir_is_file", "is not a directory"),
    ("state_dir_is_file", "is not a directory"),
    ("unit_dir_under_file", "is not a directory"),
    ("config_not_utf8", "not UTF-8 text"),
    ("config_is_dir", "cannot read it"),
    ("unit_is_dir", "is not a regular file"),
    ("root_differs", "exists and differs"),
    ("ca_file_missing", "[mqtt] ca_file"),
    ("control_char", "holds a control character"),
    ("quote_in_prefix", "a quote or a backslash"),
])
def test_bad_paths_exit_2_with_one_line_and_write_nothing(tmp_path: Path, root_json: Path, case: str,
                                                          message: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(TEMPLATE)
    args = install_args(tmp_path, config, root_json, "--no-probe")

    def put(option: str, value: Path | str) -> None:
        args[args.index(option) + 1] = str(value)

    if case == "config_dir_is_file":
        (tmp_path / "etc").write_text("a file")
    elif case == "state_dir_is_file":
        (tmp_path / "state").write_text("a file")
    elif case == "unit_dir_under_file":
        (tmp_path / "file").write_text("a file")
        put("--unit-dir", tmp_path / "file" / "units")
    elif case == "config_not_utf8":
        config.write_bytes(TEMPLATE.encode() + b"# \xff\xfe latin-1\n")
    elif case == "config_is_dir":
        put("--config", tmp_path)
    elif case == "unit_is_dir":
        (tmp_path / "units" / "edge-agent.service").mkdir(parents=True)
    elif case == "root_differs":  # the config would be new, the root differs: neither is written
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / "root.json").write_text("{}")
    elif case == "ca_file_missing":
        config.write_text(TEMPLATE + 'ca_file = "ca.pem"\n')
    elif case == "control_char":
        put("--config-dir", tmp_path / "et\nc")
    elif case == "quote_in_prefix":  # systemd takes no quote in an executable's path, escaped or not
        (tmp_path / "it's" / "bin").mkdir(parents=True)
        (tmp_path / "it's" / "bin" / "edge-agent").write_text("#!/bin/sh\n")
        args += ["--prefix", str(tmp_path / "it's")]
    before = snapshot(tmp_path)
    r = run(tmp_path, *args)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert snapshot(tmp_path) == before  # nothing written, nothing created


def test_a_write_that_fails_undoes_the_ones_before_it(tmp_path: Path, root_json: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An OSError no check foresaw (here: writing the unit, after the config, the root and the state directory):
    the replaced config gets its old bytes and mode back, the new root and the created directories go, exit 2."""
    config = tmp_path / "agent.toml"
    config.write_text(TEMPLATE)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "agent.toml").write_text("old config\n")
    (etc / "agent.toml").chmod(0o640)
    before = snapshot(tmp_path)
    real = install.write_atomic

    def failing(path: Path, data: bytes, mode: int = 0o644) -> None:
        if path.name == "edge-agent.service":
            raise PermissionError(13, "Permission denied", str(path))
        real(path, data, mode)

    monkeypatch.setattr(install, "write_atomic", failing)
    code = cli.main(install_args(tmp_path, config, root_json, "--no-probe", "--force"))
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"edge-agent: config: {tmp_path / 'units' / 'edge-agent.service'}: Permission denied "
                   "(nothing installed: what was written is undone)\n")
    assert snapshot(tmp_path) == before
    assert stat.S_IMODE((etc / "agent.toml").stat().st_mode) == 0o640


def test_a_relative_ca_file_is_installed_absolute(tmp_path: Path, root_json: Path) -> None:
    """`ca_file = "ca.pem"` means the given config's directory, wherever install runs; the installed config names
    it absolutely, and the agent reads a relative one against its config's directory too (not the cwd, / under
    systemd)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config = src / "agent.toml"
    config.write_text(TEMPLATE.replace("mqtt://", "mqtts://") + 'ca_file = "ca.pem"\n\n[trust]\nroot = "r.json"\n')
    r = run(tmp_path, *install_args(tmp_path, Path("src/agent.toml"), root_json, "--no-probe", "--json"))
    assert r.returncode == 0, r.stderr
    installed = tmp_path / "etc" / "agent.toml"
    assert f'\nca_file = "{src / "ca.pem"}"\n' in installed.read_text()
    assert load_config(installed, env={}).mqtt.ca_file == str(src / "ca.pem")
    assert load_config(config, env={}).mqtt.ca_file == str(src / "ca.pem")
    warnings = json.loads(r.stdout)["warnings"]
    hidden = hidden_by_sandbox(src / "ca.pem")  # pytest's tmp_path is under /tmp on Linux: PrivateTmp=yes
    assert any(w.startswith(f"[mqtt] ca_file {src / 'ca.pem'} is under") for w in warnings) == (hidden is not None)


def test_hidden_by_sandbox() -> None:
    assert hidden_by_sandbox(Path("/home/pi/ca.pem")) == "/home"
    assert hidden_by_sandbox(Path("/root/venv")) == "/root"
    assert hidden_by_sandbox(Path("/run/user/1000/x")) == "/run/user"
    assert hidden_by_sandbox(Path("/tmp/agent.toml")) == "/tmp"
    assert hidden_by_sandbox(Path("/var/tmp/x")) == "/var/tmp"
    assert hidden_by_sandbox(Path("/homestead/x")) is None
    assert hidden_by_sandbox(Path("/etc/edge-agent/ca.pem")) is None


def test_unit_word_quotes_and_escapes() -> None:
    assert unit_word(Path("/opt/edgeship/bin/edge-agent")) == "/opt/edgeship/bin/edge-agent"
    assert unit_word(Path("/a b/%n$X"), argument=True) == '"/a b/%%n$$X"'
    assert unit_word(Path("/a\tb/%n$X")) == '"/a\tb/%%n$X"'


def test_paths_with_spaces_and_specifier_characters_make_a_working_unit(tmp_path: Path, root_json: Path) -> None:
    """A --prefix and --config-dir with a space, '%' and '$': the unit names them as systemd reads them
    (systemd-analyze verify finds the quoted ExecStart= binary, and fails on an unescaped specifier)."""
    odd = tmp_path / "my dir %n $HOME"
    prefix = odd / "venv"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "edge-agent").write_text("#!/bin/sh\n")
    (prefix / "bin" / "edge-agent").chmod(0o755)
    config = tmp_path / "agent.toml"
    config.write_text(TEMPLATE)
    args = install_args(tmp_path, config, root_json, "--no-probe", "--prefix", str(prefix))
    args[args.index("--config-dir") + 1] = str(odd / "etc")
    args[args.index("--state-dir") + 1] = str(odd / "state")
    r = run(tmp_path, *args)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "units" / "edge-agent.service").read_text()
    quoted = str(odd).replace("%", "%%")
    assert (f'\nExecStart="{quoted}/venv/bin/edge-agent" run --config '
            '${CREDENTIALS_DIRECTORY}/agent.toml\n') in text
    assert f"\nLoadCredential=agent.toml:{quoted}/etc/agent.toml\n" in text
    assert f'\nReadWritePaths="{quoted}/state"\n' in text
    assert load_config(odd / "etc" / "agent.toml", env={}).agent.state_dir == odd / "state"
    if shutil.which("systemd-analyze"):
        unit = tmp_path / "units" / "edge-agent.service"
        v = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                           timeout=60, check=False)
        assert v.returncode == 0, v.stderr
        exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
        unit.write_text(text.replace(exec_line, exec_line.replace("%%n", "%n", 1)))  # unescaped: it fails
        bad = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                             timeout=60, check=False)
        assert bad.returncode != 0
