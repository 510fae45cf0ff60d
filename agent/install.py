"""`edge-agent install`: put an installed agent (a venv holding the `edgeship` wheel, /opt/edgeship by default) in
service on this device (docs/install-device.md):

    edge-agent install --config agent.toml --root root.json [--prefix /opt/edgeship] [--config-dir /etc/edge-agent]
                       [--state-dir /var/lib/edge-agent] [--unit-dir /etc/systemd/system] [--force] [--no-probe]

1. checks the config (the same checks as `edge-agent run`, but for the paths this command is about to write) and
   the trust root (TUF root metadata);
2. writes `<config-dir>/agent.toml` (the given file with `[agent] state_dir` and `[trust] root` set to the installed
   paths; everything else as it was) and `<config-dir>/root.json`, mode 0600 and 0644, atomically;
3. creates the state directory, mode 0700;
4. writes `<unit-dir>/edge-agent.service` from systemd/edge-agent.service (shipped in the wheel under
   <prefix>/share/edgeship/systemd) with ExecStart= naming `<prefix>/bin/edge-agent` and the config, and
   StateDirectory= the state directory (under /var/lib; elsewhere ReadWritePaths=, and the service's user must own it);
5. runs the runtime probe's import check for every installed runtime (agent/runtime/probe.py `check_imports`): a
   runtime that crashes, hangs or cannot import here is recorded unusable in the state directory and reported,
   so the first deployment does not learn it by crashing (`--no-probe` skips it).

An existing config or root that differs is left alone unless `--force` (exit 2 names it). Nothing here needs root
but the default paths; every path is an option, so tests install into temporary directories. It does not run
systemctl: the command prints what to run next.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.errors import ConfigError
from agent.fsutil import write_atomic

UNIT = "edge-agent.service"
DEFAULT_PREFIX = Path("/opt/edgeship")
DEFAULT_CONFIG_DIR = Path("/etc/edge-agent")
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
UNIT_EXEC = "ExecStart=/opt/edgeship/bin/edge-agent run --config /etc/edge-agent/agent.toml"


@dataclass(frozen=True)
class InstallPlan:
    config: Path
    root: Path
    prefix: Path = DEFAULT_PREFIX
    config_dir: Path = DEFAULT_CONFIG_DIR
    state_dir: Path = DEFAULT_STATE_DIR
    unit_dir: Path = DEFAULT_UNIT_DIR
    force: bool = False
    probe: bool = True


@dataclass
class InstallResult:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    state_dir: str = ""
    unit: str = ""
    runtimes: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"written": self.written, "unchanged": self.unchanged, "state_dir": self.state_dir,
                "unit": self.unit, "runtimes": self.runtimes, "warnings": self.warnings}


def unit_template() -> str:
    """systemd/edge-agent.service as shipped: in the wheel's data (<prefix>/share/edgeship/systemd), or the source
    tree's when running from a checkout (an editable install)."""
    for base in (Path(sys.prefix) / "share" / "edgeship" / "systemd", Path(__file__).resolve().parents[1] / "systemd"):
        if (base / UNIT).is_file():
            return (base / UNIT).read_text()
    raise ConfigError(f"{UNIT} is not installed with this agent (looked in {sys.prefix}/share/edgeship/systemd)")


def render_unit(template: str, *, prefix: Path, config: Path, state_dir: Path) -> str:
    """The unit for these paths. Pure."""
    if template.count(UNIT_EXEC) != 1 or "\nStateDirectory=edge-agent\n" not in template:
        raise ConfigError(f"{UNIT}: the template's ExecStart= or StateDirectory= is not the one expected")
    text = template.replace(UNIT_EXEC, f"ExecStart={prefix / 'bin' / 'edge-agent'} run --config {config}")
    try:
        name = state_dir.relative_to("/var/lib")
    except ValueError:
        name = None
    if name is not None and str(name) not in ("", "."):
        return text.replace("\nStateDirectory=edge-agent\n", f"\nStateDirectory={name}\n")
    return text.replace("\nStateDirectory=edge-agent\nStateDirectoryMode=0700\n",
                        f"\n# the state directory is outside /var/lib: its owner must be the service's user\n"
                        f"ReadWritePaths={state_dir}\n")


def set_keys(toml: str, values: dict[tuple[str, str], str]) -> str:
    """`toml` with each (section, key) set to the given string value: the key's line replaced where it is, else
    added at the top of its section (the section appended if missing). Every other line stays. Pure."""
    lines = toml.splitlines()
    section = ""
    done: set[tuple[str, str]] = set()
    header_at: dict[str, int] = {}
    for i, line in enumerate(lines):
        head = re.match(r"\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$", line)
        if head:
            section = head.group(1)
            header_at.setdefault(section, i)
            continue
        kv = re.match(r"\s*([A-Za-z0-9_-]+)\s*=", line)
        if kv and (section, kv.group(1)) in values:
            lines[i] = f"{kv.group(1)} = {json.dumps(values[(section, kv.group(1))])}"
            done.add((section, kv.group(1)))
    for (sec, key), value in values.items():
        if (sec, key) in done:
            continue
        line = f"{key} = {json.dumps(value)}"
        if sec in header_at:
            lines.insert(header_at[sec] + 1, line)
            header_at = {s: (at + 1 if at > header_at[sec] else at) for s, at in header_at.items()}
        else:
            lines += ["", f"[{sec}]", line]
            header_at[sec] = len(lines) - 2
    return "\n".join(lines) + "\n"


def install(plan: InstallPlan) -> InstallResult:
    result = InstallResult()
    for label, path in (("--prefix", plan.prefix), ("--config-dir", plan.config_dir),
                        ("--state-dir", plan.state_dir), ("--unit-dir", plan.unit_dir)):
        if not path.is_absolute():
            raise ConfigError(f"{label} {path}: give an absolute path (it is written into the unit)")
    try:
        source = plan.config.read_text()
        root = plan.root.read_bytes()
    except OSError as e:
        raise ConfigError(f"{e.filename}: {e.strerror}") from e
    _check_root(plan.root, root)
    if not (plan.prefix / "bin" / "edge-agent").is_file():
        raise ConfigError(f"--prefix {plan.prefix}: no bin/edge-agent there (pip install the edgeship wheel into "
                           "a venv at that path first)")
    config_path, root_path = plan.config_dir / "agent.toml", plan.config_dir / "root.json"
    config_text = set_keys(source, {("agent", "state_dir"): str(plan.state_dir), ("trust", "root"): str(root_path)})
    unit_text = render_unit(unit_template(), prefix=plan.prefix, config=config_path, state_dir=plan.state_dir)
    _check_config(config_text, plan)

    _write(config_path, config_text.encode(), 0o600, plan.force, result)
    _write(root_path, root, 0o644, plan.force, result)
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    plan.state_dir.chmod(0o700)
    result.state_dir = str(plan.state_dir)
    _write(plan.unit_dir / UNIT, unit_text.encode(), 0o644, True, result)
    result.unit = str(plan.unit_dir / UNIT)
    if "ReadWritePaths=" in unit_text:
        result.warnings.append(f"the state directory {plan.state_dir} is outside /var/lib: the unit's DynamicUser= "
                               "cannot own it; set a fixed User= in a drop-in and chown the directory to it")
    if plan.probe:
        result.runtimes = check_runtimes(plan.state_dir)
        bad = [r for r in result.runtimes if not r["usable"]]
        if bad and len(bad) == len(result.runtimes):
            result.warnings.append("no runtime is usable on this device: every bundle will be rejected "
                                   "(no_usable_runtime)")
    return result


def check_runtimes(state_dir: Path) -> list[dict[str, Any]]:
    """The runtime probe's import check of every installed runtime (agent/runtime/probe.py), as JSON rows."""
    from agent.deploy.stage import installed_runtimes
    from agent.runtime.probe import RuntimeProbe

    verdicts = RuntimeProbe(state_dir).check_imports(installed_runtimes())
    return [v.to_json() for _, v in sorted(verdicts.items())]


def _check_root(path: Path, data: bytes) -> None:
    try:
        doc = json.loads(data)
        ok = doc["signed"]["_type"] == "root"
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"--root {path}: not TUF root metadata (the fleet's provisioned root.json)")


def _check_config(text: str, plan: InstallPlan) -> None:
    """The config as it will be installed parses and validates, without the environment's EDGESHIP_* overrides
    (systemd starts the agent without them)."""
    try:
        parse_config(tomllib.loads(text), {}, base_dir=plan.config_dir)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {plan.config}: not valid TOML ({e})") from e
    except ConfigError as e:
        raise ConfigError(f"--config {plan.config}: {e}") from e


def _write(path: Path, data: bytes, mode: int, force: bool, result: InstallResult) -> None:
    if path.exists():
        if path.read_bytes() == data:
            path.chmod(mode)
            result.unchanged.append(str(path))
            return
        if not force:
            raise ConfigError(f"{path} exists and differs: --force replaces it")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode)
    result.written.append(str(path))
