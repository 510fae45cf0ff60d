"""Structured (channel) pruning with torch-pruning: whole conv/linear output channels removed, so the exported
model is really smaller and faster, not a dense file full of zeros.

torch-pruning (Fang et al., "DepGraph", CVPR 2023) traces the model once and groups every layer whose shape is
coupled to a channel (the conv, its batch-norm, the next conv's input channels, a residual add's partners), so a
channel is removed everywhere at once and the model stays consistent. Channels are ranked per group by the L2
norm of their weights (GroupMagnitudeImportance) and removed uniformly (the same fraction of every prunable
layer), rounded to multiples of ROUND_TO channels, which int8 kernels handle best. The layer that writes the
model's output is never pruned: its channels are the classes or the output features.

Pruning alone costs accuracy; a short fine-tune on the calibration data (`--finetune-epochs`) trains the pruned
model on the unpruned model's outputs (knowledge distillation, `packager/distill.py`), with the labels when the
data has them. It needs a real `torch.nn.Module` (a `package.module:factory` model): a torch.export program is a
traced graph of aten calls with no Conv2d/Linear modules to rewrite.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from packager.distill import FitConfig, FitResult, fit, parameter_count
from packager.errors import ConversionError, InputError

log = logging.getLogger(__name__)

ROUND_TO = 8
DEFAULT_FINETUNE_EPOCHS = 10


@dataclass(frozen=True)
class ChannelPruneResult:
    amount: float
    parameters_before: int
    parameters_after: int
    layers: int  # conv/linear layers that lost channels
    finetune: FitResult | None

    def to_json(self) -> dict[str, Any]:
        return {"method": "channels", "amount": self.amount, "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after, "layers": self.layers, "round_to": ROUND_TO,
                "library": _library_version(),
                "finetune": None if self.finetune is None else self.finetune.to_json()}


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"torch-pruning {version('torch-pruning')}"
    except PackageNotFoundError:
        return "torch-pruning"


def check_amount(amount: float) -> None:
    if not 0.0 <= amount < 1.0:
        raise InputError("--prune-channels must be a fraction in [0, 1)")


def _output_layers(module: Any, example: tuple[Any, ...]) -> list[Any]:
    """Conv/linear layers whose output has the model output's shape: the last one run writes the output."""
    import torch

    seen: list[tuple[Any, tuple[int, ...]]] = []

    def record(layer: Any, _inputs: Any, output: Any) -> None:  # returns None: the output is left as it is
        if isinstance(output, torch.Tensor):
            seen.append((layer, tuple(output.shape)))

    hooks = [sub.register_forward_hook(record) for sub in module.modules()
             if isinstance(sub, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    try:
        with torch.no_grad():
            out = module(*example)
    finally:
        for h in hooks:
            h.remove()
    out = out[0] if isinstance(out, (tuple, list)) else out
    shape = tuple(out.shape)
    last = [m for m, s in seen if s == shape]
    return last[-1:] if last else []


def prune_channels(source: Any, amount: float, example: tuple[Any, ...]) -> tuple[int, int, int]:
    """Remove `amount` of the output channels of every prunable layer of `source.module`, in place.

    Returns (parameters before, parameters after, layers pruned). Raises InputError for a model torch-pruning
    cannot take and ConversionError when it fails on one.
    """
    import torch

    check_amount(amount)
    if source.kind != "module":
        raise InputError("--prune-channels needs a package.module:factory model (with --weights): a "
                         f"{'torch.export program' if source.kind == 'exported' else source.kind + ' model'} has "
                         "no layers torch-pruning can rewrite")
    try:
        import torch_pruning as tp  # type: ignore[import-untyped]
    except ImportError as e:
        raise InputError(f"--prune-channels needs torch-pruning (install edgeship[packager]): {e}") from e
    module = source.module
    module.eval()
    with torch.no_grad():
        ref = module(*example)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    before = parameter_count(module)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    ignored = _output_layers(module, example)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch-pruning warns about parameters outside standard layers
            pruner = tp.pruner.BasePruner(
                module, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=amount,
                ignored_layers=ignored, round_to=ROUND_TO, global_pruning=False)
            pruner.step()
    except Exception as e:  # torch-pruning raises assorted errors for graphs it cannot trace
        raise ConversionError(f"channel pruning failed: {type(e).__name__}: {str(e).strip()[:200]}") from e
    module.eval()
    with torch.no_grad():
        out = module(*example)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if tuple(out.shape) != tuple(ref.shape):
        raise ConversionError(f"channel pruning changed the output shape {list(ref.shape)} -> {list(out.shape)}")
    after = parameter_count(module)
    layers = sum(1 for name, p in module.named_parameters()
                 if name.endswith("weight") and p.dim() > 1 and tuple(p.shape) != shapes.get(name))
    log.info("pruned channels: %d -> %d parameters, %d layers", before, after, layers)
    return before, after, layers


def prune_and_finetune(source: Any, amount: float, example: tuple[Any, ...], feeds: dict[str, np.ndarray],
                       labels: np.ndarray | None, task: str, epochs: int, seed: int = 0) -> ChannelPruneResult:
    """Channel-prune `source.module` in place, then fine-tune it on `feeds` against the unpruned outputs."""
    from packager.torch_model import run_torch

    teacher_out = run_torch(source, feeds, batch=256, role="calibration data")[0] if epochs else None
    before, after, layers = prune_channels(source, amount, example)
    result = None
    if epochs and teacher_out is not None:
        import torch

        torch.manual_seed(seed)
        result = fit(source.module, [feeds[k] for k in source.input_names], teacher_out,
                     labels, FitConfig(task, epochs, seed=seed, lr=1e-3))
        source.module.eval()
    return ChannelPruneResult(amount, before, after, layers, result)


def prune_for_build(source: Any, prune: float, channels: float, finetune_epochs: int, task: str,
                    feeds: dict[str, np.ndarray], labels: np.ndarray | None,
                    example: tuple[Any, ...]) -> tuple[dict[str, Any], str]:
    """Run the pruning `packager build` was asked for, in place; returns the report's fields and a progress line.

    `prune` is global L1 unstructured (zeros in dense tensors); `channels` is structured channel pruning with a
    fine-tune of `finetune_epochs` on `feeds` (the calibration data, with `labels` when it has them).
    """
    if channels:
        r = prune_and_finetune(source, channels, example, feeds, labels, task, finetune_epochs)
        tuned = (f", fine-tuned {r.finetune.epochs} epochs on {r.finetune.samples} samples"
                 f"{' with labels' if r.finetune.labels else ''}") if r.finetune else ", no fine-tune"
        return r.to_json(), (f"pruned {100 * channels:g}% of the channels of {r.layers} layers: "
                             f"{r.parameters_before:,} -> {r.parameters_after:,} parameters{tuned}")
    from packager.torch_model import prune_global_l1

    pr = prune_global_l1(source, prune)
    return ({"method": "l1-unstructured", "amount": pr.amount, "sparsity": pr.sparsity, "tensors": pr.tensors,
             "parameters": pr.parameters_pruned},
            f"pruned {pr.tensors} weight tensors to {100 * pr.sparsity:.1f}% sparsity")
