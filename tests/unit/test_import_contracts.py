"""The import-linter contracts in pyproject.toml hold on the real tree, and each one fails when the import that
breaks it is put back.

Each case copies `agent/` and `packager/` into tmp_path, appends one violating import to one module and runs
`lint-imports` there with the real [tool.importlinter] section, limited to that contract. grimp reads the source
statically, so an import appended at the end of a module (even one that would be circular at runtime) counts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@dataclass(frozen=True)
class Violation:
    contract_id: str
    module: str  # path of the module to edit, relative to the project root
    line: str  # the import that breaks the contract


# One per contract: the line the contract exists to keep out.
VIOLATIONS = [
    Violation("paho-only-in-transport", "agent/serve/mqtt.py", "import paho.mqtt.client"),
    Violation("agent-no-packager", "agent/config.py", "from packager.build import build"),
    # The format took TensorSpec from the runtimes before issue 8.
    Violation("bundle-is-data", "agent/bundle.py", "from agent.runtime import TensorSpec"),
    Violation("runtime-no-io", "agent/runtime/onnx_session.py", "from agent.transport.mqtt import MqttClient"),
    # Indirect: the state table reaching the MQTT link through the trust side's fetch. Only the fetch worker's own
    # edge to agent.trust.fetch is ignored, so this must still break the contract.
    Violation("deploy-no-transport", "agent/deploy/machine.py", "from agent.trust.fetch import fetch"),
    Violation("oip-no-server", "agent/serve/oip.py", "from http.server import ThreadingHTTPServer"),
    # The HTTP fetcher took these helpers from the MQTT fetcher before issue 8, which loaded paho.
    Violation("mirror-no-paho", "agent/trust/http_fetcher.py", "from agent.trust.mqtt_fetcher import FetchError"),
    Violation("daemon-no-tuf", "agent/daemon.py", "from agent.trust.client import TrustedClient"),
]


def contract_names() -> dict[str, str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["id"]: c["name"] for c in config["tool"]["importlinter"]["contracts"]}


def lint_imports(cwd: Path, *contract_ids: str) -> subprocess.CompletedProcess[str]:
    args = [str(LINT_IMPORTS), "--no-cache", "--no-logo"]
    for contract_id in contract_ids:
        args += ["--contract", contract_id]
    # PYTHONPATH=cwd so that grimp finds the copy, not the editable install of the real tree.
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_every_contract_has_a_violation_case() -> None:
    assert set(contract_names()) == {v.contract_id for v in VIOLATIONS}


def test_the_real_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in contract_names().values():
        assert f"{name} KEPT" in result.stdout


def test_the_daemon_process_does_not_load_the_tuf_stack_at_runtime() -> None:
    # daemon-no-tuf ignores the fetch worker's own import of agent.trust.fetch, which grimp cannot tell from a
    # top-level one; the daemon imports the worker's module, so check that the import stays lazy.
    heavy = ["tuf", "securesystemslib", "cryptography", "requests"]
    code = (
        "import sys, agent.cli, agent.daemon, agent.deploy.fetch_client, agent.deploy.fetch_worker\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("violation", VIOLATIONS, ids=lambda v: v.contract_id)
def test_contract_breaks_when_the_import_is_put_back(violation: Violation, tmp_path: Path) -> None:
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("agent", "packager"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / violation.module
    assert violation.line not in target.read_text()
    with target.open("a") as f:
        f.write(f"\n{violation.line}  # put back by test_import_contracts\n")

    result = lint_imports(tmp_path, violation.contract_id)

    name = contract_names()[violation.contract_id]
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{name} BROKEN" in result.stdout, result.stdout + result.stderr
    # The report points at the line that was put back, in the copy.
    module = violation.module.removesuffix(".py").replace("/", ".")
    assert f"{module} -> " in result.stdout, result.stdout
