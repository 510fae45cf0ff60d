"""Knowledge distillation: train a model on another model's outputs, with the labels when there are any.

Used three ways: `packager distill` trains a smaller student on a teacher's soft targets; `--prune-channels`
fine-tunes the pruned model on the unpruned one's outputs; the QAT fallback fine-tunes the fake-quantized model
on the fp32 model's outputs. The teacher's outputs are computed once (any model kind the packager loads, ONNX
included), so training only ever runs the student.

Losses (Hinton et al. 2015 for classification):
- classification: T² · KL(softmax(teacher/T) ‖ softmax(student/T)); with labels, alpha · that + (1 − alpha) · CE.
- regression: MSE to the teacher's outputs; with labels, alpha · that + (1 − alpha) · MSE to the labels.
- embedding: 1 − cosine to the teacher's outputs.

A student given as `package.module:factory` is imported and called: that runs the user's own code, on the user's
workstation, exactly as `packager build package.module:factory` does. The teacher file goes through the same
checked loaders as `packager build` (`packager/pickle_scan.py`, `packager/pt2_check.py`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from packager import metrics
from packager.errors import AccuracyGateError, ConversionError, InputError

log = logging.getLogger(__name__)

RECORD_NAME = "edgeship_distillation.json"  # the .pt2's extra/ entry `packager build` reads back
MAX_RECORD_BYTES = 64 * 1024
MAX_EXPORT_BATCH = 1024
HOLDOUT_FRACTION = 0.2
MIN_HOLDOUT = 32
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # as packager.torch_model reads MODEL


@dataclass(frozen=True)
class FitConfig:
    task: str
    epochs: int
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the teacher's targets when labels are given (1.0 without labels)
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class FitResult:
    epochs: int
    samples: int
    steps: int
    seconds: float
    first_loss: float
    final_loss: float
    labels: bool
    temperature: float
    alpha: float
    lr: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_fit_config(cfg: FitConfig) -> None:
    if cfg.task not in metrics.METRIC_BY_TASK:
        raise InputError(f"--task must be one of {', '.join(metrics.METRIC_BY_TASK)}")
    if not 0 <= cfg.epochs <= 10_000:
        raise InputError(f"epochs must be from 0 to 10000, got {cfg.epochs}")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise InputError(f"--temperature must be a positive number, got {cfg.temperature:g}")
    if not (math.isfinite(cfg.alpha) and 0.0 <= cfg.alpha <= 1.0):
        raise InputError(f"--alpha must be in [0, 1], got {cfg.alpha:g}")
    if not (math.isfinite(cfg.lr) and 0 < cfg.lr < 1):
        raise InputError(f"--lr must be in (0, 1), got {cfg.lr:g}")
    if not 1 <= cfg.batch_size <= 65536:
        raise InputError(f"--batch-size must be from 1 to 65536, got {cfg.batch_size}")


def _loss(task: str, student: Any, teacher: Any, labels: Any, cfg: FitConfig) -> Any:
    import torch.nn.functional as F

    s = student.reshape(len(student), -1)
    t = teacher.reshape(len(teacher), -1)
    if task == "classification":
        temp = cfg.temperature
        soft = F.kl_div(F.log_softmax(s / temp, dim=1), F.softmax(t / temp, dim=1), reduction="batchmean")
        soft = soft * temp * temp
        if labels is None:
            return soft
        return cfg.alpha * soft + (1.0 - cfg.alpha) * F.cross_entropy(s, labels)
    if task == "regression":
        soft = F.mse_loss(s, t)
        if labels is None:
            return soft
        return cfg.alpha * soft + (1.0 - cfg.alpha) * F.mse_loss(s, labels.reshape(s.shape).to(s.dtype))
    cos = F.cosine_similarity(s, t, dim=1, eps=1e-8)
    return (1.0 - cos).mean()


def fit(module: Any, inputs: Sequence[np.ndarray], teacher_out: np.ndarray, labels: np.ndarray | None,
        cfg: FitConfig, set_train: Callable[[bool], None] | None = None) -> FitResult:
    """Train `module` in place for `cfg.epochs` on (inputs -> teacher_out [, labels]); leaves it in eval mode.

    `inputs` are the model's positional inputs (leading axis = samples). `set_train(mode)` switches train/eval
    (default: `module.train(mode)`; exported graphs need torchao's move_exported_model_to_train/eval).
    """
    import torch

    check_fit_config(cfg)
    n = len(teacher_out)
    if n == 0:
        raise InputError("no training samples")
    use_labels = labels is not None and cfg.task != "embedding"
    switch = set_train or module.train
    xs = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
    t_all = torch.from_numpy(np.ascontiguousarray(teacher_out, dtype=np.float32))
    y_all = None
    if use_labels and labels is not None:
        y_all = torch.from_numpy(np.ascontiguousarray(labels))
        if cfg.task == "regression":
            y_all = y_all.to(torch.float32)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConversionError("the model has no trainable parameters to fine-tune")
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    steps_per_epoch = -(-n // cfg.batch_size)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    first = last = math.nan
    steps = 0
    t0 = time.monotonic()
    switch(True)
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                if len(idx) < 2 and n >= 2:  # batch-norm cannot train on one row
                    continue
                optimizer.zero_grad()
                out = module(*(x[idx] for x in xs))
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = _loss(cfg.task, out, t_all[idx], None if y_all is None else y_all[idx], cfg)
                if not torch.isfinite(loss):
                    raise ConversionError(f"training diverged (loss {float(loss)} at epoch {epoch + 1}); "
                                          "try a smaller --lr")
                loss.backward()
                optimizer.step()
                scheduler.step()
                steps += 1
                total += float(loss.detach()) * len(idx)
            epoch_loss = total / n
            if epoch == 0:
                first = epoch_loss
            last = epoch_loss
            log.info("epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, epoch_loss)
    finally:
        switch(False)
    return FitResult(cfg.epochs, n, steps, round(time.monotonic() - t0, 2), first, last, use_labels,
                     cfg.temperature, cfg.alpha if use_labels else 1.0, cfg.lr)


def parameter_count(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# --- `packager distill` ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillOptions:
    teacher: str
    student: str
    data: Path
    out: Path
    eval: Path | None = None
    teacher_weights: Path | None = None
    task: str = "classification"
    epochs: int = 30
    temperature: float = 4.0
    alpha: float = 0.7
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0
    max_drop: float | None = None
    latency_runs: int = 200
    threads: int = 1

    def fit_config(self) -> FitConfig:
        return FitConfig(self.task, self.epochs, self.temperature, self.alpha, self.lr, self.batch_size, self.seed)


@dataclass(frozen=True)
class DistillResult:
    out: Path
    report: dict[str, Any]


def check_distill_options(opts: DistillOptions) -> None:
    """Argument checks that need no model, run before any work."""
    check_fit_config(opts.fit_config())
    if opts.epochs < 1:
        raise InputError("--epochs must be at least 1")
    if not _FACTORY_RE.match(opts.student):
        raise InputError(f"--student {opts.student!r}: expected package.module:factory (a function that returns "
                         "the untrained student nn.Module)")
    if opts.out.suffix != ".pt2":
        raise InputError(f"--out {opts.out}: the student is written as a torch.export .pt2 file (name it *.pt2)")
    if opts.out.is_dir():
        raise InputError(f"--out {opts.out}: is a directory")
    if opts.max_drop is not None and not (math.isfinite(opts.max_drop) and opts.max_drop >= 0):
        raise InputError("--max-drop must be a finite number >= 0")
    for label, path in (("--data", opts.data), ("--eval", opts.eval)):
        if path is not None and not path.is_file():
            raise InputError(f"{label} {path}: no such file")
    if opts.latency_runs < 20 or opts.threads < 1:
        raise InputError("latency runs must be >= 20 and threads >= 1")


def distill(opts: DistillOptions, progress: Callable[[str], None] | None = None) -> DistillResult:
    """Train the student on the teacher's outputs, gate it, and write it as a .pt2 carrying its record."""
    import torch

    from packager.data import load_npz
    from packager.torch_model import SourceModel, load_source, run_torch

    say = progress or (lambda _m: None)
    check_distill_options(opts)
    task = opts.task
    max_drop = opts.max_drop if opts.max_drop is not None else metrics.DEFAULT_MAX_DROP[task]
    teacher = _load_teacher(opts)
    student_src: SourceModel = load_source(opts.student, None)
    say(f"teacher {teacher.kind} {teacher.description}; student {opts.student}")
    if len(student_src.input_names) != len(teacher.input_names):
        raise InputError(f"--student takes {len(student_src.input_names)} inputs, the teacher "
                         f"{len(teacher.input_names)}")

    train = load_npz(opts.data, teacher.input_names, "training", need_labels=False)
    if opts.eval is not None:
        eval_ds = load_npz(opts.eval, teacher.input_names, "evaluation", need_labels=task != "embedding")
        train_rows = np.arange(train.n)
        eval_rows = np.arange(eval_ds.n)
        eval_inputs, eval_labels, eval_where = eval_ds.inputs, eval_ds.labels, str(opts.eval)
        eval_sha = eval_ds.sha256
    else:
        if task != "embedding" and train.labels is None:
            raise InputError(f"training data {opts.data}: labels 'y' are needed to score the student without "
                             "--eval")
        rng = np.random.default_rng(opts.seed)
        order = rng.permutation(train.n)
        k = max(MIN_HOLDOUT, round(HOLDOUT_FRACTION * train.n))
        if train.n - k < 1:
            raise InputError(f"training data {opts.data}: {train.n} samples; give --eval or more data")
        eval_rows, train_rows = np.sort(order[:k]), np.sort(order[k:])
        eval_inputs = {name: a[eval_rows] for name, a in train.inputs.items()}
        eval_labels = None if train.labels is None else train.labels[eval_rows]
        eval_where = f"{opts.data} (held-out {len(eval_rows)} rows, seed {opts.seed})"
        eval_sha = train.sha256
    if len(eval_rows) < 1:
        raise InputError("no evaluation samples")

    def feeds(ds_inputs: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        out = {}
        for name in teacher.input_names:
            a = ds_inputs[name] if rows is None else ds_inputs[name][rows]
            out[name] = a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int64)
        return out

    train_feeds = feeds(train.inputs, train_rows)
    eval_feeds = feeds(eval_inputs)
    say(f"teacher outputs on {len(train_rows)} training and {len(eval_rows)} evaluation samples")
    t_train = _teacher_outputs(teacher, train_feeds, f"training data {opts.data}")
    t_eval = _teacher_outputs(teacher, eval_feeds, f"evaluation data {eval_where}")
    train_labels = None if train.labels is None else train.labels[train_rows]
    if task == "classification":
        classes = t_train.reshape(len(t_train), -1).shape[1]
        for lab, where in ((train_labels, "training"), (eval_labels, "evaluation")):
            if lab is not None and (lab.dtype.kind not in "iu" or lab.min() < 0 or lab.max() >= classes):
                raise InputError(f"{where} labels 'y' must be integer classes in [0, {classes})")

    student = student_src.module
    one = {k: v[:1] for k, v in train_feeds.items()}
    s_one = run_torch(student_src, one, role=f"training data {opts.data} for the student")[0]
    if s_one.shape[1:] != t_train.shape[1:]:
        raise InputError(f"the student's output {list(s_one.shape[1:])} does not match the teacher's "
                         f"{list(t_train.shape[1:])}")

    say(f"training the student for {opts.epochs} epochs (temperature {opts.temperature:g})")
    torch.manual_seed(opts.seed)
    fitted = fit(student, [train_feeds[k] for k in teacher.input_names], t_train, train_labels, opts.fit_config())
    s_eval = run_torch(student_src, eval_feeds, batch=256, role="evaluation data")[0]

    teacher_value = metrics.metric_value(task, t_eval, eval_labels, t_eval)
    student_value = metrics.metric_value(task, s_eval, eval_labels, t_eval)
    drop = metrics.metric_drop(task, teacher_value, student_value, eval_labels)
    metric_name = metrics.METRIC_BY_TASK[task]
    say(f"student {metric_name} {student_value:.4g} vs teacher {teacher_value:.4g} (drop {drop:.3g})")

    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgeship-distill-") as td:
        sizes = _sizes_and_latency(teacher, student_src, one, Path(td), opts)
    report: dict[str, Any] = {
        "task": task, "metric": metric_name, "max_drop": max_drop,
        "teacher": {"model": teacher.description, "kind": teacher.kind, "sha256": teacher.sha256,
                    "value": teacher_value, **sizes["teacher"]},
        "student": {"model": opts.student, "value": student_value, "drop": drop, **sizes["student"]},
        "training": {"data": str(opts.data), "sha256": train.sha256, "samples": len(train_rows),
                     **fitted.to_json()},
        "evaluation": {"data": eval_where, "sha256": eval_sha, "samples": len(eval_rows)},
        "passed": drop <= max_drop,
    }
    if not drop <= max_drop:  # NaN fails too
        raise AccuracyGateError(f"distillation gate failed, no student written: student {metric_name} "
                                f"{student_value:.4g} vs teacher {teacher_value:.4g}: drop {drop:.4g} > {max_drop:g}")
    _write_student(student_src, one, opts.out, report)
    say(f"wrote {opts.out}")
    return DistillResult(opts.out, report)


def _load_teacher(opts: DistillOptions) -> Any:
    from packager.torch_model import load_source

    path = Path(opts.teacher)
    if opts.teacher.lower().endswith(".onnx") and path.is_file():
        from packager.onnx_export import load_onnx_source

        if opts.teacher_weights is not None:
            raise InputError("--teacher-weights goes with a package.module:factory teacher, not a model file")
        return load_onnx_source(path)
    return load_source(opts.teacher, opts.teacher_weights)


def _teacher_outputs(teacher: Any, feeds: dict[str, np.ndarray], role: str) -> np.ndarray:
    from packager.torch_model import run_torch

    if teacher.is_torch:
        out = run_torch(teacher, feeds, batch=256, role=role)[0]
    else:
        from agent.runtime import open_session

        session = open_session(teacher.onnx_path, "onnx", threads=1)
        try:
            out = session.run(feeds)[0]
        except ValueError as e:
            raise InputError(f"{role}: {e}") from e
    out = np.asarray(out, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InputError(f"{role}: the teacher's outputs have NaN or infinite values")
    return out


def _onnx_latency(path: Path, one: dict[str, np.ndarray], runs: int, threads: int) -> metrics.Latency:
    from agent.runtime import open_session

    session = open_session(path, "onnx", threads=threads)
    for _ in range(10):
        session.run(one)
    seconds: list[float] = []
    deadline = time.monotonic() + 5.0
    while len(seconds) < runs and (len(seconds) < 20 or time.monotonic() < deadline):
        t0 = time.perf_counter()
        session.run(one)
        seconds.append(time.perf_counter() - t0)
    return metrics.latency_summary(seconds)


def _sizes_and_latency(teacher: Any, student: Any, one: dict[str, np.ndarray], work: Path,
                       opts: DistillOptions) -> dict[str, dict[str, Any]]:
    """Parameters, fp32 ONNX bytes and batch-1 onnxruntime latency of both models, measured the same way."""
    from packager.onnx_export import export_onnx
    from packager.torch_model import example_args

    out: dict[str, dict[str, Any]] = {}
    for role, src in (("teacher", teacher), ("student", student)):
        if src.is_torch:
            path = work / f"{role}.onnx"
            export_onnx(src.module, example_args(src, one), src.input_names, path)
            params = parameter_count(src.module)
        else:
            path = src.onnx_path
            params = _onnx_parameter_count(path)
        lat = _onnx_latency(path, one, opts.latency_runs, opts.threads)
        out[role] = {"parameters": params, "onnx_bytes": path.stat().st_size, "p50_ms": lat.p50_ms,
                     "p95_ms": lat.p95_ms}
    return out


def _onnx_parameter_count(path: Path) -> int:
    import onnx

    model = onnx.load(str(path))
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer))


def _write_student(student: Any, one: dict[str, np.ndarray], out: Path, report: dict[str, Any]) -> None:
    """torch.export the trained student (dynamic batch) and save it atomically with the distillation record."""
    import torch

    from agent.fsutil import write_atomic
    from packager.torch_model import example_args

    module = student.module
    module.eval()
    args = tuple(torch.cat([a, a]) for a in example_args(student, one))  # batch 2: a batch of 1 specialises
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    try:
        program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args))
    except Exception as e:
        log.debug("dynamic-batch export failed", exc_info=e)
        try:
            program = torch.export.export(module, args[:1] if len(args) == 1 else args)
        except Exception as e2:
            raise ConversionError(f"torch.export of the student failed: {str(e2).strip().splitlines()[0]}") from e2
    record = json.dumps(record_from_report(report), sort_keys=True)
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={RECORD_NAME: record})
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, buf.getvalue())
    except OSError as e:
        raise InputError(f"--out {out}: cannot write ({e.strerror or e})") from e


_RECORD_FIELDS = {
    "teacher": ("model", "kind", "sha256", "value", "parameters", "onnx_bytes", "p50_ms"),
    "student": ("model", "value", "drop", "parameters", "onnx_bytes", "p50_ms"),
    "training": ("data", "sha256", "samples", "epochs", "temperature", "alpha", "labels", "final_loss"),
    "evaluation": ("data", "sha256", "samples"),
}


def record_from_report(report: dict[str, Any]) -> dict[str, Any]:
    """What travels inside the student's .pt2 for `packager build`'s report."""
    rec: dict[str, Any] = {"metric": report["metric"], "task": report["task"]}
    for section, keys in _RECORD_FIELDS.items():
        rec[section] = {k: report[section][k] for k in keys if k in report[section]}
    return rec


def read_record(path: Path) -> dict[str, Any] | None:
    """The distillation record of a .pt2 `packager distill` wrote; None for any other file.

    The file is untrusted: the entry is bounded, must be a JSON object of the known sections holding strings,
    numbers and booleans, and anything else is ignored with a warning rather than carried into a report.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.split("/", 1)[-1] == f"extra/{RECORD_NAME}"]
            if len(names) != 1:
                return None
            info = z.getinfo(names[0])
            if info.file_size > MAX_RECORD_BYTES:
                log.warning("%s: distillation record is %d bytes; ignored", path, info.file_size)
                return None
            data = z.read(names[0])
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        log.warning("%s: distillation record is not JSON; ignored", path)
        return None
    if not isinstance(doc, dict):
        return None
    out: dict[str, Any] = {}
    for key in ("metric", "task"):
        if isinstance(doc.get(key), str) and len(doc[key]) <= 64:
            out[key] = doc[key]
    for section, keys in _RECORD_FIELDS.items():
        sec = doc.get(section)
        if not isinstance(sec, dict):
            continue
        clean = {}
        for k in keys:
            v = sec.get(k)
            number = isinstance(v, (int, float)) and math.isfinite(v)
            if isinstance(v, bool) or number or (isinstance(v, str) and len(v) <= 1024):
                clean[k] = v
        out[section] = clean
    return out or None
