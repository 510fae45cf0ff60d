"""The runtime probe's parent side with real child processes that behave like a crashing, hanging, failing or
healthy probe (`python -c ...`: no runtime is imported), its persisted verdicts, and the fault hook's grammar.

The real probe child (importing onnxruntime and LiteRT, with real SIGILL and SIGSEGV): tests/integration/
test_runtime_probe.py."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from agent.bundle import Manifest
from agent.deploy.stage import DeviceProfile
from agent.runtime.probe import (
    PROBE_FILE,
    PROBE_START_S,
    ProbeTarget,
    RuntimeProbe,
    Verdict,
    parse_faults,
    read_verdicts,
    run_probe,
    unusable_runtimes,
)

ANSWER_OK = 'print("phase import"); print("phase load"); print("phase run"); print("phase done"); ' \
            'print("answer " + json.dumps({"ok": True, "rows": 8}))'


def fake_child(body: str) -> tuple[str, ...]:
    """A command standing in for `python -m agent.runtime.probe`: it ignores the probe's arguments."""
    return (sys.executable, "-c", "import json, os, signal, sys, time\n" + textwrap.dedent(body))


def target(tmp_path: Path, fmt: str = "onnx") -> ProbeTarget:
    return ProbeTarget(fmt, tmp_path / f"model.{fmt}", tmp_path / "golden.npz", ["x"], ["y"], "digits v2")


# --- judging the child ---------------------------------------------------------------------------------------------


def _dies_in(phase: str, sig: signal.Signals) -> tuple[str, ...]:
    """A child that reports the phases up to `phase`, then dies of `sig` (SIGKILL as the OOM killer sends it)."""
    phases = ("import", "load", "run")[:("import", "load", "run").index(phase) + 1]
    reset = "" if sig == signal.SIGKILL else f"signal.signal({int(sig)}, signal.SIG_DFL); "
    return fake_child(f'for p in {phases!r}: print("phase " + p)\n'
                      f'sys.stdout.flush(); {reset}os.kill(os.getpid(), {int(sig)})')


@pytest.mark.parametrize("sig", [signal.SIGILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGKILL])
def test_a_child_killed_by_any_signal_while_importing_marks_the_runtime_unusable(tmp_path: Path,
                                                                                 sig: signal.Signals) -> None:
    v = run_probe(target(tmp_path), "1.22.0", command=_dies_in("import", sig), timeout_s=30)
    assert (v.usable, v.blame, v.phase, v.version) == (False, "runtime", "import", "1.22.0")
    assert v.why == f"killed by {sig.name} while importing onnxruntime"


def test_the_phase_reached_is_reported(tmp_path: Path) -> None:
    cmd = fake_child('print("phase import"); print("phase load"); print("phase run", flush=True); '
                     'signal.signal(signal.SIGSEGV, signal.SIG_DFL); os.kill(os.getpid(), signal.SIGSEGV)')
    v = run_probe(target(tmp_path, "tflite"), "2.1", command=cmd, timeout_s=30)
    assert (v.usable, v.phase, v.why) == (False, "run", "killed by SIGSEGV while running the golden rows")
    assert v.runtime == "LiteRT"


@pytest.mark.parametrize("phase", ["load", "run"])
@pytest.mark.parametrize("sig", [signal.SIGILL, signal.SIGSEGV, signal.SIGBUS])
def test_a_cpu_fault_after_the_import_still_blames_the_runtime(tmp_path: Path, phase: str,
                                                               sig: signal.Signals) -> None:
    v = run_probe(target(tmp_path), "1.22.0", command=_dies_in(phase, sig), timeout_s=30)
    assert (v.usable, v.blame, v.phase) == (False, "runtime", phase)
    assert v.why.startswith(f"killed by {sig.name} while ")


@pytest.mark.parametrize("phase", ["load", "run"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGABRT, signal.SIGTERM])
def test_another_signal_after_the_import_blames_the_artifact(tmp_path: Path, phase: str,
                                                             sig: signal.Signals) -> None:
    v = run_probe(target(tmp_path), "1.22.0", command=_dies_in(phase, sig), timeout_s=30)
    assert (v.usable, v.blame, v.phase) == (False, "artifact", phase)
    doing = "loading model.onnx" if phase == "load" else "running the golden rows"
    assert v.why == f"killed by {sig.name} while {doing}"


def test_a_child_hanging_in_its_import_is_killed_at_the_timeout_and_marks_the_runtime_unusable(
        tmp_path: Path) -> None:
    cmd = fake_child('print("phase import", flush=True); time.sleep(600)')
    v = run_probe(target(tmp_path), "1.22.0", command=cmd, timeout_s=1.0)
    assert (v.usable, v.blame, v.phase) == (False, "runtime", "import")
    assert v.why == "hung: no answer within 1 s while importing onnxruntime"


@pytest.mark.parametrize("phase", ["load", "run"])
def test_a_child_hanging_after_the_import_blames_the_artifact(tmp_path: Path, phase: str) -> None:
    phases = ("import", "load") if phase == "load" else ("import", "load", "run")
    cmd = fake_child(f'for p in {phases!r}: print("phase " + p)\nsys.stdout.flush(); time.sleep(600)')
    v = run_probe(target(tmp_path), "1.22.0", command=cmd, timeout_s=1.0)
    assert (v.usable, v.blame, v.phase) == (False, "artifact", phase)
    doing = "loading model.onnx" if phase == "load" else "running the golden rows"
    assert v.why == f"hung: no answer within 1 s while {doing}"


def test_an_import_error_marks_the_runtime_unusable(tmp_path: Path) -> None:
    cmd = fake_child('print("phase import"); print("answer " + json.dumps({"ok": False, "phase": "import", '
                     '"error": "ImportError: libgomp.so.1: cannot open shared object file"})); sys.exit(1)')
    v = run_probe(target(tmp_path), "1.22.0", command=cmd, timeout_s=30)
    assert (v.usable, v.blame) == (False, "runtime")
    assert v.why == "cannot import onnxruntime: ImportError: libgomp.so.1: cannot open shared object file"


@pytest.mark.parametrize("phase", ["load", "run"])
def test_an_artifact_that_raises_is_the_artifacts_fault(tmp_path: Path, phase: str) -> None:
    cmd = fake_child(f'print("phase import"); print("answer " + json.dumps({{"ok": False, "phase": "{phase}", '
                     f'"error": "RuntimeUnavailable: bad model"}})); sys.exit(1)')
    v = run_probe(target(tmp_path), "1.22.0", command=cmd, timeout_s=30)
    assert (v.usable, v.blame, v.phase) == (False, "artifact", phase)
    assert v.why.endswith("failed: RuntimeUnavailable: bad model")


def test_a_child_that_exits_without_an_answer_while_importing_marks_the_runtime_unusable(tmp_path: Path) -> None:
    cmd = fake_child('print("phase import", flush=True); print("Fatal: no CPU feature", file=sys.stderr); '
                     'os._exit(134)')
    v = run_probe(target(tmp_path), "1.22.0", command=cmd, timeout_s=30)
    assert (v.usable, v.blame) == (False, "runtime")
    assert v.why == ("exited with status 134 without an answer while importing onnxruntime: "
                     "Fatal: no CPU feature")


def test_a_child_that_exits_without_an_answer_while_loading_blames_the_artifact(tmp_path: Path) -> None:
    cmd = fake_child('print("phase import"); print("phase load", flush=True); os._exit(3)')
    v = run_probe(target(tmp_path), "1.22.0", command=cmd, timeout_s=30)
    assert (v.usable, v.blame, v.phase) == (False, "artifact", "load")
    assert v.why == "exited with status 3 without an answer while loading model.onnx"


def test_an_answer_marks_the_runtime_usable(tmp_path: Path) -> None:
    v = run_probe(target(tmp_path), "1.22.0", command=fake_child(ANSWER_OK), timeout_s=30)
    assert (v.usable, v.blame, v.phase, v.bundle) == (True, "runtime", "done", "digits v2")
    assert v.why == "imported, loaded model.onnx and ran 8 golden rows"


def test_a_probe_that_cannot_start_blames_no_runtime(tmp_path: Path) -> None:
    v = run_probe(target(tmp_path), "1.22.0", command=(str(tmp_path / "no-such-python"),), timeout_s=30)
    assert (v.usable, v.blame) == (False, "probe")


# --- persisted verdicts --------------------------------------------------------------------------------------------


def test_verdicts_are_persisted_by_format_and_version(tmp_path: Path) -> None:
    crash = fake_child('print("phase import", flush=True); signal.signal(4, signal.SIG_DFL); os.kill(os.getpid(), 4)')
    probe = RuntimeProbe(tmp_path, timeout_s=30, command=crash)
    assert probe.due("onnx", "1.22.0")
    v = probe.check(target(tmp_path), "1.22.0")
    assert not v.usable
    doc = json.loads((tmp_path / PROBE_FILE).read_text())
    assert doc["schema"] == 1 and doc["runtimes"]["onnx"]["why"] == "killed by SIGILL while importing onnxruntime"
    assert doc["runtimes"]["onnx"]["runtime"] == "onnxruntime"
    assert not list(tmp_path.glob(f".{PROBE_FILE}.*"))  # the atomic write left no temporary file

    # known at that version: not probed again (a probe now would succeed)
    again = RuntimeProbe(tmp_path, timeout_s=30, command=fake_child(ANSWER_OK))
    assert not again.due("onnx", "1.22.0")
    assert again.check(target(tmp_path), "1.22.0") == v
    assert [u.format for u in unusable_runtimes(tmp_path)] == ["onnx"]

    # an upgraded runtime is probed again, and its verdict replaces the old one
    assert again.due("onnx", "1.23.0")
    assert again.check(target(tmp_path), "1.23.0").usable
    assert read_verdicts(tmp_path)["onnx"].version == "1.23.0"
    assert unusable_runtimes(tmp_path) == []


def test_an_artifacts_fault_is_not_persisted(tmp_path: Path) -> None:
    cmd = fake_child('print("answer " + json.dumps({"ok": False, "phase": "load", "error": "bad"})); sys.exit(1)')
    probe = RuntimeProbe(tmp_path, timeout_s=30, command=cmd)
    assert not probe.check(target(tmp_path), "1.22.0").usable
    assert not (tmp_path / PROBE_FILE).exists()
    assert probe.due("onnx", "1.22.0")  # the next bundle probes the runtime again


def test_sigkill_while_loading_is_not_persisted(tmp_path: Path) -> None:
    """One oversized bundle gets the child OOM-killed while loading: that says nothing about the runtime, so the
    next bundle's artifact probes it again (and passes)."""
    probe = RuntimeProbe(tmp_path, timeout_s=30, command=_dies_in("load", signal.SIGKILL))
    v = probe.check(target(tmp_path), "1.22.0")
    assert (v.usable, v.blame, v.why) == (False, "artifact", "killed by SIGKILL while loading model.onnx")
    assert not (tmp_path / PROBE_FILE).exists() and unusable_runtimes(tmp_path) == []
    assert probe.due("onnx", "1.22.0")
    healthy = RuntimeProbe(tmp_path, timeout_s=30, command=fake_child(ANSWER_OK))
    assert healthy.check(target(tmp_path), "1.22.0").usable
    assert read_verdicts(tmp_path)["onnx"].usable


def test_a_timeout_while_running_is_not_persisted(tmp_path: Path) -> None:
    cmd = fake_child('print("phase import"); print("phase load"); print("phase run", flush=True); time.sleep(600)')
    probe = RuntimeProbe(tmp_path, timeout_s=1.0, command=cmd)
    v = probe.check(target(tmp_path), "1.22.0")
    assert (v.usable, v.blame, v.phase) == (False, "artifact", "run")
    assert not (tmp_path / PROBE_FILE).exists()
    assert probe.due("onnx", "1.22.0")


def test_sigill_while_running_is_persisted(tmp_path: Path) -> None:
    probe = RuntimeProbe(tmp_path, timeout_s=30, command=_dies_in("run", signal.SIGILL))
    v = probe.check(target(tmp_path), "1.22.0")
    assert (v.usable, v.blame, v.phase) == (False, "runtime", "run")
    assert read_verdicts(tmp_path) == {"onnx": v}
    assert [u.why for u in unusable_runtimes(tmp_path)] == ["killed by SIGILL while running the golden rows"]
    # known at that version: a later bundle does not probe it again, even with a child that would pass
    assert RuntimeProbe(tmp_path, timeout_s=30, command=fake_child(ANSWER_OK)).check(target(tmp_path), "1.22.0") == v


def test_verdicts_of_several_formats_live_side_by_side(tmp_path: Path) -> None:
    RuntimeProbe(tmp_path, timeout_s=30, command=fake_child(ANSWER_OK)).check(target(tmp_path, "tflite"), "2.1")
    hang = fake_child('print("phase import", flush=True); time.sleep(600)')
    RuntimeProbe(tmp_path, timeout_s=1.0, command=hang).check(target(tmp_path, "onnx"), "1.22.0")
    verdicts = read_verdicts(tmp_path)
    assert (verdicts["tflite"].usable, verdicts["onnx"].usable) == (True, False)
    assert [u.describe() for u in unusable_runtimes(tmp_path)] == [
        "onnx (onnxruntime 1.22.0): unusable: hung: no answer within 1 s while importing onnxruntime"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"runtimes": 3}', ""])
def test_an_unreadable_verdict_file_means_probing_again(tmp_path: Path, content: str) -> None:
    (tmp_path / PROBE_FILE).write_text(content)
    assert read_verdicts(tmp_path) == {}
    assert RuntimeProbe(tmp_path).due("onnx", "1.22.0")


def test_a_bad_entry_is_skipped_and_the_others_kept(tmp_path: Path) -> None:
    good = Verdict("tflite", "2.1", False, "killed by SIGILL while importing LiteRT", "import", 1.0, 0.5)
    doc = {"schema": 1, "runtimes": {"tflite": good.to_json(), "onnx": {"format": "onnx", "usable": "yes"},
                                     "other": {**good.to_json(), "format": "tflite"}}}
    (tmp_path / PROBE_FILE).write_text(json.dumps(doc))
    assert read_verdicts(tmp_path) == {"tflite": good}


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RuntimeProbe(tmp_path, timeout_s=0)


# --- what staging asks -----------------------------------------------------------------------------------------


def _manifest(formats: tuple[str, ...]) -> Manifest:
    from agent.bundle import Artifact, TensorSpec

    x, y = TensorSpec("x", (-1, 4), "float32"), TensorSpec("y", (-1, 2), "float32")
    arts = tuple(Artifact(f, f"model.{f}", (x,), (y,), {"name": "int8"}, 1.0, 0.0, 0.1, 0.2) for f in formats)
    return Manifest(name="m", version=2, task="regression", created="2026-12-04T00:00:00+00:00", inputs=(x,),
                    outputs=(y,), artifacts=arts, metric="mse", fp32_metric_value=1.0, max_drop=1.0,
                    parity={"kind": "tolerance", "atol": 1e-3, "rtol": 1e-3}, latency_budget_ms=5.0, target={},
                    preprocessing={}, provenance={"source_sha256": "0" * 64})


def test_probes_due_counts_the_runnable_formats_not_yet_probed(tmp_path: Path) -> None:
    manifest = _manifest(("onnx", "tflite"))
    runtimes = {"onnx": "1.22.0", "tflite": "2.1"}
    assert DeviceProfile("x86_64", 4096, runtimes).probes_due(manifest) == 0  # no probe: nothing is probed
    device = DeviceProfile("x86_64", 4096, runtimes, probe=RuntimeProbe(tmp_path))
    assert device.probes_due(manifest) == 2
    assert DeviceProfile("x86_64", 4096, {"onnx": "1.22.0"}, probe=device.probe).probes_due(manifest) == 1
    RuntimeProbe(tmp_path, timeout_s=30, command=fake_child(ANSWER_OK)).check(target(tmp_path), "1.22.0")
    assert device.probes_due(manifest) == 1
    assert device.probes_due(_manifest(("onnx",))) == 0
    assert device.probe_budget_s(manifest) == 1 * RuntimeProbe(tmp_path).timeout_s
    assert DeviceProfile("x86_64", 4096, runtimes).probe_budget_s(manifest) == 0.0


def test_the_daemons_probe_allows_for_the_childs_start_beyond_a_model_load(tmp_path: Path) -> None:
    device = DeviceProfile.detect(tmp_path, 3.0)
    assert device.probe is not None and device.probe.timeout_s == 3.0 + PROBE_START_S
    assert DeviceProfile.detect().probe is None


# --- the fault hook ------------------------------------------------------------------------------------------------


def test_fault_grammar() -> None:
    assert parse_faults("") == {}
    assert parse_faults("onnx:SIGILL, tflite:SIGSEGV@run,onnx:hang@load") == {
        ("onnx", "import"): "SIGILL", ("tflite", "run"): "SIGSEGV", ("onnx", "load"): "hang"}
    for bad in ("onnx", "onnx:", ":SIGILL", "onnx:SIGNOPE", "onnx:crash", "onnx:SIGILL@warmup"):
        with pytest.raises(ValueError):
            parse_faults(bad)


def test_a_child_that_dies_before_importing_the_runtime_blames_no_runtime(tmp_path: Path) -> None:
    cmd = fake_child('signal.signal(signal.SIGSEGV, signal.SIG_DFL); os.kill(os.getpid(), signal.SIGSEGV)')
    probe = RuntimeProbe(tmp_path, timeout_s=30, command=cmd)
    v = probe.check(target(tmp_path), "1.22.0")
    assert (v.usable, v.blame, v.phase) == (False, "probe", "start")
    assert not (tmp_path / PROBE_FILE).exists()


def test_import_only_checks_persist_failures_only(tmp_path: Path) -> None:
    ok = RuntimeProbe(tmp_path, timeout_s=30, command=fake_child(
        'assert "--import-only" in sys.argv and "--model" not in sys.argv\n'
        'print("phase import"); print("phase done"); print("answer " + json.dumps({"ok": True}))'))
    verdicts = ok.check_imports({"onnx": "1.22.0", "tflite": "2.1"})
    assert {f: (v.usable, v.phase) for f, v in verdicts.items()} == {"onnx": (True, "import"),
                                                                    "tflite": (True, "import")}
    assert not (tmp_path / PROBE_FILE).exists()  # no model ran: STAGE still runs the full probe
    crash = RuntimeProbe(tmp_path, timeout_s=30, command=fake_child(
        'print("phase import", flush=True); signal.signal(4, signal.SIG_DFL); os.kill(os.getpid(), 4)'))
    assert not crash.check_imports({"onnx": "1.22.0"})["onnx"].usable
    assert [v.why for v in unusable_runtimes(tmp_path)] == ["killed by SIGILL while importing onnxruntime"]
    assert not ok.check_imports({"onnx": "1.22.0"})["onnx"].usable  # known now: not probed again
