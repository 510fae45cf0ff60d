"""End to end: a model that hangs the agent at STAGE, with a real hanging ONNX model and no mocks.

The candidate's only artifact is a valid ONNX `Loop` whose trip count is 10**15 and whose carried tensor starts
as the input, so onnxruntime really iterates (nothing to constant-fold) and the first warm-up run never returns.
STAGE runs in a worker thread; after `stage_timeout_s` the agent exits with EXIT_HUNG (70). The test plays
systemd: it restarts every agent that exits with 70 (a bounded number of times). The persisted restart counter
then rolls the candidate back with reason "crash_loop" after `max_restarts`, and the device keeps serving v1.

The agents are real `edge-agent run` processes on a throwaway mosquitto, driven with test_daemon.py's `Device`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.bundle import Artifact, Manifest, TensorSpec, sha256_file, write_bundle
from agent.daemon import EXIT_HUNG
from agent.deploy.machine import State
from agent.runtime import open_session
from examples.digits.train import train_digits
from examples.local_broker import Mosquitto
from packager.build import BuildOptions, Progress, build
from tests.e2e.test_daemon import Device, describe, is_event

pytestmark = pytest.mark.slow

HANG_TRIPS = 10**15  # Loop iterations: never finishes in practice
MAX_RESTARTS = 3
STAGE_TIMEOUT_S = 3  # v1 (onnxruntime import included) stages in well under this
MAX_SUPERVISED_RUNS = MAX_RESTARTS + 3  # the supervisor gives up after this many starts
RUN_TIMEOUT = 30.0  # one agent run: start, retry STAGE, hang for STAGE_TIMEOUT_S, exit


# --- the hanging model and its bundle -------------------------------------------------------------------------


def loop_model(trips: int | None) -> bytes:
    """y = x + trips, computed as a Loop adding 1 to a carried tensor that starts as the input x [-1, 4]; trips None:
    floor(max(x)) trips, so the caller's input decides how long it runs."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["y_in", "step"], ["y_out"])],
        "add_one",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_in", TensorProto.FLOAT, [-1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_out", TensorProto.FLOAT, [-1, 4])],
        [numpy_helper.from_array(np.ones((1, 4), np.float32), "step")])
    nodes = [helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], body=body)]
    consts = [numpy_helper.from_array(np.array(True), "keep_going")]
    if trips is None:
        nodes[:0] = [helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
                     helper.make_node("Cast", ["top"], ["trips"], to=TensorProto.INT64)]
    else:
        consts.append(numpy_helper.from_array(np.array(trips, np.int64), "trips"))
    graph = helper.make_graph(nodes, "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def loop_bundle(tmp: Path, model: bytes, x: np.ndarray, expected: np.ndarray, name: str, version: int,
                latency_budget_ms: float) -> Path:
    """A bundle of one fp32 ONNX artifact `model` (x [-1, 4] -> y [-1, 4]) whose golden rows are x -> expected."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.onnx").write_bytes(model)
    golden = tmp / "golden.npz"
    np.savez(golden, allow_pickle=False, **{"input.x": x, "onnx.output.0": expected})
    spec_in, spec_out = TensorSpec("x", (-1, 4), "float32"), TensorSpec("y", (-1, 4), "float32")
    art = Artifact("onnx", "model.onnx", (spec_in,), (spec_out,), {"name": "fp32"}, 1.0, 0.0, 0.1, 0.2)
    manifest = Manifest(
        name=name, version=version, task="regression", created="2026-11-29T00:00:00+00:00", inputs=(spec_in,),
        outputs=(spec_out,), artifacts=(art,), metric="mse", fp32_metric_value=1.0, max_drop=1.0,
        parity={"kind": "tolerance", "atol": 1e-4, "rtol": 1e-4}, latency_budget_ms=latency_budget_ms, target={},
        preprocessing={}, provenance={"source_sha256": "0" * 64})
    out = tmp / "out" / f"{name}-{version}.bundle"
    out.parent.mkdir()
    write_bundle(out, manifest, {"model.onnx": tmp / "model.onnx", "golden.npz": golden})
    return out


def hanging_bundle(tmp: Path) -> Path:
    """digits v2 whose ONNX artifact hangs; golden.npz holds a 3-trip reference's outputs (never reached)."""
    tmp.mkdir(parents=True, exist_ok=True)
    reference = tmp / "reference.onnx"
    reference.write_bytes(loop_model(3))
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    session = open_session(reference, "onnx", input_names=["x"], output_names=["y"])
    expected = session.run({"x": x})[0]
    np.testing.assert_allclose(expected, x + 3, rtol=1e-6)  # the Loop really iterates
    return loop_bundle(tmp, loop_model(HANG_TRIPS), x, expected, "digits", 2, 5.0)


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A real digits v1 bundle (2 epochs, ONNX only) and evaluation rows (n, 1, 8, 8) to infer with."""
    tmp = tmp_path_factory.mktemp("hung-v1")
    paths = train_digits(tmp / "digits", epochs=2)
    opts = BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                        out_dir=tmp / "out", name="digits", version=1, formats=("onnx",), latency_runs=20)
    bundle = build(opts, Progress(0, enabled=False)).bundle
    with np.load(paths["eval"], allow_pickle=False) as z:
        x = z["x"][:4].astype(np.float32)
    return bundle, x


# --- the supervisor -------------------------------------------------------------------------------------------


def wait_exit_or(dev: Device, done: Callable[[], bool], what: str, timeout: float = RUN_TIMEOUT) -> int | None:
    """The agent's exit status once it exits, or None once `done()` holds while it runs."""
    assert dev.proc is not None
    deadline = time.monotonic() + timeout
    while True:
        rc = dev.proc.poll()
        if rc is not None:
            return rc
        if done():
            return None
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{dev.log_tail()}")
        time.sleep(0.05)


def test_hung_stage_exits_and_crash_loop_rolls_back(mosquitto: Mosquitto, tmp_path: Path,
                                                    v1: tuple[Path, np.ndarray]) -> None:
    v1_bundle, x = v1
    v2 = hanging_bundle(tmp_path / "hang")
    sha2 = sha256_file(v2)
    (tmp_path / "device").mkdir()
    dev = Device(tmp_path / "device", mosquitto, stage_timeout_s=STAGE_TIMEOUT_S, max_restarts=MAX_RESTARTS)
    try:
        dev.start()
        dev.publish(v1_bundle)
        dev.events.wait(is_event(frm="commit", to="idle", version=1), "v1 committed")
        dev.wait_ready()
        status, doc = dev.infer(x[:1])
        assert status == 200 and doc["model_version"] == "1", doc

        mark = dev.events.mark()
        dev.publish(v2)

        def rolled_back() -> bool:
            ds = dev.state()
            return ds.state is State.IDLE and sha2 in ds.rejected

        # systemd: restart the agent whenever it exits with EXIT_HUNG, a bounded number of times
        exits: list[tuple[int, State, str | None, int]] = []  # (status, persisted state, candidate sha, restarts)
        for run in range(MAX_SUPERVISED_RUNS):
            rc = wait_exit_or(dev, rolled_back, f"run {run + 1} to exit or roll v2 back")
            if rc is None:
                break
            ds = dev.state()
            exits.append((rc, ds.state, ds.candidate and ds.candidate.sha256, ds.restarts))
            assert rc == EXIT_HUNG, f"run {run + 1} exited with {rc}, not {EXIT_HUNG}\n{dev.log_tail()}"
            dev.start()
        else:
            pytest.fail(f"still no rollback after {MAX_SUPERVISED_RUNS} runs: {exits}\n{dev.log_tail()}")

        # every run before the last hung in STAGE on v2 and exited 70; the restart counter counted each
        assert exits == [(EXIT_HUNG, State.STAGE, sha2, n) for n in range(MAX_RESTARTS)], exits
        log = dev.log.read_text(errors="replace")
        assert log.count(f"staging digits v2 hung for {STAGE_TIMEOUT_S:g}s") == MAX_RESTARTS, dev.log_tail()
        assert "staging digits v1 hung" not in log

        # the events: into STAGE, two restarts retrying it, then the crash-loop rollback back to v1
        failed = dev.events.wait(is_event(to="rollback", version=2), "the crash-loop rollback", mark)
        assert (failed["from"], failed["event"], failed["reason"]) == ("stage", "crash_loop", "crash_loop")
        assert failed["bundle"]["sha256"] == sha2
        done = dev.events.wait(is_event(frm="rollback", to="idle"), "the rollback finished", mark)
        assert done["bundle"]["version"] == 1
        seen = [(e["from"], e["to"], e["event"], e["reason"]) for e in dev.events.since(mark)
                if e["event"] not in ("no_update", "check")]
        stage_events = seen[seen.index(("verify", "stage", "ok", "")):]
        assert stage_events[:4] == [
            ("verify", "stage", "ok", ""),
            ("stage", "stage", "restarted", f"restart 1 of {MAX_RESTARTS}"),
            ("stage", "stage", "restarted", f"restart 2 of {MAX_RESTARTS}"),
            ("stage", "rollback", "crash_loop", "crash_loop"),
        ], list(map(describe, dev.events.since(mark)))

        # v1 serves, v2 is rejected and its release deleted
        dev.wait_ready()
        status, doc = dev.infer(x[:2])
        assert status == 200 and doc["model_version"] == "1", doc
        st = dev.status()
        assert (st["name"], st["version"], st["state"]) == ("digits", 1, "idle")
        assert st["rejected"] == {sha2: "crash_loop"}
        assert not list((dev.state_dir / "releases").glob("digits-2-*"))

        # later polls see v2 again and leave it alone: no STAGE, no exit
        after = dev.events.mark()
        dev.events.wait(is_event(frm="check", to="idle", reason="rejected: crash_loop"), "two more checks", after,
                        count=2)
        assert [describe(e) for e in dev.events.since(after) if e["event"] != "no_update"] == []
        assert dev.running, dev.log_tail()
        assert dev.state().state in (State.IDLE, State.CHECK)
        assert dev.log.read_text(errors="replace").count("staging digits v2 hung") == MAX_RESTARTS
    finally:
        dev.close()
