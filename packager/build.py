"""`packager build`: model in, measured int8 bundle out (or a refusal that says which artifact lost how much).

Everything is built in a private temporary directory; the output directory only ever receives the finished
bundle and its report, each by atomic rename, so a failure at any step leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import (
    DEFAULT_MAX_BATCH,
    GOLDEN_FILE,
    MAX_BATCH_LIMIT,
    Artifact,
    Manifest,
    TensorSpec,
    bundle_filename,
    golden_input_key,
    golden_output_key,
    valid_name,
    write_bundle,
)
from agent.fsutil import write_atomic
from agent.runtime import ModelSession, open_session
from packager import __version__ as packager_version
from packager import metrics
from packager.data import Dataset, fit_to_specs, load_npz
from packager.errors import AccuracyGateError, ConversionError, InputError, PackagerError
from packager.report import class_breakdown, manifest_sections, report_html, report_json
from packager.serving_spec import labels_section, parse_preprocess, preprocessing_section, read_labels
from packager.torch_model import (
    SourceModel,
    declared_input_specs,
    default_name,
    example_args,
    load_source,
    run_torch,
)
from packager.tuning import Trial, TuningResult, tune

log = logging.getLogger(__name__)

GOLDEN_ROWS = 64
MIN_GOLDEN_ROWS = 32
CALIB_ROWS_TFLITE = 256


@dataclass(frozen=True)
class BuildOptions:
    model: str
    calib: Path
    eval: Path
    out_dir: Path
    name: str | None = None
    version: int | None = None
    formats: tuple[str, ...] | None = None  # None: every format the model kind allows
    prune: float = 0.0
    prune_channels: float = 0.0  # structured: the fraction of channels removed (packager/prune.py)
    finetune_epochs: int = 10  # after --prune-channels, on the calibration data
    qat_epochs: int = 3  # the QAT fallback's fine-tune when every ONNX PTQ recipe misses (packager/qat.py)
    max_drop: float | None = None  # None: the task's default
    task: str = "classification"
    weights: Path | None = None
    latency_budget_ms: float | None = None
    threads: int = 1
    latency_runs: int = 200
    max_batch: int = DEFAULT_MAX_BATCH  # the largest batch one inference request may carry on the device
    allow_fp32: bool = False  # ship the fp32 ONNX model when no int8 recipe pays (packager/payoff.py)
    target: str = "any"  # device family (packager/onnx_quant.py TARGETS): ONNX weight bits, architectures
    labels: Path | None = None  # class names, one per line: the manifest's `labels` (packager/serving_spec.py)
    preprocess: str | None = None  # `--preprocess` key=value pairs: the manifest's `preprocessing`


class Progress:
    """Numbered step lines on stderr; the build's only user-facing output besides the result."""

    def __init__(self, total: int, stream: Any = None, enabled: bool = True) -> None:
        self.total, self.current, self.enabled = total, 0, enabled
        self.stream = stream if stream is not None else sys.stderr
        self._t0 = time.monotonic()

    def step(self, message: str) -> None:
        self.current += 1
        self._write(f"[{self.current}/{self.total}] {message}")

    def detail(self, message: str) -> None:
        self._write(f"      {message}")

    def _write(self, line: str) -> None:
        if self.enabled:
            print(f"{line}  ({time.monotonic() - self._t0:.1f}s)", file=self.stream, flush=True)


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    report: dict[str, Any]
    manifest: Manifest


def _formats_for(source: SourceModel, asked: tuple[str, ...] | None) -> tuple[str, ...]:
    possible = ("onnx", "tflite") if source.exportable else ("onnx",)
    if asked is None:
        return possible
    for fmt in asked:
        if fmt not in ("onnx", "tflite"):
            raise InputError(f"--format: unknown format {fmt!r} (choose from onnx, tflite)")
        if fmt not in possible:
            why = "an ONNX model" if source.kind == "onnx" else "a TorchScript model (torch.export cannot trace it)"
            raise InputError(f"--format tflite needs a .pt2 or package.module:factory model, not {why}")
    return asked


def _next_version(out_dir: Path, name: str) -> int:
    pattern = re.compile(rf"^{re.escape(name)}-(\d+)\.bundle$")
    versions = [int(m.group(1)) for p in out_dir.glob(f"{name}-*.bundle") if (m := pattern.match(p.name))]
    return max(versions, default=0) + 1


def _host() -> dict[str, Any]:
    flags: set[str] = set()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("flags", "Features") and not flags:
                flags = set(value.split())
            elif key in ("model name", "Model") and cpu == (platform.processor() or platform.machine()):
                cpu = value.strip()
    except OSError:
        pass
    int8 = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})
    return {"machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(), "int8_isa": int8,
            "python": platform.python_version()}


def _time_session(session: ModelSession, feeds: dict[str, np.ndarray], runs: int) -> metrics.Latency:
    one = {k: v[:1] for k, v in feeds.items()}
    for _ in range(min(10, runs)):
        session.run(one)
    seconds: list[float] = []
    deadline = time.monotonic() + 5.0  # a slow model still finishes in bounded time, with >= 20 samples
    while len(seconds) < runs and (len(seconds) < 20 or time.monotonic() < deadline):
        t0 = time.perf_counter()
        session.run(one)
        seconds.append(time.perf_counter() - t0)
    return metrics.latency_summary(seconds)


def _zstd_bytes(path: Path) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=10).compress(path.read_bytes()))


def _check_output_fits(task: str, output: np.ndarray, labels: np.ndarray | None, where: str) -> None:
    if labels is None:
        return
    if task == "classification":
        classes = output.reshape(len(output), -1).shape[1]
        if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= classes:
            raise InputError(f"{where}: labels 'y' must be integer classes in [0, {classes}) for this model")
    elif task == "regression" and output.size != labels.size:
        raise InputError(f"{where}: labels 'y' have {labels.size // len(labels)} values per sample, "
                         f"the model outputs {output.size // len(output)}")


@contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="edgeship-build-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_float_feeds(source: SourceModel, ds: Dataset) -> dict[str, np.ndarray]:
    # Before the ONNX graph tells us the exact dtypes, torch wants float32 / int64 like any exported model.
    out = {}
    for k in source.input_names:
        a = ds.inputs[k]
        out[k] = a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int64) if a.dtype.kind in "iub" else a
    return out


class _Evaluator:
    """Scores one model on EVAL against the reference: the unpruned source model's fp32 outputs."""

    def __init__(self, opts: BuildOptions, eval_ds: Dataset, ref_out: np.ndarray, ref_value: float,
                 input_names: Sequence[str], output_names: Sequence[str]) -> None:
        self.opts, self.eval_ds, self.ref_out, self.ref_value = opts, eval_ds, ref_out, ref_value
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.payoff: Any = None  # packager.payoff.Payoff once the fp32 baseline is measured: judges every trial

    def open(self, path: Path, fmt: str) -> ModelSession:
        return open_session(path, fmt, threads=self.opts.threads, input_names=self.input_names,
                            output_names=self.output_names)

    def open_scored(self, path: Path, fmt: str) -> Any:
        """What stands for the device's outputs: the artifact itself, or its emulation (packager/payoff.py)."""
        if self.payoff is not None and self.payoff.emulates(fmt):
            from packager.onnx_quant import emulation_session

            return emulation_session(path, self.input_names)
        return self.open(path, fmt)

    def score(self, path: Path, fmt: str) -> tuple[float, float, np.ndarray]:
        out = self.open_scored(path, fmt).run(self.eval_ds.inputs)[0]
        value, drop = self.value_and_drop(out)
        return value, drop, out

    def value_and_drop(self, out: np.ndarray) -> tuple[float, float]:
        value = metrics.metric_value(self.opts.task, out, self.eval_ds.labels, self.ref_out)
        return value, metrics.metric_drop(self.opts.task, self.ref_value, value, self.eval_ds.labels)

    def trial(self, recipe: dict[str, Any], path: Path, fmt: str, make: Callable[[], None]) -> Trial:
        try:
            make()
            value, drop, _ = self.score(path, fmt)
        except ConversionError as e:
            return Trial(recipe, None, 0, math.nan, math.inf, str(e))
        trial = Trial(recipe, path, path.stat().st_size, value, drop)
        return self.payoff.judge(trial, fmt) if self.payoff else trial  # larger or slower than fp32: rejected


def build(opts: BuildOptions, progress: Progress | None = None) -> BuildResult:
    task = opts.task
    name = check_build_options(opts)
    max_drop = opts.max_drop if opts.max_drop is not None else metrics.DEFAULT_MAX_DROP[task]

    source = _load_model(opts)
    formats = _formats_for(source, opts.formats)
    pruning_asked = opts.prune or opts.prune_channels
    if pruning_asked and not source.is_torch:
        raise InputError(f"--prune{'-channels' if opts.prune_channels else ''} needs a PyTorch model; prune "
                         "before exporting to ONNX")
    progress = progress or Progress(0)
    progress.total = 4 + len(formats) + (1 if pruning_asked else 0)
    progress.step(f"loaded {source.kind} model {source.description}")

    calib = load_npz(opts.calib, source.input_names, "calibration", need_labels=False)
    eval_ds = load_npz(opts.eval, source.input_names, "evaluation", need_labels=task != "embedding")
    if eval_ds.n < MIN_GOLDEN_ROWS:
        raise InputError(f"evaluation data {opts.eval}: {eval_ds.n} samples; at least {MIN_GOLDEN_ROWS} needed")

    with _workdir() as work:
        fp32_path = work / "model.fp32.onnx"  # what gets quantized: the pruned model when pruning
        source_path = fp32_path  # the reference every artifact is gated against: the model as given
        declared = declared_input_specs(source)
        if declared is not None:
            calib = fit_to_specs(calib, declared, "calibration")
            eval_ds = fit_to_specs(eval_ds, declared, "evaluation")
        if source.is_torch:
            torch_eval = _as_float_feeds(source, eval_ds)
            torch_calib = _as_float_feeds(source, calib.head(1))
            # Fail early, before any export, on data that does not fit the model.
            run_torch(source, torch_calib, role=f"calibration data {opts.calib}")
            run_torch(source, {k: v[:1] for k, v in torch_eval.items()}, role=f"evaluation data {opts.eval}")
            from packager.onnx_export import export_onnx

            if pruning_asked:
                from packager.prune import prune_for_build

                # Export the unpruned model first: pruning is in place, and the gate measures against it.
                source_path = work / "model.source.onnx"
                export_onnx(source.module, example_args(source, torch_calib), source.input_names, source_path)
                pr, line = prune_for_build(source, opts.prune, opts.prune_channels, opts.finetune_epochs, task,
                                           _as_float_feeds(source, calib), calib.labels,
                                           example_args(source, torch_calib))
                progress.step(line)
            export_onnx(source.module, example_args(source, torch_calib), source.input_names, fp32_path)
            progress.step(f"exported fp32 ONNX ({fp32_path.stat().st_size / 1024:.0f} KiB)")
        else:
            from packager.onnx_export import copy_self_contained

            assert source.onnx_path is not None
            copy_self_contained(source.onnx_path, fp32_path)
            progress.step(f"read fp32 ONNX ({fp32_path.stat().st_size / 1024:.0f} KiB)")

        source_session = open_session(source_path, "onnx", threads=opts.threads)
        calib = fit_to_specs(calib, source_session.inputs, "calibration")
        eval_ds = fit_to_specs(eval_ds, source_session.inputs, "evaluation")
        input_names = [s.name for s in source_session.inputs]
        output_names = [s.name for s in source_session.outputs]
        ref_out = _run_eval(source_session, eval_ds, opts.eval)
        _check_output_fits(task, ref_out, eval_ds.labels, f"evaluation data {opts.eval}")
        prep = (preprocessing_section(parse_preprocess(opts.preprocess), source_session.inputs)[0]
                if opts.preprocess else None)
        class_names = labels_section(read_labels(opts.labels), source_session.outputs, ref_out) if opts.labels else None
        ref_value = metrics.metric_value(task, ref_out, eval_ds.labels, ref_out)
        fp32_lat = _time_session(source_session, eval_ds.inputs, opts.latency_runs)
        metric_name = metrics.METRIC_BY_TASK[task]
        progress.step(f"fp32 on {eval_ds.n} evaluation samples: {metric_name} {ref_value:.4g}, "
                      f"p50 {fp32_lat.p50_ms:.3f} ms")

        evaluator = _Evaluator(opts, eval_ds, ref_out, ref_value, input_names, output_names)
        fp32_session, fp32_out = source_session, ref_out
        pruning: dict[str, Any] | None = None
        if pruning_asked:
            fp32_session = evaluator.open(fp32_path, "onnx")
            fp32_out = _run_eval(fp32_session, eval_ds, opts.eval)
            value, drop = evaluator.value_and_drop(fp32_out)
            pruned_lat = _time_session(fp32_session, eval_ds.inputs, opts.latency_runs)
            pruning = {
                **pr, "value_before": ref_value, "value_after": value,
                "drop": drop, "passed": drop <= max_drop, "bytes": fp32_path.stat().st_size,
                "zstd_bytes": _zstd_bytes(fp32_path), "p50_ms": pruned_lat.p50_ms, "p95_ms": pruned_lat.p95_ms,
            }
            progress.detail(f"pruned fp32: {metric_name} {ref_value:.4g} -> {value:.4g} (drop {drop:.3g}), "
                            f"{fp32_path.stat().st_size / 1024:.0f} KiB, p50 {pruned_lat.p50_ms:.3f} ms")
            if not drop <= max_drop:  # NaN fails too
                # Quantizing cannot win back what pruning lost: stop before spending time on it.
                flag = f"--prune-channels {opts.prune_channels:g}" if opts.prune_channels else f"--prune {opts.prune:g}"
                raise AccuracyGateError(
                    f"accuracy gate failed, no bundle written: pruning ({flag}) fp32 "
                    f"{metric_name} {value:.4g} vs unpruned {ref_value:.4g}: drop {drop:.4g} > {max_drop:g}")

        from packager import payoff
        from packager.onnx_quant import TARGETS

        device = TARGETS[opts.target]
        evaluator.payoff = payoff.setup(
            fp32_path, work, calib.inputs, {k: v[:1] for k, v in eval_ds.inputs.items()},
            lambda p: evaluator.open(p, "onnx"), lambda p: evaluator.score(p, "onnx")[:2], max_drop,
            opts.latency_runs, "onnx" in formats, device.reduce_range, progress.detail)
        results: dict[str, TuningResult] = {}
        for fmt in formats:
            if fmt == "onnx":
                results[fmt] = _tune_onnx(evaluator, fp32_path, calib, work, max_drop, progress, device.reduce_range)
                if source.is_torch and opts.qat_epochs:
                    from packager import qat

                    results[fmt] = qat.fallback(results[fmt], evaluator, source, calib, work, max_drop,
                                                opts.qat_epochs, task, progress, device.reduce_range)
            else:
                results[fmt] = _tune_tflite(evaluator, source, calib, work, max_drop, progress)

        no_int8 = {f: payoff.failure_line(f, r, metric_name, ref_value, max_drop)
                    for f, r in results.items() if r.chosen is None}
        if opts.allow_fp32 and "onnx" in no_int8:
            results["onnx"] = evaluator.payoff.fp32_result(results["onnx"], no_int8["onnx"])
            progress.detail(f"{no_int8['onnx']}: shipping fp32 ONNX (--allow-fp32)")
        failed = {f: r for f, r in results.items() if r.chosen is None}
        report = _report_base(opts, name, task, max_drop, source, calib, eval_ds, pruning)
        if source.kind == "exported":
            from packager.distill import read_record

            if (distilled := read_record(Path(opts.model))) is not None:
                report["distillation"] = distilled  # written by `packager distill`: names the teacher
        # "fp32" is the unpruned source model: the reference every drop (pruning's included) is measured from.
        report["fp32"] = {"bytes": source_path.stat().st_size, "zstd_bytes": _zstd_bytes(source_path),
                          "metric": metric_name, "value": ref_value, "p50_ms": fp32_lat.p50_ms,
                          "p95_ms": fp32_lat.p95_ms}
        report["target"] = {**device.to_json(), "accuracy_emulated": evaluator.payoff.emulate}
        notes = report.setdefault("notes", [])
        notes.append(f"Built for --target {device.name}: {device.description}."
                     + (" Accuracy measured on an emulation of a non-saturating device (this host's int8 kernels "
                        "saturate)." if evaluator.payoff.emulate else ""))
        notes += [f"Preparing the ONNX graph: {n}." for n in (evaluator.payoff.prepared or {}).get("notes", [])]
        if "onnx" in no_int8 and opts.allow_fp32:
            notes.append(f"No int8 recipe paid, so the ONNX artifact is fp32 (--allow-fp32): {no_int8['onnx']}.")
        if evaluator.payoff.prepared is not None:
            report["onnx_prepare"] = evaluator.payoff.prepared
            report["fp32_to_beat"] = {"bytes": evaluator.payoff.fp32.bytes, "p50_ms": evaluator.payoff.fp32.p50_ms}
        if failed:
            parts = [no_int8[f] for f in failed]
            pays = all(not t.rejected for r in failed.values() for t in r.trials)
            hint = "" if "onnx" not in failed or opts.allow_fp32 else " (--allow-fp32 ships fp32 ONNX instead)"
            if "tflite" in failed and opts.allow_fp32:
                hint = " (--allow-fp32 ships fp32 ONNX only: build with --format onnx)"
            raise AccuracyGateError(("accuracy gate failed" if pays else "no int8 artifact pays")
                                    + ", no bundle written: " + "; ".join(parts) + hint)

        artifacts: list[Artifact] = []
        members: dict[str, Path] = {}
        golden: dict[str, np.ndarray] = {}
        golden_n = min(GOLDEN_ROWS, eval_ds.n)
        golden_inputs = eval_ds.rows(0, golden_n)
        for name_in, arr in golden_inputs.items():
            golden[golden_input_key(name_in)] = arr
        report["artifacts"] = []
        eval_outputs = {"fp32": ref_out}
        for fmt, r in results.items():
            chosen = r.chosen
            assert chosen is not None and chosen.path is not None
            precision = str(chosen.recipe.get("precision", "int8"))
            member = f"model.{precision}.{fmt}"
            members[member] = chosen.path
            session = evaluator.open(chosen.path, fmt)
            lat = _time_session(session, eval_ds.inputs, opts.latency_runs)
            # Golden outputs as the target device computes them (the emulation for 8-bit weights on a saturating host)
            expected = evaluator.open_scored(chosen.path, fmt) if precision == "int8" else session
            for i, out in enumerate(expected.run(golden_inputs)):
                golden[golden_output_key(fmt, i)] = out
            if task == "classification":
                eval_outputs[f"{fmt} {precision}"] = expected.run(eval_ds.inputs)[0]
            artifacts.append(Artifact(fmt, member, session.inputs, session.outputs, chosen.recipe, chosen.value,
                                      chosen.drop, lat.p50_ms, lat.p95_ms))
            report["artifacts"].append({
                "format": fmt, "file": member, "bytes": chosen.bytes, "zstd_bytes": _zstd_bytes(chosen.path),
                "metric": metric_name, "value": chosen.value, "drop": chosen.drop, "p50_ms": lat.p50_ms,
                "p95_ms": lat.p95_ms, "recipe": chosen.recipe, "precision": precision,
                "trials": [t.to_json(max_drop) for t in r.trials],
            })
            progress.detail(f"{fmt} {precision}: {chosen.bytes / 1024:.0f} KiB "
                            f"({chosen.bytes / report['fp32']['bytes']:.3f}x fp32), {metric_name} "
                            f"{chosen.value:.4g} (drop {chosen.drop:.3g}), p50 {lat.p50_ms:.3f} ms")

        version = opts.version
        try:
            opts.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--out {opts.out_dir}: cannot create the directory ({e.strerror})") from e
        if version is None:
            version = _next_version(opts.out_dir, name)
        out_path = opts.out_dir / bundle_filename(name, version)
        if out_path.exists():  # checked before any work too; this catches a build that finished meanwhile
            raise InputError(f"{out_path} already exists: bundles are immutable, pick a new --version")
        report["version"] = version
        report["verdict"] = f"Every artifact is within the gate (max drop {max_drop:g})."
        if "onnx" in no_int8 and opts.allow_fp32:
            report["verdict"] += f" No int8 ONNX recipe pays, so the ONNX artifact is fp32 (--allow-fp32): " \
                                 f"{no_int8['onnx']}."
        manifest = _manifest(name, version, task, metric_name, ref_value, max_drop, opts, source, calib,
                             eval_ds, fp32_session.inputs, fp32_session.outputs, artifacts,
                             _parity(task, fp32_out[:golden_n]), report)
        manifest = replace(manifest, labels=class_names, preprocessing=prep or manifest.preprocessing)
        report.update(manifest_sections(manifest))
        if task == "classification" and eval_ds.labels is not None:
            report["classes"] = class_breakdown(eval_ds.labels, eval_outputs,
                                                class_names.names if class_names is not None else None)
        golden_path = work / GOLDEN_FILE
        np.savez(golden_path, allow_pickle=False, **golden)
        reference_path = work / "reference.json"
        reference_path.write_text(report_json(metrics.reference_histograms(
            task, fp32_out, inputs=next(iter(eval_ds.inputs.values())))))
        (work / "report.json").write_text(report_json(report))
        (work / "report.html").write_text(report_html(report))
        members.update({GOLDEN_FILE: golden_path, "reference.json": reference_path,
                        "report.json": work / "report.json", "report.html": work / "report.html"})
        html_beside = opts.out_dir / f"{name}-{version}.report.html"
        try:
            write_atomic(html_beside, report_html(report).encode())
            try:
                written = write_bundle(out_path, manifest, members)
            except BaseException:
                html_beside.unlink(missing_ok=True)
                raise
        except OSError as e:
            raise InputError(f"--out {opts.out_dir}: cannot write the bundle ({e.strerror or e})") from e
        report["bundle"] = str(out_path)
        progress.step(f"wrote {out_path} ({out_path.stat().st_size / 1024:.0f} KiB) and {html_beside.name}")
        return BuildResult(out_path, report, written)


def _tune_onnx(ev: _Evaluator, fp32_path: Path, calib: Dataset, work: Path, max_drop: float,
               progress: Progress, reduce_range: bool = True) -> TuningResult:
    from packager import onnx_quant

    progress.step("quantizing ONNX to int8 (onnxruntime)")
    counter = iter(range(1_000_000))

    def attempt(recipe: onnx_quant.OnnxRecipe) -> Trial:
        out = work / f"onnx-{next(counter)}.int8.onnx"
        t = ev.trial(recipe.to_json(), out, "onnx", lambda: onnx_quant.quantize(fp32_path, recipe, calib.inputs, out))
        progress.detail(_trial_line(recipe.name, t, max_drop))
        return t

    first = onnx_quant.first_recipe(fp32_path, reduce_range)

    def alternatives() -> list[onnx_quant.OnnxRecipe]:
        progress.detail(f"{first.name} missed the gate: trying alternative recipes")
        return onnx_quant.alternative_recipes(fp32_path, calib.inputs, first)

    return tune(first, alternatives, attempt, max_drop)


def _tune_tflite(ev: _Evaluator, source: SourceModel, calib: Dataset, work: Path, max_drop: float,
                 progress: Progress) -> TuningResult:
    import torch

    from packager.tflite_convert import convert_int8_tflite

    progress.step("converting to full-int8 TFLite (litert-torch PT2E)")
    rows = calib.head(CALIB_ROWS_TFLITE)
    batches = [tuple(torch.from_numpy(rows.inputs[k][i:i + 1]) for k in source.input_names) for i in range(rows.n)]
    args = batches[0]

    def attempt(per_channel: bool) -> Trial:
        recipe = {"name": f"pt2e-static-{'perchannel' if per_channel else 'pertensor'}-s8",
                  "quantizer": "litert_torch PT2EQuantizer", "symmetric": True, "per_channel": per_channel,
                  "calibration_rows": rows.n}
        out = work / f"tflite-{'pc' if per_channel else 'pt'}.int8.tflite"
        t = ev.trial(recipe, out, "tflite",
                     lambda: convert_int8_tflite(source.module, args, batches, out, per_channel=per_channel))
        progress.detail(_trial_line(str(recipe["name"]), t, max_drop))
        return t

    return tune(True, lambda: [False], attempt, max_drop)


def _trial_line(name: str, t: Trial, max_drop: float) -> str:
    if t.error is not None:
        return f"{name}: failed ({t.error})"
    verdict = "pass" if t.passed(max_drop) else f"does not pay: {t.rejected}" if t.rejected else "miss"
    p50 = f", p50 {t.p50_ms:.3f} ms" if t.p50_ms is not None else ""
    return f"{name}: {t.bytes / 1024:.0f} KiB, metric {t.value:.4g}, drop {t.drop:.3g}{p50} [{verdict}]"


def _report_base(opts: BuildOptions, name: str, task: str, max_drop: float, source: SourceModel, calib: Dataset,
                 eval_ds: Dataset, pruning: dict[str, Any] | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "name": name, "version": opts.version, "task": task, "metric": metrics.METRIC_BY_TASK[task],
        "max_drop": max_drop, "source": {"kind": source.kind, "model": source.description,
                                         "sha256": source.sha256},
        "calibration": {"path": str(opts.calib), "sha256": calib.sha256, "samples": calib.n},
        "evaluation": {"path": str(opts.eval), "sha256": eval_ds.sha256, "samples": eval_ds.n},
        "threads": opts.threads, "host": _host(), "packager_version": packager_version,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if pruning is not None:
        report["pruning"] = pruning
    return report


def _parity(task: str, golden_outputs: np.ndarray) -> dict[str, Any]:
    """How closely the device's run of the golden inputs must match the packager's (same artifact)."""
    if task == "classification":
        return {"kind": "top1", "min_agreement": 0.97}
    if task == "embedding":
        return {"kind": "cosine", "min": 0.99}
    scale = float(np.std(golden_outputs)) or 1.0
    return {"kind": "tolerance", "atol": round(0.05 * scale, 6), "rtol": 0.05}


def _runtime_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("onnxruntime", "ai-edge-litert", "onnx", "torch", "litert-torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def _manifest(name: str, version: int, task: str, metric_name: str, fp32_value: float, max_drop: float,
              opts: BuildOptions, source: SourceModel, calib: Dataset, eval_ds: Dataset,
              inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], artifacts: list[Artifact],
              parity: dict[str, Any], report: dict[str, Any]) -> Manifest:
    from packager.onnx_quant import TARGETS

    worst_p95 = max(a.host_p95_ms for a in artifacts)
    # Devices are slower than the workstation: by default allow 10x the host p95 (at least 5 ms).
    budget = opts.latency_budget_ms if opts.latency_budget_ms is not None else max(5.0, round(10 * worst_p95, 2))
    biggest = max(r["bytes"] for r in report["artifacts"])
    versions = _runtime_versions()
    return Manifest(
        name=name, version=version, task=task,
        created=report["created"], inputs=tuple(inputs), outputs=tuple(outputs), artifacts=tuple(artifacts),
        metric=metric_name, fp32_metric_value=fp32_value, max_drop=max_drop,
        parity=parity,
        latency_budget_ms=budget,
        target={"arch": list(TARGETS[opts.target].arch), **TARGETS[opts.target].to_json(),
                # session + arena + the agent itself; a floor that keeps tiny models honest
                "min_ram_mb": int(64 + math.ceil(4 * biggest / 2**20)),
                "runtimes": {"onnxruntime": {"built_with": versions.get("onnxruntime")},
                             "litert": {"built_with": versions.get("ai-edge-litert")}}},
        preprocessing={"note": "inputs are fed as in the calibration/evaluation .npz files"},
        max_batch=opts.max_batch,
        provenance={"source_sha256": source.sha256, "source": source.description, "source_kind": source.kind,
                    "calibration_sha256": calib.sha256, "evaluation_sha256": eval_ds.sha256,
                    "packager_version": packager_version, "tools": versions,
                    "recipes": {a.format: a.recipe for a in artifacts},
                    "pruning": report.get("pruning")},
    )


def check_build_options(opts: BuildOptions) -> str:
    """Argument checks that need no model, run before any work so a typo costs no time. Returns the bundle name."""
    if opts.task not in metrics.METRIC_BY_TASK:
        raise InputError(f"--task must be one of {', '.join(metrics.METRIC_BY_TASK)}")
    from packager.onnx_quant import TARGETS

    if opts.target not in TARGETS:
        raise InputError(f"--target must be one of {', '.join(TARGETS)}, got {opts.target!r}")
    if not 0.0 <= opts.prune < 1.0:
        raise InputError("--prune must be a fraction in [0, 1)")
    if not 0.0 <= opts.prune_channels < 1.0:
        raise InputError("--prune-channels must be a fraction in [0, 1)")
    if opts.prune and opts.prune_channels:
        raise InputError("--prune and --prune-channels: choose one")
    if not 0 <= opts.finetune_epochs <= 1000 or not 0 <= opts.qat_epochs <= 1000:
        raise InputError("--finetune-epochs and --qat-epochs must be from 0 to 1000")
    if opts.max_drop is not None and not 0.0 <= opts.max_drop < math.inf:
        raise InputError("--max-drop must be a finite number >= 0")
    if not 1 <= opts.max_batch <= MAX_BATCH_LIMIT:
        raise InputError(f"--max-batch must be from 1 to {MAX_BATCH_LIMIT}, got {opts.max_batch}")
    if opts.threads < 1:
        raise InputError("--threads must be at least 1")
    if opts.labels is not None:
        if opts.task != "classification":
            raise InputError("--labels goes with --task classification")
        read_labels(opts.labels)
    if opts.preprocess is not None:
        parse_preprocess(opts.preprocess)
    if opts.version is not None and opts.version < 1:
        # the manifest reader (and so `packager inspect` and every device) refuses anything else
        raise InputError(f"--version must be a positive integer, got {opts.version}")
    name = opts.name or default_name(opts.model)
    if not valid_name(name):
        raise InputError(f"--name {name!r}: use lowercase letters, digits, '.', '_' and '-' (at most 64)")
    for label, path in (("--calib", opts.calib), ("--eval", opts.eval)):
        if not path.is_file():
            raise InputError(f"{label} {path}: no such file")
    _check_out_dir(opts.out_dir)
    if opts.version is not None:
        existing = opts.out_dir / bundle_filename(name, opts.version)
        if existing.exists():
            raise InputError(f"{existing} already exists: bundles are immutable, pick a new --version")
    return name


def _check_out_dir(out: Path) -> None:
    """Refuse an --out that cannot take the bundle (a file, /proc, read-only): probe it, leave nothing behind."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".edgeship-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    finally:
        for p in missing:  # deepest first; the build creates them again when it writes the bundle
            with contextlib.suppress(OSError):
                p.rmdir()


def _load_model(opts: BuildOptions) -> SourceModel:
    if opts.model.lower().endswith(".onnx") and Path(opts.model).is_file():
        from packager.onnx_export import load_onnx_source

        if opts.weights is not None:
            raise InputError("--weights goes with a package.module:factory MODEL, not a model file")
        return load_onnx_source(Path(opts.model))
    return load_source(opts.model, opts.weights)


def _run_eval(session: ModelSession, eval_ds: Dataset, path: Path) -> np.ndarray:
    try:
        out = session.run(eval_ds.inputs)[0]
    except ValueError as e:
        raise InputError(f"evaluation data {path}: {e}") from e
    if out.dtype.kind in "fc" and not np.isfinite(out).all():
        raise InputError(f"evaluation data {path}: the fp32 model's outputs have NaN or infinite values")
    return out


__all__ = ["BuildOptions", "BuildResult", "PackagerError", "Progress", "build", "check_build_options"]
