"""Does int8 pay off? The build's side of the verdict: the fp32 model every artifact must beat, measured once.

`setup` prepares the fp32 ONNX graph for quantization (packager/onnx_prepare.py: Constant nodes -> initializers,
BatchNormalization fused, shape inference, opset >= 13), checks it reproduces the model, and measures it: its
bytes and host p50 at batch 1 are what an int8 artifact must beat (packager/verdict.py), and it is what
`--allow-fp32` ships when no int8 recipe pays. `Payoff.judge` turns a measured trial into a verdict: size first,
then (ONNX only) latency, timed and, when it looks slower, confirmed with interleaved rounds against fp32.

`--target` with 8-bit weights on a host whose int8 kernels saturate (x86 without VNNI): artifacts are scored on
an emulation (the QDQ graph run op by op in float: packager/onnx_quant.py `emulation_session`), which is what a
device that does not saturate computes; latency is still timed on the artifact itself.
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from packager import verdict
from packager.tuning import Trial, TuningResult

log = logging.getLogger(__name__)

CONFIRM_ROUNDS = 5
CONFIRM_RUNS = 40  # per model per round
TIME_BUDGET_S = 5.0  # one latency measurement stops after this (with at least MIN_RUNS samples)
MIN_RUNS = 20


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
    except OSError:
        pass
    return set()


def p50_ms(run: Callable[[], Any], runs: int) -> float:
    """Median wall time of `run` in ms: 10 warm-up calls, then `runs` (or what fits TIME_BUDGET_S, >= MIN_RUNS)."""
    for _ in range(min(10, runs)):
        run()
    seconds: list[float] = []
    deadline = time.monotonic() + TIME_BUDGET_S
    while len(seconds) < runs and (len(seconds) < MIN_RUNS or time.monotonic() < deadline):
        t0 = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(seconds)


def interleaved_rounds(a: Callable[[], Any], b: Callable[[], Any], rounds: int = CONFIRM_ROUNDS,
                       runs: int = CONFIRM_RUNS) -> list[tuple[float, float]]:
    """(median of a, median of b) per round, the two timed back to back in every round."""
    out = []
    for _ in range(rounds):
        out.append((p50_ms(a, runs), p50_ms(b, runs)))
    return out


@dataclass
class Payoff:
    fp32: verdict.Fp32  # what an int8 artifact must beat
    max_drop: float
    open_session: Callable[[Path], Any]  # path -> a ModelSession (ONNX)
    one_row: dict[str, np.ndarray]  # the latency feed (batch 1)
    runs: int
    fp32_path: Path | None = None  # the prepared fp32 model: timed against, and shipped by --allow-fp32
    emulate: bool = False  # score ONNX artifacts on the QDQ-in-float emulation (8-bit target, saturating host)
    prepared: dict[str, Any] | None = None  # what onnx_prepare did (report)
    fp32_value: float = math.nan
    fp32_drop: float = math.nan
    _fp32_session: Any = None

    def emulates(self, fmt: str) -> bool:
        """Whether `fmt` artifacts are scored on the emulation rather than this host's int8 kernels."""
        return self.emulate and fmt == "onnx"

    def judge(self, trial: Trial, fmt: str) -> Trial:
        """`trial` with its verdict: `rejected` set when it is larger (or, ONNX, slower) than fp32."""
        if trial.error is not None or trial.path is None:
            return trial
        v = verdict.judge(self.fp32, max_drop=self.max_drop, drop=trial.drop, nbytes=trial.bytes)
        if not v.passed:
            return replace(trial, rejected=v.reason) if v.failed == "size" else trial
        if fmt != "onnx" or self.fp32.p50_ms is None or self.fp32_path is None:
            return trial
        session = self.open_session(trial.path)
        p50 = p50_ms(lambda: session.run(self.one_row), self.runs)
        v = verdict.judge(self.fp32, max_drop=self.max_drop, drop=trial.drop, nbytes=trial.bytes, p50_ms=p50)
        if v.failed == "latency":
            # One measurement said slower: time both again, interleaved, so a load spike cannot decide alone.
            fp32_session = self._fp32()
            rounds = interleaved_rounds(lambda: session.run(self.one_row), lambda: fp32_session.run(self.one_row))
            ratio = verdict.paired_ratio(rounds)
            confirmed = verdict.judge(self.fp32, max_drop=self.max_drop, drop=trial.drop, nbytes=trial.bytes,
                                      p50_ms=ratio * self.fp32.p50_ms)
            log.info("%s looked slower than fp32 (p50 %.3f vs %.3f ms); interleaved rounds: %.2fx",
                     trial.recipe.get("name"), p50, self.fp32.p50_ms, ratio)
            if confirmed.passed:
                return replace(trial, p50_ms=p50)
            why = (f"slower than fp32: {ratio:.2f}x its p50 at batch 1 (interleaved rounds; {p50:.3f} vs "
                   f"{self.fp32.p50_ms:.3f} ms)")
            return replace(trial, p50_ms=p50, rejected=why)
        return replace(trial, p50_ms=p50)

    def _fp32(self) -> Any:
        if self._fp32_session is None:
            assert self.fp32_path is not None
            self._fp32_session = self.open_session(self.fp32_path)
        return self._fp32_session

    def fp32_result(self, failed: TuningResult, reason: str) -> TuningResult:
        """`failed` with the fp32 model chosen (`--allow-fp32`): every int8 trial stays listed in the report."""
        assert self.fp32_path is not None
        recipe = {"name": "fp32", "precision": "fp32", "reason": reason}
        chosen = Trial(recipe, self.fp32_path, self.fp32_path.stat().st_size, self.fp32_value, self.fp32_drop,
                       p50_ms=self.fp32.p50_ms)
        return TuningResult(chosen, failed.best_failing, failed.trials)


def setup(fp32_path: Path, work: Path, calib_inputs: dict[str, np.ndarray], one_row: dict[str, np.ndarray],
          open_session: Callable[[Path], Any], score: Callable[[Path], tuple[float, float]], max_drop: float,
          runs: int, onnx: bool, reduce_range: bool, progress: Callable[[str], None]) -> Payoff:
    """Prepare and measure the fp32 baseline. Without an ONNX format only its size is used (TFLite)."""
    if not onnx:
        return Payoff(verdict.Fp32(fp32_path.stat().st_size), max_drop, open_session, one_row, runs)
    from packager import onnx_quant
    from packager.onnx_export import save_self_contained
    from packager.onnx_prepare import VERIFY_ROWS, prepare

    prep = prepare(fp32_path, work / "model.prepared.onnx", {k: v[:VERIFY_ROWS] for k, v in calib_inputs.items()})
    onnx_quant.remember_prepared(fp32_path, prep.path)
    progress(f"prepared for quantization: {prep.summary()}")
    for note in prep.notes:
        progress(f"note: {note}")
    # The fp32 model to beat (and to ship with --allow-fp32): the prepared graph without its shape annotations
    # (onnxruntime infers them again) and debug data.
    ship = work / "model.fp32.ship.onnx"  # not fp32_path's name: that file is what the recipes quantize
    import onnx as onnx_lib

    model = onnx_lib.load(str(prep.path))
    onnx_quant.compact(model)
    save_self_contained(model, ship)
    session = open_session(ship)
    p50 = p50_ms(lambda: session.run(one_row), runs)
    value, drop = score(ship)
    emulate = not reduce_range and onnx_quant.host_saturates(platform.machine(), cpu_flags())
    if emulate:
        progress("8-bit weights on a host whose int8 kernels saturate (x86 without VNNI): accuracy is measured on "
                 "an emulation of a non-saturating device")
    progress(f"fp32 to beat: {ship.stat().st_size / 1024:.0f} KiB, p50 {p50:.3f} ms")
    return Payoff(verdict.Fp32(ship.stat().st_size, p50), max_drop, open_session, one_row, runs, fp32_path=ship,
                  emulate=emulate, prepared=prep.to_json(), fp32_value=value, fp32_drop=drop)


def failure_line(fmt: str, result: TuningResult, metric_name: str, ref_value: float, max_drop: float) -> str:
    """Why `fmt` has no artifact: the accuracy sentence when only accuracy failed, else the plain verdict."""
    t = result.best_failing
    if not any(x.rejected for x in result.trials):
        if t is None or t.error is not None:
            return f"{fmt}: every recipe failed ({t.error if t is not None else 'no recipe ran'})"
        return (f"{fmt} int8 {metric_name} {t.value:.4g} vs fp32 {ref_value:.4g}: drop {t.drop:.4g} > {max_drop:g} "
                f"(best of {len(result.trials)} recipes)")
    verdicts = []
    for x in result.trials:
        name = str(x.recipe.get("name", "?"))
        if x.error is not None:
            verdicts.append((name, verdict.Verdict(False, "error", x.error)))
        elif x.rejected is not None:
            kind: verdict.Failure = "latency" if x.rejected.startswith("slower") else "size"
            verdicts.append((name, verdict.Verdict(False, kind, x.rejected)))
        else:
            verdicts.append((name, verdict.Verdict(False, "accuracy", f"drop {x.drop:.4g} > {max_drop:g}")))
    return verdict.no_recipe_pays(fmt, verdicts)
