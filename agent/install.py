"""`edge-agent install`: put an installed agent (a venv holding the `edgeship` wheel: by default the venv this
command runs from, /opt/edgeship in docs/install-device.md) in service on this device (docs/install-device.md):

    edge-agent install --config agent.toml --root root.json [--prefix VENV] [--config-dir /etc/edge-agent]
                       [--state-dir /var/lib/edge-agent] [--unit-dir /etc/systemd/system] [--force] [--no-probe]

1. checks the config (the same checks as `edge-agent run`, but for the paths this command is about to write), the
   trust root (TUF root metadata) and every path it is about to write (a directory where one is needed, writable,
   no existing file that differs unless `--force`), all before it writes anything;
2. writes `<config-dir>/agent.toml` (the given file with `[agent] state_dir` and `[trust] root` set to the installed
   paths, and a relative `[mqtt] ca_file` made absolute against the given file's directory; everything else as it
   was) and `<config-dir>/root.json`, mode 0600 and 0644, atomically;
3. creates the state directory, mode 0700;
4. writes `<unit-dir>/edge-agent.service` from systemd/edge-agent.service (shipped in the wheel under
   <prefix>/share/edgeship/systemd) with ExecStart= naming `<prefix>/bin/edge-agent` and the config, and
   StateDirectory= the state directory (under /var/lib; elsewhere ReadWritePaths=, and the service's user must own it),
   every path quoted and escaped as systemd reads it;
5. runs the runtime probe's import check for every installed runtime (agent/runtime/probe.py `check_imports`): a
   runtime that crashes, hangs or cannot import here is recorded unusable in the state directory and reported,
   so the first deployment does not learn it by crashing (`--no-probe` skips it).

An existing config or root that differs is left alone unless `--force` (exit 2 names it). A write that fails
anyway (an OSError in steps 2-4) undoes the ones before it: files created are removed, files replaced get their old
bytes back, directories created are removed. A path the unit's sandbox hides from the agent (under /home, /root,
/run/user: ProtectHome=yes; /tmp, /var/tmp: PrivateTmp=yes) is a warning. Nothing here needs root but the default
paths; every path is an option, so tests install into temporary directories. It does not run systemctl: the
command prints what to run next.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.errors import ConfigError
from agent.fsutil import write_atomic

UNIT = "edge-agent.service"
UNIT_EXEC = "ExecStart=/opt/edgeship/bin/edge-agent run --config ${CREDENTIALS_DIRECTORY}/agent.toml"
# the installed config reaches the service's dynamic user as a credential (the file itself is 0600 root)
UNIT_CONFIG = "LoadCredential=agent.toml:/etc/edge-agent/agent.toml"


@dataclass(frozen=True)
class InstallPlan:
    """The paths as given; the defaults are the command line's (agent/cli.py)."""

    config: Path
    root: Path
    prefix: Path
    config_dir: Path
    state_dir: Path
    unit_dir: Path
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
    """The unit for these paths, each quoted and escaped as systemd reads it (`unit_word`). Pure."""
    if template.count(UNIT_EXEC) != 1 or template.count(UNIT_CONFIG) != 1 \
            or "\nStateDirectory=edge-agent\n" not in template:
        raise ConfigError(f"{UNIT}: the template's ExecStart=, LoadCredential= or StateDirectory= is not the one "
                          "expected")
    text = template.replace(UNIT_EXEC, f"ExecStart={unit_word(prefix / 'bin' / 'edge-agent')} run "
                                       "--config ${CREDENTIALS_DIRECTORY}/agent.toml")
    # LoadCredential= takes the rest of the line as the path, unquoted (systemd.exec(5)): only specifiers escaped
    text = text.replace(UNIT_CONFIG, "LoadCredential=agent.toml:" + str(config).replace("%", "%%"))
    try:
        name = state_dir.relative_to("/var/lib")
    except ValueError:
        name = None
    if name is not None and str(name) not in ("", "."):
        return text.replace("\nStateDirectory=edge-agent\n", f"\nStateDirectory={unit_word(name)}\n")
    return text.replace("\nStateDirectory=edge-agent\nStateDirectoryMode=0700\n",
                        f"\n# the state directory is outside /var/lib: its owner must be the service's user\n"
                        f"ReadWritePaths={unit_word(state_dir)}\n")


def unit_word(path: Path, *, argument: bool = False) -> str:
    """`path` as one word of a unit setting (systemd.syntax(7), systemd.service(5) "Command lines"): '%' doubled
    (specifiers); in an argument of ExecStart= also '$' (variables; the executable's path is not expanded); in
    double quotes when it holds whitespace. Quotes, backslashes and control characters are refused before
    (`check_unit_path`: systemd takes no quote or backslash in an executable's path). Pure."""
    text = str(path).replace("%", "%%")
    if argument:
        text = text.replace("$", "$$")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def check_unit_path(label: str, path: Path) -> None:
    """A path the installed files name: absolute, UTF-8, and no control character, quote or backslash (systemd
    refuses those in an executable's path, and a unit or TOML line cannot hold them plainly)."""
    if not path.is_absolute():
        raise ConfigError(f"{label} {path}: give an absolute path (it is written into the unit)")
    text = str(path)
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise ConfigError(f"{label} {text!r}: not UTF-8: choose another path") from e
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c in "\"'\\" for c in text):
        raise ConfigError(f"{label} {text!r}: holds a control character, a quote or a backslash, which systemd "
                          "does not take in a unit's paths: choose another path")


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
            lines[i] = f"{kv.group(1)} = {json.dumps(values[(section, kv.group(1))], ensure_ascii=False)}"
            done.add((section, kv.group(1)))
    for (sec, key), value in values.items():
        if (sec, key) in done:
            continue
        line = f"{key} = {json.dumps(value, ensure_ascii=False)}"
        if sec in header_at:
            lines.insert(header_at[sec] + 1, line)
            header_at = {s: (at + 1 if at > header_at[sec] else at) for s, at in header_at.items()}
        else:
            lines += ["", f"[{sec}]", line]
            header_at[sec] = len(lines) - 2
    return "\n".join(lines) + "\n"


# what the unit's sandbox hides from the agent: a path the agent reads there is missing at run time
HIDDEN = {"/home": "ProtectHome=yes", "/root": "ProtectHome=yes", "/run/user": "ProtectHome=yes",
          "/tmp": "PrivateTmp=yes", "/var/tmp": "PrivateTmp=yes"}


def hidden_by_sandbox(path: Path) -> str | None:
    """The directory of HIDDEN that `path` is in, if any (as written: a symlink into it is not seen). Pure."""
    return next((top for top in HIDDEN if path.is_relative_to(top)), None)


def install(plan: InstallPlan) -> InstallResult:
    result = InstallResult()
    for label, path in (("--prefix", plan.prefix), ("--config-dir", plan.config_dir),
                        ("--state-dir", plan.state_dir), ("--unit-dir", plan.unit_dir)):
        check_unit_path(label, path)
    source = _read("--config", plan.config)
    root = _read("--root", plan.root)
    try:
        source_text = source.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {plan.config}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    _check_root(plan.root, root)
    if not (plan.prefix / "bin" / "edge-agent").is_file():
        raise ConfigError(f"--prefix {plan.prefix}: no bin/edge-agent there (pip install the edgeship wheel into "
                           "a venv at that path first)")
    config_path, root_path = plan.config_dir / "agent.toml", plan.config_dir / "root.json"
    values = {("agent", "state_dir"): str(plan.state_dir), ("trust", "root"): str(root_path)}
    ca_file = _ca_file(source_text, plan.config)
    if ca_file is not None:
        values[("mqtt", "ca_file")] = str(ca_file)
    config_text = set_keys(source_text, values)
    unit_text = render_unit(unit_template(), prefix=plan.prefix, config=config_path, state_dir=plan.state_dir)
    _check_config(config_text, plan, values)

    # every path this writes, checked before the first write
    for label, path in (("--config-dir", plan.config_dir), ("--state-dir", plan.state_dir),
                        ("--unit-dir", plan.unit_dir)):
        _check_dir(label, path)
    files = [(config_path, config_text.encode(), 0o600, plan.force), (root_path, root, 0o644, plan.force),
             (plan.unit_dir / UNIT, unit_text.encode(), 0o644, True)]
    old = {path: _existing(path, data, force) for path, data, _, force in files}

    undo: list[Callable[[], None]] = []
    try:
        for path, data, mode, _ in files[:2]:
            _write(path, data, mode, old[path], result, undo)
        _make_dirs(plan.state_dir, undo)
        was = stat.S_IMODE(plan.state_dir.stat().st_mode)
        plan.state_dir.chmod(0o700)
        undo.append(lambda: plan.state_dir.chmod(was))
        path, data, mode, _ = files[2]
        _write(path, data, mode, old[path], result, undo)
    except OSError as e:
        for step in reversed(undo):
            with contextlib.suppress(OSError):
                step()
        raise ConfigError(f"{e.filename or '?'}: {e.strerror or e} (nothing installed: what was written is undone)") \
            from e
    result.state_dir = str(plan.state_dir)
    result.unit = str(plan.unit_dir / UNIT)
    if "ReadWritePaths=" in unit_text:
        result.warnings.append(f"the state directory {plan.state_dir} is outside /var/lib: the unit's DynamicUser= "
                               "cannot own it; set a fixed User= in a drop-in and chown the directory to it")
    for label, seen in (("--prefix", plan.prefix), ("--config-dir", plan.config_dir),
                        ("--state-dir", plan.state_dir), ("[mqtt] ca_file", ca_file)):
        hidden = hidden_by_sandbox(seen) if seen is not None else None
        if hidden is not None:
            result.warnings.append(f"{label} {seen} is under {hidden}, which the unit's {HIDDEN[hidden]} hides from "
                                   "the agent: move it, or relax that line in a drop-in")
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


def _read(label: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{label} {path}: cannot read it ({e.strerror or e})") from e


def _ca_file(source: str, config: Path) -> Path | None:
    """The given config's `[mqtt] ca_file`, absolute against the given config's directory (the installed config
    lives elsewhere), checked to be a readable regular file; None when it is not set."""
    try:
        mqtt = tomllib.loads(source).get("mqtt", {})
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {config}: not valid TOML ({e})") from e
    value = mqtt.get("ca_file", "") if isinstance(mqtt, dict) else ""
    if not isinstance(value, str) or not value:
        return None  # not set, or not a string: parse_config names it
    path = config.resolve().parent / value
    try:
        with path.open("rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"--config {config}: [mqtt] ca_file {path}: not a regular file")
    except OSError as e:
        raise ConfigError(f"--config {config}: [mqtt] ca_file {path}: cannot read it ({e.strerror or e})") from e
    return path


def _check_config(text: str, plan: InstallPlan, values: dict[tuple[str, str], str]) -> None:
    """The config as it will be installed parses and validates, without the environment's EDGESHIP_* overrides
    (systemd starts the agent without them), and holds the installed paths (not, say, a dotted key set_keys left)."""
    try:
        cfg = parse_config(tomllib.loads(text), {})
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {plan.config}: not valid TOML ({e})") from e
    except ConfigError as e:
        raise ConfigError(f"--config {plan.config}: {e}") from e
    got = {("agent", "state_dir"): str(cfg.agent.state_dir), ("trust", "root"): str(cfg.trust.root),
           ("mqtt", "ca_file"): cfg.mqtt.ca_file}
    for (section, key), value in values.items():
        if got[(section, key)] != value:
            raise ConfigError(f"--config {plan.config}: cannot set [{section}] {key} in it: write it as a "
                              f"`{key} = ...` line under [{section}]")


def _check_dir(label: str, path: Path) -> None:
    """`path` is a directory, or can be made one: its nearest existing ancestor is a directory this user can write."""
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise ConfigError(f"{label} {path}: {p}: {e.strerror or e}") from e
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{label} {path}: {p} is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{label} {path}: cannot write in {p} (permission denied)")
        return
    raise ConfigError(f"{label} {path}: no directory of it exists")  # not even /: unreachable in practice


def _existing(path: Path, data: bytes, force: bool) -> tuple[bytes, int] | None:
    """The bytes and mode of the file at `path` now (None: no file), refused if it differs and not `force`."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} exists and is not a regular file")
    try:
        now = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from e
    if now != data and not force:
        raise ConfigError(f"{path} exists and differs: --force replaces it")
    return now, stat.S_IMODE(st.st_mode)


def _make_dirs(path: Path, undo: list[Callable[[], None]]) -> None:
    missing = []
    for p in (path, *path.parents):
        if p.is_dir():
            break
        missing.append(p)
    for p in reversed(missing):
        p.mkdir()
        undo.append(p.rmdir)


def _write(path: Path, data: bytes, mode: int, old: tuple[bytes, int] | None, result: InstallResult,
           undo: list[Callable[[], None]]) -> None:
    if old is not None and old[0] == data:
        path.chmod(mode)
        undo.append(lambda: path.chmod(old[1]))
        result.unchanged.append(str(path))
        return
    _make_dirs(path.parent, undo)
    write_atomic(path, data, mode)
    undo.append(path.unlink if old is None else lambda: write_atomic(path, old[0], old[1]))
    result.written.append(str(path))
