"""Measure `packager build` against the int8 targets on this machine and write one JSON file with every figure.

    python benchmarks/packager_bench.py [--out benchmarks/results/packager.json]
                                        [--only digits,midcnn,bert,prune,distill,qat]
                                        [--runs N] [--rounds R]

Every figure comes from the real pipeline (`packager.build.build()`), so it is what `packager build` users get:

- digits: the examples/digits CNN, trained here; int8 ONNX and TFLite bytes vs fp32 and top-1 drop.
- midcnn: examples/midcnn.py's MidResNet (>= 1M parameters) trained briefly on digits upscaled to 32x32; sizes,
  top-1 drop and batch-1 latency. Besides the build's own timing, the fp32 ONNX (exported the way the build
  exports it), the bundle's int8 ONNX and its int8 TFLite are timed again in interleaved rounds (the models take
  turns, so load from other tenants of a shared VM hits all three alike), with 1 and 2 runtime threads.
- bert: examples/bert_encoder.py's tiny BERT (random init, task embedding); int8 bytes vs fp32 and the build's
  mean output cosine to fp32, plus the minimum per-row cosine computed here from the extracted artifacts.

- prune: the midcnn as `examples.midcnn:MidResNet` + state_dict, built int8 ONNX without and with
  `--prune-channels 0.5` (fine-tune 10 epochs on the calibration data); the two int8 ONNX artifacts timed in
  interleaved rounds (1 thread). Target: pruned int8 <= 0.6x the int8-only latency, top-1 drop <= 1.0 point.
- distill: `packager distill` of the digits CNN into examples/digits/student.py. Target: student <= 1/4 of the
  teacher's parameters, within 1.5 points of its top-1.
- qat: the QAT recipe (packager/qat.py) on the digits CNN beside the build's post-training int8 ONNX.

Everything is trained and built in a temporary directory; nothing needs the network. Progress goes to stderr,
the tables and one PASS/MISS line per target to stdout. The exit status is 0 even when a target is missed: this is
a measurement, not a test (2 only for bad arguments).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/packager_bench.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks._common import Target, load_average, machine_info, write_json  # noqa: E402 - needs REPO on sys.path

log = logging.getLogger("packager_bench")

MODELS = ("digits", "midcnn", "bert", "prune", "distill", "qat")
SIZE_RATIO_MAX = 0.27
TOP1_DROP_MAX = 1.0  # percentage points
LATENCY_RATIO_MAX = 0.75
COSINE_MIN = 0.99
DEFAULT_RUNS = 200
DEFAULT_ROUNDS = 5
WARMUP_RUNS = 50
BERT_SEQ_LEN = 32
BERT_CALIB_ROWS = 128
BERT_EVAL_ROWS = 128
MAX_EXPORT_BATCH = 1024
PRUNE_AMOUNT = 0.5  # --prune-channels on the midcnn
PRUNE_FINETUNE_EPOCHS = 10
PRUNE_LATENCY_RATIO_MAX = 0.6  # pruned int8 / unpruned int8 ONNX latency, batch 1
DISTILL_EPOCHS = 40
DISTILL_PARAMS_RATIO_MAX = 0.25
DISTILL_DROP_MAX = 1.5  # top-1 points, student vs teacher
QAT_EPOCHS = 3


# --------------------------------------------------------------------------------------------- targets


# --------------------------------------------------------------------------------------------- helpers


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, allow_pickle=False, **arrays)
    return path


def _export_pt2(model: Any, args: tuple[Any, ...], path: Path) -> Path:
    """`torch.export.save` the eval-mode model with a dynamic batch axis on every input."""
    import torch

    model.eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    program = torch.export.export(model, args, dynamic_shapes=tuple({0: batch} for _ in args))
    torch.export.save(program, str(path))
    return path


def _params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def run_build(name: str, model: Path | str, calib: Path, eval_: Path, out_dir: Path, task: str,
              runs: int, **options: Any) -> tuple[dict[str, Any], Path, float]:
    """`packager build` through its Python API with threads=1; returns the report, the bundle and seconds taken."""
    from packager.build import BuildOptions, Progress, build

    log.info("[%s] packager build (threads=1) %s", name, options or "")
    t0 = time.perf_counter()
    result = build(BuildOptions(model=str(model), calib=calib, eval=eval_, out_dir=out_dir, name=name, version=1,
                                task=task, threads=1, latency_runs=runs, **options), Progress(0, stream=sys.stderr))
    return result.report, result.bundle, time.perf_counter() - t0


def summarize_build(report: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The figures a user sees in the build report, plus each int8 artifact's size as a fraction of fp32."""
    fp32 = report["fp32"]
    out: dict[str, Any] = {
        "build_seconds": round(seconds, 2), "metric": report["metric"], "max_drop": report["max_drop"],
        "eval_samples": report["evaluation"]["samples"], "calib_samples": report["calibration"]["samples"],
        "fp32": {k: fp32[k] for k in ("bytes", "zstd_bytes", "value", "p50_ms", "p95_ms")},
        "int8": {},
    }
    for a in report["artifacts"]:
        out["int8"][a["format"]] = {
            "bytes": a["bytes"], "zstd_bytes": a["zstd_bytes"], "size_ratio": a["bytes"] / fp32["bytes"],
            "value": a["value"], "drop": a["drop"], "p50_ms": a["p50_ms"], "p95_ms": a["p95_ms"],
            "latency_ratio_p50": a["p50_ms"] / fp32["p50_ms"], "recipe": a["recipe"]["name"],
            "trials": [{"recipe": t["recipe"].get("name"), "bytes": t["bytes"], "value": _finite(t["value"]),
                        "drop": _finite(t["drop"]), "passed": t["passed"], "error": t.get("error")}
                       for t in a["trials"]],
        }
    return out


def _finite(v: float | None) -> float | None:
    """JSON has no NaN or infinity: a recipe that failed to convert has neither value nor drop."""
    return v if v is not None and np.isfinite(v) else None


def extract(bundle: Path, dest: Path) -> tuple[Path, Any]:
    """Unpack the bundle exactly as a device does; returns the directory and the manifest."""
    from agent.bundle import verify_bundle

    verified = verify_bundle(bundle, dest=dest)
    return dest, verified.manifest


def export_fp32_like_build(model_path: Path, feeds: dict[str, np.ndarray], out: Path) -> Path:
    """The fp32 ONNX the build compares against, exported by the build's own code path."""
    from packager.onnx_export import export_onnx
    from packager.torch_model import example_args, load_source

    source = load_source(str(model_path), None)
    export_onnx(source.module, example_args(source, feeds), source.input_names, out)
    return out


def _size_targets(model: str, summary: dict[str, Any], formats: Sequence[str], note: dict[str, str]) -> list[Target]:
    return [Target(f"{model}.{fmt}.size_ratio", f"{model} int8 {fmt} bytes / fp32 ONNX bytes",
                   summary["int8"][fmt]["size_ratio"], SIZE_RATIO_MAX, "<=", "x", note.get(fmt, ""))
            for fmt in formats if fmt in summary["int8"]]


def _drop_targets(model: str, summary: dict[str, Any]) -> list[Target]:
    return [Target(f"{model}.{fmt}.top1_drop", f"{model} int8 {fmt} top-1 drop vs fp32",
                   a["drop"], TOP1_DROP_MAX, "<=", "points") for fmt, a in summary["int8"].items()]


# --------------------------------------------------------------------------------------------- timing


def interleaved_latency(sessions: dict[str, Any], feed: dict[str, np.ndarray], rounds: int,
                        runs: int) -> dict[str, Any]:
    """Batch-1 latency of several sessions measured in alternating rounds.

    After WARMUP_RUNS per model, each round times `runs` single-row runs of every model in turn (the order
    rotates each round). Per model: the median of each round, then the median and p95 of those per-round medians,
    and the p50/p95 over every run. Ratios to the first model are taken per round (same round = same machine
    load) and summarized by their median.
    """
    names = list(sessions)
    for name in names:
        for _ in range(WARMUP_RUNS):
            sessions[name].run(feed)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            run = sessions[name].run
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                run(feed)
                times.append(time.perf_counter() - t0)
            ms = np.asarray(times) * 1e3
            per_round[name].append(float(np.median(ms)))
            samples[name].extend(ms.tolist())
    base = names[0]
    out: dict[str, Any] = {"rounds": rounds, "runs_per_round": runs, "warmup_runs": WARMUP_RUNS, "baseline": base,
                           "models": {}}
    for name in names:
        medians = np.asarray(per_round[name])
        paired = np.asarray(per_round[name]) / np.asarray(per_round[base])
        out["models"][name] = {
            "round_medians_ms": [round(x, 4) for x in per_round[name]],
            "median_of_round_medians_ms": float(np.median(medians)),
            "p95_of_round_medians_ms": float(np.percentile(medians, 95)),
            "all_runs_p50_ms": float(np.percentile(samples[name], 50)),
            "all_runs_p95_ms": float(np.percentile(samples[name], 95)),
            "ratio_to_baseline": float(np.median(medians) / np.median(per_round[base])),
            "paired_round_ratio_to_baseline": float(np.median(paired)),
        }
    return out


# --------------------------------------------------------------------------------------------- models


def bench_digits(work: Path, runs: int, rounds: int) -> tuple[dict[str, Any], list[Target]]:
    del rounds  # the digits target is about size and accuracy; its latency comes from the build alone

    log.info("[digits] training examples/digits DigitsCNN")
    t0 = time.perf_counter()
    paths = _trained_digits(work)
    train_s = time.perf_counter() - t0
    report, _bundle, seconds = run_build("digits", paths["exported_program"], paths["calib"], paths["eval"],
                                         work / "digits" / "bundles", "classification", runs)
    summary = summarize_build(report, seconds)
    summary["train_seconds"] = round(train_s, 2)
    from examples.digits.model import DigitsCNN, count_parameters

    summary["parameters"] = count_parameters(DigitsCNN())
    targets = _size_targets("digits", summary, ("onnx", "tflite"), {}) + _drop_targets("digits", summary)
    return summary, targets


def bench_midcnn(work: Path, runs: int, rounds: int) -> tuple[dict[str, Any], list[Target]]:
    import torch

    from agent.runtime import open_session

    d = work / "midcnn"
    d.mkdir(parents=True)
    log.info("[midcnn] training examples/midcnn MidResNet on 32x32 digits")
    t0 = time.perf_counter()
    model, splits = _trained_midcnn()
    train_s = time.perf_counter() - t0
    x_eval, y_eval = splits["eval"]
    pt2 = _export_pt2(model, (torch.from_numpy(x_eval[:2]),), d / "midcnn.pt2")
    calib = _save_npz(d / "calib.npz", x=splits["calib"][0], y=splits["calib"][1])
    eval_ = _save_npz(d / "eval.npz", x=x_eval, y=y_eval)
    report, bundle, seconds = run_build("midcnn", pt2, calib, eval_, d / "bundles", "classification", runs)
    summary = summarize_build(report, seconds)
    summary["train_seconds"] = round(train_s, 2)
    summary["parameters"] = _params(model)

    log.info("[midcnn] interleaved latency: fp32 ONNX vs int8 ONNX vs int8 TFLite, %d rounds x %d runs",
             rounds, runs)
    files, manifest = extract(bundle, d / "extracted")
    fp32 = export_fp32_like_build(pt2, {"x": x_eval[:1]}, d / "model.fp32.onnx")
    names = [s.name for s in manifest.inputs]
    feed = {"x": np.ascontiguousarray(x_eval[:1])}
    interleaved: dict[str, Any] = {}
    for threads in (1, 2):
        sessions = {
            "fp32_onnx": open_session(fp32, "onnx", threads=threads),
            "int8_onnx": open_session(files / "model.int8.onnx", "onnx", threads=threads),
            "int8_tflite": open_session(files / "model.int8.tflite", "tflite", threads=threads, input_names=names),
        }
        interleaved[f"threads_{threads}"] = interleaved_latency(sessions, feed, rounds, runs)
        m = interleaved[f"threads_{threads}"]["models"]
        log.info("[midcnn] threads=%d: fp32 %.3f ms, int8 onnx %.3f ms, int8 tflite %.3f ms", threads,
                 m["fp32_onnx"]["median_of_round_medians_ms"], m["int8_onnx"]["median_of_round_medians_ms"],
                 m["int8_tflite"]["median_of_round_medians_ms"])
    summary["interleaved_latency"] = interleaved

    t1 = interleaved["threads_1"]["models"]
    t2 = interleaved["threads_2"]["models"]
    targets = [
        Target("midcnn.onnx.latency_ratio_t1", "midcnn int8/fp32 ONNX median latency, batch 1, 1 thread "
               "(interleaved rounds)", t1["int8_onnx"]["ratio_to_baseline"], LATENCY_RATIO_MAX, "<=", "x"),
        Target("midcnn.onnx.latency_ratio_t1_build", "same, from the build's own timing (p50)",
               summary["int8"]["onnx"]["latency_ratio_p50"], LATENCY_RATIO_MAX, "<=", "x"),
        Target("midcnn.onnx.latency_ratio_t2", "same with 2 threads (interleaved rounds; reported, not the headline)",
               t2["int8_onnx"]["ratio_to_baseline"], LATENCY_RATIO_MAX, "<=", "x"),
        *_drop_targets("midcnn", summary),
    ]
    return summary, targets


_TRAINED: dict[str, Any] = {}


def _trained_midcnn() -> tuple[Any, dict[str, Any]]:
    """examples/midcnn.py's MidResNet trained once per run (the midcnn and prune benchmarks share it)."""
    if "midcnn" not in _TRAINED:
        from examples.midcnn import train_midcnn

        _TRAINED["midcnn"] = train_midcnn()
    model, splits = _TRAINED["midcnn"]
    return model, splits


def _trained_digits(work: Path) -> dict[str, Path]:
    """The digits CNN trained once per run (the digits and distill benchmarks share it)."""
    if "digits" not in _TRAINED:
        from examples.digits.train import train_digits

        _TRAINED["digits"] = train_digits(work / "digits")
    paths: dict[str, Path] = _TRAINED["digits"]
    return paths


def bench_prune(work: Path, runs: int, rounds: int) -> tuple[dict[str, Any], list[Target]]:
    """--prune-channels on the midcnn: int8 of the pruned model vs int8 of the unpruned one (both ONNX)."""
    import torch

    from agent.runtime import open_session

    d = work / "prune"
    d.mkdir(parents=True)
    log.info("[prune] examples/midcnn MidResNet as package.module:factory + state_dict")
    model, splits = _trained_midcnn()
    weights = d / "midcnn_state_dict.pt"
    torch.save(model.state_dict(), weights)
    x_eval, y_eval = splits["eval"]
    calib = _save_npz(d / "calib.npz", x=splits["calib"][0], y=splits["calib"][1])
    eval_ = _save_npz(d / "eval.npz", x=x_eval, y=y_eval)
    common = {"weights": weights, "formats": ("onnx",)}
    base, base_bundle, base_s = run_build("midcnn-int8", "examples.midcnn:MidResNet", calib, eval_, d / "base",
                                          "classification", runs, **common)
    pruned, pruned_bundle, pruned_s = run_build(
        "midcnn-pruned", "examples.midcnn:MidResNet", calib, eval_, d / "pruned", "classification", runs,
        prune_channels=PRUNE_AMOUNT, finetune_epochs=PRUNE_FINETUNE_EPOCHS, **common)
    base_files, _ = extract(base_bundle, d / "base-x")
    pruned_files, _ = extract(pruned_bundle, d / "pruned-x")
    feed = {"x": np.ascontiguousarray(x_eval[:1])}
    log.info("[prune] interleaved latency: unpruned int8 vs pruned int8 ONNX, %d rounds x %d runs", rounds, runs)
    sessions = {"int8_onnx": open_session(base_files / "model.int8.onnx", "onnx", threads=1),
                "pruned_int8_onnx": open_session(pruned_files / "model.int8.onnx", "onnx", threads=1)}
    timing = interleaved_latency(sessions, feed, rounds, runs)
    p = pruned["pruning"]
    b_art, p_art = base["artifacts"][0], pruned["artifacts"][0]
    summary = {
        "amount": PRUNE_AMOUNT, "finetune_epochs": PRUNE_FINETUNE_EPOCHS,
        "build_seconds": {"unpruned": round(base_s, 2), "pruned": round(pruned_s, 2)},
        "fp32": {"parameters": p["parameters_before"], "bytes": pruned["fp32"]["bytes"],
                 "value": pruned["fp32"]["value"], "p50_ms": pruned["fp32"]["p50_ms"]},
        "fp32_pruned": {"parameters": p["parameters_after"], "bytes": p["bytes"], "value": p["value_after"],
                        "drop": p["drop"], "p50_ms": p["p50_ms"], "finetune": p["finetune"]},
        "int8": {k: {"bytes": a["bytes"], "value": a["value"], "drop": a["drop"], "p50_ms": a["p50_ms"],
                     "recipe": a["recipe"]["name"]} for k, a in (("unpruned", b_art), ("pruned", p_art))},
        "interleaved_latency": {"threads_1": timing},
    }
    ratio = timing["models"]["pruned_int8_onnx"]["ratio_to_baseline"]
    targets = [
        Target("prune.latency_ratio_t1", f"midcnn channel-pruned ({PRUNE_AMOUNT:g}) int8 / int8-only ONNX median "
               "latency, batch 1, 1 thread (interleaved rounds)", ratio, PRUNE_LATENCY_RATIO_MAX, "<=", "x"),
        Target("prune.latency_ratio_t1_build", "same, from the two builds' own timing (p50)",
               p_art["p50_ms"] / b_art["p50_ms"], PRUNE_LATENCY_RATIO_MAX, "<=", "x"),
        Target("prune.top1_drop", "midcnn pruned int8 ONNX top-1 drop vs the unpruned fp32 model", p_art["drop"],
               TOP1_DROP_MAX, "<=", "points"),
    ]
    return summary, targets


def bench_distill(work: Path, runs: int, rounds: int) -> tuple[dict[str, Any], list[Target]]:
    """`packager distill`: the digits CNN teaches examples/digits/student.py's DigitsStudent."""
    del rounds
    from examples.digits.data import load_splits
    from packager.distill import DistillOptions, distill

    paths = _trained_digits(work)
    d = work / "distill"
    d.mkdir(parents=True)
    x_train, y_train = load_splits(0)["train"]
    train = _save_npz(d / "train.npz", x=x_train, y=y_train)
    log.info("[distill] DigitsCNN -> DigitsStudent, %d epochs on %d samples", DISTILL_EPOCHS, len(y_train))
    t0 = time.perf_counter()
    result = distill(DistillOptions(teacher=str(paths["exported_program"]),
                                    student="examples.digits.student:DigitsStudent", data=train,
                                    eval=paths["eval"], out=d / "student.pt2", epochs=DISTILL_EPOCHS,
                                    latency_runs=runs), lambda m: log.info("[distill] %s", m))
    seconds = time.perf_counter() - t0
    r = result.report
    teacher, student = r["teacher"], r["student"]
    summary = {"seconds": round(seconds, 2), "teacher": teacher, "student": student, "training": r["training"],
               "evaluation": r["evaluation"],
               "parameter_ratio": student["parameters"] / teacher["parameters"],
               "bytes_ratio": student["onnx_bytes"] / teacher["onnx_bytes"],
               "latency_ratio_p50": student["p50_ms"] / teacher["p50_ms"]}
    targets = [
        Target("distill.parameter_ratio", "digits student / teacher parameters", summary["parameter_ratio"],
               DISTILL_PARAMS_RATIO_MAX, "<=", "x"),
        Target("distill.top1_drop", "digits student top-1 drop vs the teacher", student["drop"], DISTILL_DROP_MAX,
               "<=", "points"),
    ]
    return summary, targets


def bench_qat(work: Path, runs: int, rounds: int) -> tuple[dict[str, Any], list[Target]]:
    """The QAT recipe (packager/qat.py) on the digits CNN beside the post-training int8 ONNX the build ships.

    The build tries QAT only when every post-training recipe misses the gate, which none does on digits; this
    measures the QAT artifact directly, the way the build makes it, to show what it costs and gives.
    """
    del rounds
    from agent.runtime import open_session
    from packager.qat import qat_onnx
    from packager.torch_model import load_source, run_torch

    paths = _trained_digits(work)
    d = work / "qat"
    d.mkdir(parents=True)
    report, _bundle, _s = run_build("digits-ptq", paths["exported_program"], paths["calib"], paths["eval"],
                                    d / "ptq", "classification", runs, formats=("onnx",))
    calib, ev = np.load(paths["calib"]), np.load(paths["eval"])
    src = load_source(str(paths["exported_program"]), None)
    feeds = {"x": calib["x"]}
    log.info("[qat] PT2E QAT of the digits CNN, %d epochs on %d labelled calibration samples", QAT_EPOCHS,
             len(calib["y"]))
    t0 = time.perf_counter()
    fitted = qat_onnx(src.module, src.input_names, feeds, run_torch(src, feeds, batch=256)[0], calib["y"],
                      "classification", QAT_EPOCHS, d / "qat.onnx")
    seconds = time.perf_counter() - t0
    session = open_session(d / "qat.onnx", "onnx", threads=1)
    top1 = 100.0 * float((session.run({"x": ev["x"]})[0].argmax(1) == ev["y"]).mean())
    one = {"x": np.ascontiguousarray(ev["x"][:1])}
    for _ in range(WARMUP_RUNS):
        session.run(one)
    times = []
    for _ in range(runs):
        t1 = time.perf_counter()
        session.run(one)
        times.append(time.perf_counter() - t1)
    fp32, ptq = report["fp32"], report["artifacts"][0]
    summary = {
        "epochs": QAT_EPOCHS, "seconds": round(seconds, 2), "final_loss": fitted.final_loss,
        "fp32": {"bytes": fp32["bytes"], "value": fp32["value"], "p50_ms": fp32["p50_ms"]},
        "ptq_onnx": {"bytes": ptq["bytes"], "value": ptq["value"], "drop": ptq["drop"], "p50_ms": ptq["p50_ms"],
                     "recipe": ptq["recipe"]["name"]},
        "qat_onnx": {"bytes": (d / "qat.onnx").stat().st_size, "value": top1, "drop": fp32["value"] - top1,
                     "p50_ms": float(np.median(times) * 1e3)},
    }
    targets = [Target("qat.top1_drop", "digits QAT int8 ONNX top-1 drop vs fp32 (reported; not an issue target)",
                      summary["qat_onnx"]["drop"], TOP1_DROP_MAX, "<=", "points")]
    return summary, targets


def bench_bert(work: Path, runs: int, rounds: int) -> tuple[dict[str, Any], list[Target]]:
    del rounds
    import torch

    from agent.runtime import open_session
    from examples.bert_encoder import NUM_LAYERS, make_tiny_bert, random_token_batch

    d = work / "bert"
    d.mkdir(parents=True)
    log.info("[bert] tiny BERT encoder (%d layers, random init) -> .pt2, random token batches", NUM_LAYERS)
    model = make_tiny_bert(seed=0)
    example = random_token_batch(2, BERT_SEQ_LEN, seed=0)
    pt2 = _export_pt2(model, tuple(torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask")),
                      d / "bert.pt2")
    calib = _save_npz(d / "calib.npz", **random_token_batch(BERT_CALIB_ROWS, BERT_SEQ_LEN, seed=1))
    eval_feeds = random_token_batch(BERT_EVAL_ROWS, BERT_SEQ_LEN, seed=2)
    eval_ = _save_npz(d / "eval.npz", **eval_feeds)
    report, bundle, seconds = run_build("bert", pt2, calib, eval_, d / "bundles", "embedding", runs)
    summary = summarize_build(report, seconds)
    summary["parameters"] = _params(model)
    summary["layers"] = NUM_LAYERS
    summary["seq_len"] = BERT_SEQ_LEN
    emb = model.token_embedding.weight
    summary["token_embedding_fp32_bytes"] = int(emb.numel() * emb.element_size())

    log.info("[bert] per-row cosine of the extracted int8 artifacts vs the fp32 ONNX")
    files, manifest = extract(bundle, d / "extracted")
    fp32 = export_fp32_like_build(pt2, {k: v[:1] for k, v in eval_feeds.items()}, d / "model.fp32.onnx")
    names = [s.name for s in manifest.inputs]
    ref = open_session(fp32, "onnx").run(eval_feeds)[0]
    for fmt in summary["int8"]:
        out = open_session(files / f"model.int8.{fmt}", fmt, input_names=names).run(eval_feeds)[0]
        cos = _row_cosine(out, ref)
        summary["int8"][fmt].update(mean_row_cosine=float(cos.mean()), min_row_cosine=float(cos.min()),
                                    p05_row_cosine=float(np.percentile(cos, 5)))

    if "tflite" in summary["int8"]:
        float_table = _float_constant_bytes(files / "model.int8.tflite", tuple(emb.shape))
        # 0 when the converter stored the token embedding int8 (what packager/tflite_convert.py does)
        summary["int8"]["tflite"]["float32_embedding_table_bytes"] = float_table
        float_left = float_table
    else:
        float_left = 0
    notes = {"tflite": f"the TFLite file still holds the token embedding table in float32 ({float_left} bytes)"} \
        if float_left else {}
    targets = [
        *_size_targets("bert", summary, ("onnx", "tflite"), notes),
        *[Target(f"bert.{fmt}.cosine", f"bert int8 {fmt} mean output cosine to fp32 (build metric)", a["value"],
                 COSINE_MIN, ">=", "") for fmt, a in summary["int8"].items()],
        *[Target(f"bert.{fmt}.min_row_cosine", f"bert int8 {fmt} minimum per-row cosine to fp32 ONNX",
                 a["min_row_cosine"], COSINE_MIN, ">=", "") for fmt, a in summary["int8"].items()],
    ]
    return summary, targets


def _float_constant_bytes(tflite: Path, shape: tuple[int, ...]) -> int:
    """Bytes of float32 tensors of exactly `shape` in a .tflite file (the embedding table left in float)."""
    from ai_edge_litert.interpreter import Interpreter

    total = 0
    for t in Interpreter(model_path=str(tflite)).get_tensor_details():
        if tuple(int(d) for d in t["shape"]) == shape and np.dtype(t["dtype"]) == np.float32:
            total += int(np.prod(shape)) * 4
    return total


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.sum(a2 * b2, axis=1) / np.maximum(np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1), 1e-12)


BENCHES: dict[str, Callable[[Path, int, int], tuple[dict[str, Any], list[Target]]]] = {
    "digits": bench_digits, "midcnn": bench_midcnn, "bert": bench_bert, "prune": bench_prune,
    "distill": bench_distill, "qat": bench_qat,
}


# --------------------------------------------------------------------------------------------- output


def _kib(n: float) -> str:
    return f"{n / 1024:,.0f} KiB"


def model_table(name: str, s: dict[str, Any]) -> str:
    metric = s["metric"]
    value = (lambda v: f"{v:.2f}%") if metric == "top1" else (lambda v: f"{v:.5f}")
    rows = [("artifact", "bytes", "x fp32", metric, "drop", "p50 ms", "p95 ms", "recipe")]
    f = s["fp32"]
    rows.append(("fp32 onnx", _kib(f["bytes"]), "1.000", value(f["value"]), "-", f"{f['p50_ms']:.3f}",
                 f"{f['p95_ms']:.3f}", "-"))
    for fmt, a in s["int8"].items():
        rows.append((f"int8 {fmt}", _kib(a["bytes"]), f"{a['size_ratio']:.3f}", value(a["value"]),
                     f"{a['drop']:.3g}", f"{a['p50_ms']:.3f}", f"{a['p95_ms']:.3f}", a["recipe"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"== {name}: {s.get('parameters', 0):,} parameters, build {s['build_seconds']:.0f} s, "
             f"{s['eval_samples']} eval samples (build timing: batch 1, 1 thread)"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for fmt, a in s["int8"].items():
        if "min_row_cosine" in a:
            lines.append(f"  int8 {fmt} vs fp32 ONNX per-row cosine: mean {a['mean_row_cosine']:.5f}, "
                         f"p5 {a['p05_row_cosine']:.5f}, min {a['min_row_cosine']:.5f}")
    for key, t in s.get("interleaved_latency", {}).items():
        lines.append(f"  interleaved timing, {key.replace('_', '=')} ({t['rounds']} rounds x {t['runs_per_round']} "
                     "runs): median / p95 of per-round medians, ratio to fp32")
        for m, v in t["models"].items():
            lines.append(f"    {m:<12} {v['median_of_round_medians_ms']:.3f} / {v['p95_of_round_medians_ms']:.3f} ms"
                         f"  {v['ratio_to_baseline']:.3f}x (median of per-round ratios "
                         f"{v['paired_round_ratio_to_baseline']:.3f}x)")
    return "\n".join(lines)


def prune_table(name: str, s: dict[str, Any]) -> str:
    rows = [("model", "parameters", "bytes", "top1", "drop", "p50 ms (build)")]
    f, fp = s["fp32"], s["fp32_pruned"]
    rows.append(("fp32", f"{f['parameters']:,}", _kib(f["bytes"]), f"{f['value']:.2f}%", "-", f"{f['p50_ms']:.3f}"))
    rows.append((f"fp32 pruned {s['amount']:g}", f"{fp['parameters']:,}", _kib(fp["bytes"]), f"{fp['value']:.2f}%",
                 f"{fp['drop']:.3g}", f"{fp['p50_ms']:.3f}"))
    for key, a in s["int8"].items():
        rows.append((f"int8 {key}", "", _kib(a["bytes"]), f"{a['value']:.2f}%", f"{a['drop']:.3g}",
                     f"{a['p50_ms']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"== {name}: midcnn --prune-channels {s['amount']:g}, fine-tune {s['finetune_epochs']} epochs on the "
             "calibration data; drops from the unpruned fp32 model"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    t = s["interleaved_latency"]["threads_1"]
    lines.append(f"  interleaved timing, threads=1 ({t['rounds']} rounds x {t['runs_per_round']} runs): median of "
                 "per-round medians, ratio to unpruned int8")
    for m, v in t["models"].items():
        lines.append(f"    {m:<17} {v['median_of_round_medians_ms']:.3f} ms  {v['ratio_to_baseline']:.3f}x")
    return "\n".join(lines)


def distill_table(name: str, s: dict[str, Any]) -> str:
    t, st = s["teacher"], s["student"]
    lines = [f"== {name}: {st['model']} taught by {Path(t['model']).name}, {s['training']['epochs']} epochs "
             f"(T={s['training']['temperature']:g}, alpha={s['training']['alpha']:g}), {s['seconds']:.0f} s"]
    for role, m in (("teacher", t), ("student", st)):
        lines.append(f"  {role:<8} {m['parameters']:>9,} parameters  {_kib(m['onnx_bytes']):>9} fp32 ONNX  "
                     f"top1 {m['value']:.2f}%  p50 {m['p50_ms']:.3f} ms")
    lines.append(f"  student/teacher: parameters {s['parameter_ratio']:.3f}x, bytes {s['bytes_ratio']:.3f}x, "
                 f"p50 {s['latency_ratio_p50']:.3f}x, top-1 drop {st['drop']:.3g} points")
    return "\n".join(lines)


def qat_table(name: str, s: dict[str, Any]) -> str:
    lines = [f"== {name}: digits CNN, PT2E QAT {s['epochs']} epochs ({s['seconds']:.0f} s) vs the build's "
             "post-training int8 ONNX"]
    for key in ("fp32", "ptq_onnx", "qat_onnx"):
        m = s[key]
        drop = f"drop {m['drop']:.3g}" if "drop" in m else ""
        lines.append(f"  {key:<9} {m['bytes']:>9,} bytes  top1 {m['value']:.2f}%  p50 {m['p50_ms']:.3f} ms  {drop}")
    return "\n".join(lines)


TABLES: dict[str, Callable[[str, dict[str, Any]], str]] = {"prune": prune_table, "distill": distill_table,
                                                            "qat": qat_table}


def _parse_only(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(MODELS)}, got {text!r}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packager_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "packager.json",
                        help="JSON result file (default benchmarks/results/packager.json)")
    parser.add_argument("--only", type=_parse_only, default=MODELS, help="comma-separated subset of "
                        f"{','.join(MODELS)} (default all)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"timed runs per latency measurement and per interleaved round (default {DEFAULT_RUNS})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"interleaved timing rounds for midcnn (default {DEFAULT_ROUNDS})")
    args = parser.parse_args(argv)
    if args.runs < 20 or args.rounds < 1:
        parser.error("--runs must be >= 20 and --rounds >= 1")

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("examples").setLevel(logging.INFO)

    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    load_start = load_average()
    machine = machine_info()
    log.info("machine: %s, %s cores, %s; load average %s", machine["cpu"], machine["cores"],
             machine["int8_summary"], load_start)

    models: dict[str, Any] = {}
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as td:
        for name in args.only:
            summary, got = BENCHES[name](Path(td), args.runs, args.rounds)
            models[name] = summary
            targets += got
            print(TABLES.get(name, model_table)(name, summary) + "\n", flush=True)

    load_end = load_average()
    result = {
        "benchmark": "packager", "created": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/packager_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "duration_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine, "load_average": {"start": load_start, "end": load_end},
        "settings": {"runs": args.runs, "rounds": args.rounds, "warmup_runs": WARMUP_RUNS, "build_threads": 1,
                     "models": list(args.only)},
        "targets": [t.to_json() for t in targets],
        "models": models,
    }
    write_json(args.out, result)
    print("== targets")
    for t in targets:
        print(t.line())
    missed = [t.id for t in targets if not t.passed]
    print(f"{len(targets) - len(missed)}/{len(targets)} targets met"
          + (f"; MISSED: {', '.join(missed)}" if missed else ""))
    print(f"load average start {load_start}, end {load_end}; {result['duration_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
