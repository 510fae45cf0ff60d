"""The runtime probe for real: a real digits bundle (int8 ONNX + int8 TFLite), the real probe child importing
onnxruntime and LiteRT, and runtimes that really die in it (EDGESHIP_PROBE_FAULT: a real illegal instruction, a
real read of address 0, a SIGKILL, a hang; a failure while importing or a CPU fault is the runtime's and persisted,
a SIGKILL or a timeout while loading or running is the artifact's and is not). Staging runs in a fresh Python
process each time, so what that process imported is known: a runtime that did not pass the probe is never in its
`sys.modules`. Last, real `edge-agent run` processes on a throwaway mosquitto: the agent serves TFLite when
onnxruntime dies with SIGILL (and never maps onnxruntime's library), and rolls a bundle whose runtimes both die
back with reason `no_usable_runtime`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import sha256_file, verify_bundle
from agent.deploy.stage import installed_runtimes
from agent.runtime.probe import FAULT_ENV, PROBE_FILE, RuntimeProbe, read_verdicts
from examples.digits.train import train_digits
from examples.local_broker import Mosquitto
from packager.build import BuildOptions, Progress, build
from tests.e2e.test_daemon import BIN, Device, _env, is_event

pytestmark = pytest.mark.slow

RUNTIME_MODULES = ("onnxruntime", "ai_edge_litert", "tflite_runtime")
STAGE_SCRIPT = f"""
import json, sys
from dataclasses import replace
from pathlib import Path
from agent.deploy.probation import read_manifest
from agent.deploy.stage import DeviceProfile, stage_bundle
from agent.errors import BundleRejected
from agent.runtime.probe import RuntimeProbe

RUNTIMES = {RUNTIME_MODULES!r}
bundle_dir, state_dir, timeout = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
out = {{"before": [m for m in RUNTIMES if m in sys.modules]}}
device = replace(DeviceProfile.detect(), probe=RuntimeProbe(state_dir, timeout))
out["due"] = device.probes_due(read_manifest(bundle_dir))
try:
    staged = stage_bundle(bundle_dir, read_manifest(bundle_dir), device, warmup=2, timing_runs=20)
    out.update(format=staged.fmt, event=staged.to_event())
except BundleRejected as e:
    out.update(rejected=e.reason, message=str(e))
out["after"] = [m for m in RUNTIMES if m in sys.modules]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """One real two-format digits bundle (2 epochs, ~30 s) and evaluation rows to infer with."""
    tmp = tmp_path_factory.mktemp("probe-build")
    paths = train_digits(tmp / "digits", epochs=2)
    result = build(BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                                out_dir=tmp / "out", name="digits", version=1, formats=("onnx", "tflite"),
                                latency_runs=20), Progress(0, enabled=False))
    with np.load(paths["eval"], allow_pickle=False) as z:
        x = z["x"][:4].astype(np.float32)
    return result.bundle, x


@pytest.fixture
def release(digits: tuple[Path, np.ndarray], tmp_path: Path) -> Path:
    dest = tmp_path / "release"
    verify_bundle(digits[0], dest=dest)
    return dest


def stage_in_a_fresh_process(release: Path, state_dir: Path, fault: str = "", timeout_s: float = 60.0
                             ) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_")}
    if fault:
        env[FAULT_ENV] = fault
    r = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(release), str(state_dir), str(timeout_s)],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["before"] == []  # nothing had imported a runtime before staging
    return out


def test_healthy_runtimes_pass_and_are_not_probed_again(release: Path, tmp_path: Path) -> None:
    out = stage_in_a_fresh_process(release, tmp_path)
    assert out["due"] == 2 and out["format"] in ("onnx", "tflite")
    assert out["event"]["unusable_runtimes"] == [] and out["event"]["failures"] == {}
    verdicts = read_verdicts(tmp_path)
    installed = installed_runtimes()
    for fmt in ("onnx", "tflite"):
        assert verdicts[fmt].usable and verdicts[fmt].version == installed[fmt], verdicts[fmt]
        assert verdicts[fmt].why.startswith(f"imported, loaded model.int8.{fmt} and ran ")
    before = (tmp_path / PROBE_FILE).read_bytes()
    again = stage_in_a_fresh_process(release, tmp_path, fault="onnx:SIGILL,tflite:SIGILL")  # no probe runs now
    assert again["due"] == 0 and again["format"] in ("onnx", "tflite")
    assert (tmp_path / PROBE_FILE).read_bytes() == before


def test_onnxruntime_dying_of_sigill_leaves_tflite_serving(release: Path, tmp_path: Path) -> None:
    out = stage_in_a_fresh_process(release, tmp_path, fault="onnx:SIGILL")
    assert out["format"] == "tflite"
    assert "onnxruntime" not in out["after"] and "ai_edge_litert" in out["after"]
    [unusable] = out["event"]["unusable_runtimes"]
    assert (unusable["format"], unusable["runtime"], unusable["version"], unusable["phase"]) == (
        "onnx", "onnxruntime", installed_runtimes()["onnx"], "import")
    assert unusable["why"] == "killed by SIGILL while importing onnxruntime"
    assert out["event"]["failures"]["onnx"].startswith("onnxruntime ")
    assert "onnx" not in out["event"]["timings"]

    # persisted: the next staging (a later bundle, a restart) skips onnx without probing it again
    verdict = read_verdicts(tmp_path)["onnx"]
    assert not verdict.usable and verdict.bundle == "digits v1"
    again = stage_in_a_fresh_process(release, tmp_path)
    assert again["due"] == 0 and again["format"] == "tflite" and "onnxruntime" not in again["after"]
    assert read_verdicts(tmp_path)["onnx"] == verdict


def test_litert_segfaulting_on_its_first_run_leaves_onnx_serving(release: Path, tmp_path: Path) -> None:
    out = stage_in_a_fresh_process(release, tmp_path, fault="tflite:SIGSEGV@run")
    assert out["format"] == "onnx"
    assert "ai_edge_litert" not in out["after"] and "onnxruntime" in out["after"]
    [unusable] = out["event"]["unusable_runtimes"]
    assert (unusable["format"], unusable["phase"], unusable["why"]) == (
        "tflite", "run", "killed by SIGSEGV while running the golden rows")


def test_both_runtimes_dying_rejects_the_bundle_as_no_usable_runtime(release: Path, tmp_path: Path) -> None:
    out = stage_in_a_fresh_process(release, tmp_path, fault="onnx:SIGILL,tflite:SIGSEGV")
    assert out["rejected"] == "no_usable_runtime"
    assert out["after"] == []  # the staging process imported neither runtime
    assert "killed by SIGILL while importing onnxruntime" in out["message"]
    assert "killed by SIGSEGV while importing LiteRT" in out["message"]
    assert {f: v.usable for f, v in read_verdicts(tmp_path).items()} == {"onnx": False, "tflite": False}


def test_a_hanging_import_is_killed_at_the_timeout(release: Path, tmp_path: Path) -> None:
    out = stage_in_a_fresh_process(release, tmp_path, fault="onnx:hang", timeout_s=5.0)
    assert out["format"] == "tflite" and "onnxruntime" not in out["after"]
    assert read_verdicts(tmp_path)["onnx"].why == "hung: no answer within 5 s while importing onnxruntime"


def test_an_import_error_marks_the_runtime_unusable(release: Path, tmp_path: Path) -> None:
    out = stage_in_a_fresh_process(release, tmp_path, fault="tflite:error")
    assert out["format"] == "onnx"
    assert read_verdicts(tmp_path)["tflite"].why == (
        f"cannot import LiteRT: ImportError: {FAULT_ENV} asked this import to fail")


def test_a_broken_artifact_is_not_held_against_its_runtime(release: Path, tmp_path: Path) -> None:
    model = release / "model.int8.onnx"
    model.write_bytes(model.read_bytes()[:1000])  # truncated: onnxruntime refuses it with an ordinary error
    out = stage_in_a_fresh_process(release, tmp_path)
    assert out["format"] == "tflite" and "onnxruntime" not in out["after"]
    assert out["event"]["failures"]["onnx"].startswith("runtime probe: loading model.int8.onnx failed: ")
    assert out["event"]["unusable_runtimes"] == []
    assert "onnx" not in read_verdicts(tmp_path)  # the next bundle's onnx artifact probes the runtime again


def test_sigkill_while_loading_is_held_against_the_artifact_not_the_runtime(release: Path, tmp_path: Path) -> None:
    """The OOM killer's SIGKILL while the child loads an oversized model: this artifact is skipped, nothing is
    persisted, and the next staging (a later, smaller bundle) probes onnxruntime again and uses it."""
    out = stage_in_a_fresh_process(release, tmp_path, fault="onnx:SIGKILL@load")
    assert out["format"] == "tflite" and "onnxruntime" not in out["after"]
    assert out["event"]["failures"]["onnx"] == "runtime probe: killed by SIGKILL while loading model.int8.onnx"
    assert out["event"]["unusable_runtimes"] == []
    assert "onnx" not in read_verdicts(tmp_path) and read_verdicts(tmp_path)["tflite"].usable
    again = stage_in_a_fresh_process(release, tmp_path)
    assert again["due"] == 1 and "onnx" in again["event"]["timings"] and "onnxruntime" in again["after"]
    assert read_verdicts(tmp_path)["onnx"].usable


def test_a_timeout_while_running_is_held_against_the_artifact_not_the_runtime(release: Path, tmp_path: Path) -> None:
    # 20 s: the child must get through Python's start and the onnxruntime import first (well under 1 s here)
    out = stage_in_a_fresh_process(release, tmp_path, fault="onnx:hang@run", timeout_s=20.0)
    assert out["format"] == "tflite" and "onnxruntime" not in out["after"]
    assert out["event"]["failures"]["onnx"] == (
        "runtime probe: hung: no answer within 20 s while running the golden rows")
    assert out["event"]["unusable_runtimes"] == []
    assert "onnx" not in read_verdicts(tmp_path)


def test_sigill_while_running_is_held_against_the_runtime(release: Path, tmp_path: Path) -> None:
    """A runtime whose first kernel uses an instruction this CPU lacks: persisted like a SIGILL on import."""
    out = stage_in_a_fresh_process(release, tmp_path, fault="onnx:SIGILL@run")
    assert out["format"] == "tflite" and "onnxruntime" not in out["after"]
    [unusable] = out["event"]["unusable_runtimes"]
    assert (unusable["format"], unusable["phase"], unusable["why"]) == (
        "onnx", "run", "killed by SIGILL while running the golden rows")
    verdict = read_verdicts(tmp_path)["onnx"]
    assert not verdict.usable and verdict.phase == "run"
    again = stage_in_a_fresh_process(release, tmp_path)  # no fault now: but the verdict stands, no probe runs
    assert again["due"] == 0 and again["format"] == "tflite" and "onnxruntime" not in again["after"]
    assert read_verdicts(tmp_path)["onnx"] == verdict


def test_an_upgraded_runtime_is_probed_again(release: Path, tmp_path: Path) -> None:
    stage_in_a_fresh_process(release, tmp_path, fault="onnx:SIGILL")
    doc = json.loads((tmp_path / PROBE_FILE).read_text())
    doc["runtimes"]["onnx"]["version"] = "0.0.1"  # as if the SIGILL was onnxruntime 0.0.1's, since upgraded
    (tmp_path / PROBE_FILE).write_text(json.dumps(doc))
    out = stage_in_a_fresh_process(release, tmp_path)
    assert out["due"] == 1 and out["event"]["unusable_runtimes"] == []
    assert read_verdicts(tmp_path)["onnx"].usable


def test_import_only_check_of_the_installed_runtimes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `edge-agent install` runs: no bundle yet, so only the imports; a failure is persisted."""
    monkeypatch.setenv(FAULT_ENV, "tflite:SIGILL")
    verdicts = RuntimeProbe(tmp_path, timeout_s=60).check_imports(installed_runtimes())
    assert verdicts["onnx"].usable and verdicts["onnx"].phase == "import"
    assert verdicts["tflite"].why == "killed by SIGILL while importing LiteRT"
    assert read_verdicts(tmp_path) == {"tflite": verdicts["tflite"]}


# --- real agents ---------------------------------------------------------------------------------------------------


class FaultyDevice(Device):
    """test_daemon.py's Device whose agent runs with EDGESHIP_PROBE_FAULT set (the probe child inherits it)."""

    def __init__(self, tmp: Path, broker: Mosquitto, fault: str) -> None:
        super().__init__(tmp, broker)
        self.fault = fault

    def start(self) -> float:
        assert self.proc is None or self.proc.poll() is not None, "the agent is already running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(self.config)],
                                         cwd=self.tmp, env={**_env(), FAULT_ENV: self.fault}, stdout=log,
                                         stderr=subprocess.STDOUT)
        return time.monotonic()

    def mapped(self) -> str:
        """The files the agent process has mapped (its shared libraries among them)."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/maps").read_text()


@pytest.fixture
def device(tmp_path: Path, mosquitto: Mosquitto, request: pytest.FixtureRequest) -> Iterator[FaultyDevice]:
    (tmp_path / "device").mkdir()
    dev = FaultyDevice(tmp_path / "device", mosquitto, request.param)
    try:
        yield dev
    finally:
        dev.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
@pytest.mark.parametrize("device", ["onnx:SIGILL"], indirect=True)
def test_agent_serves_tflite_when_onnxruntime_dies_of_sigill(device: FaultyDevice,
                                                             digits: tuple[Path, np.ndarray]) -> None:
    bundle, x = digits
    device.start()
    device.publish(bundle)
    staged = device.events.wait(is_event(frm="stage", to="activate", version=1), "v1 staged")
    device.events.wait(is_event(frm="commit", to="idle", version=1), "v1 committed")
    assert staged["bundle"]["format"] == "tflite"
    [unusable] = staged["unusable_runtimes"]
    assert (unusable["format"], unusable["why"]) == ("onnx", "killed by SIGILL while importing onnxruntime")
    assert staged["staging"]["unusable_runtimes"] == [unusable]

    device.wait_ready()
    status, doc = device.infer(x[:2])
    assert status == 200 and doc["model_version"] == "1", doc
    maps = device.mapped()
    assert "onnxruntime" not in maps  # the daemon never loaded the runtime that failed its probe
    assert "ai_edge_litert" in maps

    st = device.status()
    assert (st["version"], st["format"], st["state"]) == (1, "tflite", "idle")
    assert [(u["format"], u["version"]) for u in st["unusable_runtimes"]] == [("onnx", installed_runtimes()["onnx"])]
    retained = device.wait_retained(lambda s: s.get("state") == "idle" and "unusable_runtimes" in s,
                                    "the retained state with the unusable runtime")
    assert retained["unusable_runtimes"] == st["unusable_runtimes"]
    text = subprocess.run([str(BIN / "edge-agent"), "status", "--config", str(device.config)], env=_env(),
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "unusable runtime: onnx (onnxruntime " in text and "killed by SIGILL while importing onnxruntime" in text


@pytest.mark.parametrize("device", ["onnx:SIGILL,tflite:SIGSEGV"], indirect=True)
def test_agent_rolls_back_a_bundle_whose_runtimes_all_die(device: FaultyDevice,
                                                          digits: tuple[Path, np.ndarray]) -> None:
    bundle, _ = digits
    device.start()
    device.publish(bundle)
    failed = device.events.wait(is_event(frm="stage", to="rollback", version=1), "the rollback")
    assert (failed["event"], failed["reason"]) == ("failed", "no_usable_runtime")
    assert sorted(u["format"] for u in failed["unusable_runtimes"]) == ["onnx", "tflite"]
    device.events.wait(is_event(frm="rollback", to="idle"), "the rollback finished")
    assert device.running, device.log_tail()  # no crash, no restart: the agent keeps running, serving nothing
    maps = device.mapped()
    assert "onnxruntime" not in maps and "ai_edge_litert" not in maps
    st = device.status()
    assert st["rejected"] == {sha256_file(bundle): "no_usable_runtime"}
    assert st["restarts"] == 0 and st["name"] is None
    assert sorted(u["format"] for u in st["unusable_runtimes"]) == ["onnx", "tflite"]
