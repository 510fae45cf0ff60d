"""Quantization-aware training (PT2E) as the last ONNX recipe, for a PyTorch model whose int8 misses the gate.

When every post-training recipe misses the gate, the calibration data has labels and the model is PyTorch, the
model is exported (`torch.export`, dynamic batch), prepared with torchao's `prepare_qat_pt2e` and the x86
quantizer (fake-quantized uint8 activations with 7-bit range, int8 per-channel symmetric weights), fine-tuned
for a few epochs on the calibration data against the fp32 model's own outputs and the labels
(`packager/distill.py`), converted (`convert_pt2e`, weights folded to int8) and exported by torch's dynamo ONNX
exporter: the result is a QDQ graph (int8 weight initializers, QuantizeLinear/DequantizeLinear around each
Conv/Gemm) that onnxruntime runs with its int8 kernels, like the post-training artifacts. It is one more trial:
evaluated, gated and listed in the report like any other recipe.

Why the x86 quantizer with `reduce_range`: 7-bit activations keep AVX2-only CPUs' 16-bit `vpmaddubsw` sums
from saturating (the post-training recipes get the same protection from 7-bit weights). torch 2.13 no longer
ships `torch.ao.quantization.quantize_pt2e`; torchao's is used. litert-torch 0.10's own PT2E quantizer fails
to annotate QAT graphs with batch-norm under torch 2.13 (it hands a function to torch.export), so TFLite keeps
its post-training recipes only.

The x86 quantizer groups nodes by the module that produced them; a model that calls one activation module in
several places (`self.relu` reused) would form a single multi-output partition it refuses, so each call of a
single-node module gets its own partition name first (graph metadata only; the computation is untouched).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from packager.distill import FitConfig, FitResult, fit
from packager.errors import ConversionError

log = logging.getLogger(__name__)

DEFAULT_QAT_EPOCHS = 3
QAT_LR = 1e-4
MAX_EXPORT_BATCH = 1024


def _partition_keys(node: Any) -> list[tuple[str, str]]:
    """Where torch's get_source_partitions may file a node: (metadata field, the name it groups by)."""
    keys = []
    stack = node.meta.get("source_fn_stack")
    if stack:
        keys.append(("source_fn_stack", str(stack[-1][0])))
    modules = node.meta.get("nn_module_stack")
    if modules:  # strict=False exports: the innermost module's qualified name
        keys.append(("nn_module_stack", str(list(modules.values())[-1][0])))
    return keys


def _rename(node: Any, field: str, suffix: str) -> None:
    if field == "source_fn_stack":
        stack = list(node.meta[field])
        stack[-1] = (f"{stack[-1][0]}{suffix}", stack[-1][1])
        node.meta[field] = stack
    else:
        modules = dict(node.meta[field])  # nodes may share one dict: copy before changing
        key = list(modules)[-1]
        fqn, cls = modules[key]
        modules[key] = (f"{fqn}{suffix}", cls)
        node.meta[field] = modules


def _split_shared_partitions(gm: Any) -> int:
    """Give every call of a module that was called more than once (one aten node per call) its own source name."""
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            for key in _partition_keys(node):
                groups[key].append(node)
    renamed = 0
    for (field, _name), nodes in groups.items():
        if len(nodes) > 1 and len({n.target for n in nodes}) == 1:
            for i, node in enumerate(nodes):
                _rename(node, field, f"__call{i}")
                renamed += 1
    return renamed


def qat_onnx(module: Any, input_names: list[str], feeds: dict[str, np.ndarray], teacher_out: np.ndarray,
             labels: np.ndarray, task: str, epochs: int, out_path: Path, seed: int = 0,
             reduce_range: bool = True) -> FitResult:
    """Fine-tune a fake-quantized copy of `module` (PT2E QAT) and export it as an int8 QDQ ONNX to `out_path`."""
    import torch

    from packager.tflite_convert import _install_noise_filters

    _install_noise_filters()  # torchao's optional-kernel and torch's deprecation chatter, demoted to DEBUG
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as e:
        raise ConversionError(f"QAT needs torchao (install edgeship[packager]): {e}") from e

    from packager.onnx_export import export_onnx

    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[k][:2])) for k in input_names)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's pytree deprecation warnings while copying a GraphModule
        module = copy.deepcopy(module)  # training must not touch the model the other formats are built from
    with contextlib.suppress(NotImplementedError):
        module.eval()  # an exported program's module() refuses; its mode was fixed at export
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            gm = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args),
                                     strict=False).module()
            renamed = _split_shared_partitions(gm)
            quantizer = X86InductorQuantizer().set_global(
                get_default_x86_inductor_quantization_config(is_qat=True, reduce_range=reduce_range))
            prepared = prepare_qat_pt2e(gm, quantizer)
    except Exception as e:
        log.debug("QAT preparation failed; stderr: %s", sink.getvalue(), exc_info=e)
        raise ConversionError(f"QAT preparation failed: {type(e).__name__}: {_first_line(e)}") from e
    log.debug("QAT: split %d shared-module calls into their own partitions", renamed)

    def set_train(mode: bool) -> None:
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(prepared)

    torch.manual_seed(seed)
    result = fit(prepared, [feeds[k] for k in input_names], teacher_out, labels,
                 FitConfig(task, epochs, lr=QAT_LR, seed=seed), set_train=set_train)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            converted = convert_pt2e(prepared, fold_quantize=True)
            export_onnx(converted, tuple(a[:1] for a in args), input_names, out_path)
    except ConversionError:
        raise
    except Exception as e:
        log.debug("QAT conversion failed; stderr: %s", sink.getvalue(), exc_info=e)
        raise ConversionError(f"QAT conversion failed: {type(e).__name__}: {_first_line(e)}") from e
    return result


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def fallback(result: Any, evaluator: Any, source: Any, calib: Any, work: Path, max_drop: float, epochs: int,
             task: str, progress: Any, reduce_range: bool = True) -> Any:
    """`result` (a TuningResult) with a QAT trial added when every post-training recipe missed the gate.

    Tried only for a PyTorch model torch.export can trace, with labelled calibration data and `epochs` > 0;
    otherwise `result` comes back unchanged. `reduce_range` (the `--target` needs it: AVX2-only x86) makes the
    activations 7-bit; without it they use all 8 bits (VNNI x86, Arm).
    """
    from packager.torch_model import run_torch
    from packager.tuning import choose

    if result.chosen is not None or epochs <= 0 or not source.exportable or calib.labels is None:
        return result
    progress.detail(f"every post-training recipe missed the gate: trying quantization-aware training "
                    f"({epochs} epochs on {calib.n} labelled calibration samples)")
    feeds = {k: (a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int64))
             for k, a in calib.inputs.items()}
    out = work / "onnx-qat.int8.onnx"
    recipe: dict[str, Any] = {"name": f"qat-pt2e-x86-perchannel-{'u7' if reduce_range else 'u8'}s8",
                              "quantizer": "torchao X86InductorQuantizer", "qat": True, "epochs": epochs,
                              "lr": QAT_LR, "per_channel": True,
                              "reduce_range": "activations" if reduce_range else False, "calibration_rows": calib.n}
    fitted: list[FitResult] = []

    def make() -> None:
        teacher = run_torch(source, feeds, batch=256, role="calibration data")[0]
        fitted.append(qat_onnx(source.module, source.input_names, feeds, teacher, calib.labels, task, epochs, out,
                               reduce_range=reduce_range))

    trial = evaluator.trial(recipe, out, "onnx", make)
    if fitted:
        recipe["final_loss"] = fitted[0].final_loss
        recipe["seconds"] = fitted[0].seconds
    why = getattr(trial, "rejected", None)  # larger or slower than fp32 (packager/verdict.py)
    verdict = "pass" if trial.passed(max_drop) else (
        f"failed: {trial.error}" if trial.error else f"miss: {why}" if why else "miss")
    progress.detail(f"{recipe['name']}: metric {trial.value:.4g}, drop {trial.drop:.3g} [{verdict}]")
    return choose([*result.trials, trial], max_drop)
