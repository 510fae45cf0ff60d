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

from agent.install import render_unit, set_keys, unit_template
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
    assert f"\nExecStart={BIN / 'edge-agent'} run --config {etc / 'agent.toml'}\n" in text
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
    assert "\nExecStart=/srv/venv/bin/edge-agent run --config /etc/x/agent.toml\n" in other


def test_set_keys_replaces_in_place_or_adds() -> None:
    toml = '[agent]\nstate_dir = "/x"  # old\n\n[mqtt]\nurl = "mqtt://h"\n'
    out = set_keys(toml, {("agent", "state_dir"): "/new", ("trust", "root"): "/etc/r.json",
                          ("mqtt", "ca_file"): "/ca"})
    assert out == ('[agent]\nstate_dir = "/new"\n\n[mqtt]\nca_file = "/ca"\nurl = "mqtt://h"\n\n'
                   '[trust]\nroot = "/etc/r.json"\n')
