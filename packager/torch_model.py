"""Loading the user's model (PyTorch or ONNX), running it in torch, and magnitude pruning. All torch I/O is here."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import logging
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.bundle import TensorSpec, sha256_file
from packager.errors import InputError, RefusedPickle
from packager.pickle_scan import check_pt2, check_state_dict, check_torchscript
from packager.pt2_check import check_pt2_graphs

log = logging.getLogger(__name__)

SourceKind = Literal["exported", "torchscript", "module", "onnx"]
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class SourceModel:
    """The model as the user gave it. `module` is a runnable torch module for every kind but ONNX."""

    kind: SourceKind
    description: str
    sha256: str
    input_names: list[str]
    module: Any = None  # torch.nn.Module | torch.jit.ScriptModule
    onnx_path: Path | None = None

    @property
    def is_torch(self) -> bool:
        return self.kind != "onnx"

    @property
    def exportable(self) -> bool:
        """torch.export (and so litert-torch and the dynamo ONNX exporter) cannot trace TorchScript."""
        return self.kind in ("exported", "module")


def default_name(model_arg: str) -> str:
    stem = model_arg.rsplit(":", 1)[1] if _FACTORY_RE.match(model_arg) else Path(model_arg).name.split(".")[0]
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return name or "model"


def load_source(model_arg: str, weights: Path | None) -> SourceModel:
    """Resolve MODEL: a `.pt2`, a TorchScript file, an `.onnx` file, or `package.module:factory` + weights."""
    path = Path(model_arg)
    if not path.exists() and _FACTORY_RE.match(model_arg):
        return _load_factory(model_arg, weights)
    if weights is not None:
        raise InputError("--weights goes with a package.module:factory MODEL, not a model file")
    if not path.is_file():
        raise InputError(f"model {model_arg}: no such file (nor a package.module:factory name)")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise InputError(f"model {path}: cannot read ({e.strerror})") from e
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path)
    if not head.startswith(b"PK"):
        raise InputError(f"model {path}: not a model file (expected a torch.export .pt2, a TorchScript "
                         "archive or an .onnx file)")
    return _load_torch_archive(path)


def _load_onnx(path: Path) -> SourceModel:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...: all mean "not a usable model"
        raise InputError(f"model {path}: not a valid ONNX model ({_first_line(e)})") from e
    initializer_names = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializer_names]
    return SourceModel("onnx", str(path), sha256_file(path), names, onnx_path=path)


def _load_torch_archive(path: Path) -> SourceModel:
    import torch

    # Read the file once: the bytes checked are the bytes torch loads. torch.export.load unpickles sample inputs,
    # constants and weights with weights_only=False (or falls back to it), so every pickle it could reach is
    # checked first (packager/pickle_scan.py) and torch never sees a file that fails.
    data = _read_bytes(path, "model")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            is_exported = any(n.split("/", 1)[-1].startswith("serialized_exported_program") or
                              "/models/" in n for n in z.namelist())
    except zipfile.BadZipFile as e:
        raise InputError(f"model {path}: not a readable zip archive ({e})") from e
    try:
        if is_exported:
            check_pt2(data, path.name)
            # torch sympifies the graph JSON's shape expressions and resolves its targets by getattr
            check_pt2_graphs(data, path.name)
        else:
            check_torchscript(data, path.name)
    except RefusedPickle as e:  # RefusedGraph too
        raise InputError(f"model {path}: refused: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    try:
        if is_exported:
            ep = torch.export.load(io.BytesIO(data))
            names = [s.arg.name for s in ep.graph_signature.input_specs
                     if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
                     and hasattr(s.arg, "name")]
            return SourceModel("exported", str(path), digest, names, module=ep.module())
        script = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError/ValueError/pickle errors for foreign archives
        raise InputError(f"model {path}: cannot load as torch.export .pt2 or TorchScript "
                         f"({_first_line(e)})") from e
    script.eval()
    names = [a.name for a in script.forward.schema.arguments[1:]]
    return SourceModel("torchscript", str(path), digest, names, module=script)


def _read_bytes(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"{label} {path}: cannot read ({e.strerror})") from e


def _load_factory(spec: str, weights: Path | None) -> SourceModel:
    import torch

    module_name, attr = spec.split(":")
    # Like `python -m`, resolve the user's own packages from the working directory.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(f"model {spec}: cannot import ({e})") from e
    try:
        module = factory()
    except Exception as e:
        raise InputError(f"model {spec}: factory failed ({_first_line(e)})") from e
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"model {spec}: factory returned {type(module).__name__}, not a torch.nn.Module")
    digest = ""
    if weights is not None:
        if not weights.is_file():
            raise InputError(f"weights {weights}: no such file")
        data = _read_bytes(weights, "weights")
        try:  # checked before torch sees them; torch.load then reads these same bytes
            check_state_dict(data, weights.name)
        except RefusedPickle as e:
            raise InputError(f"weights {weights}: refused by the weights_only check: {e}") from e
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise InputError(f"weights {weights}: refused by torch.load(weights_only=True): "
                             f"{_first_line(e)}") from e
        except Exception as e:
            raise InputError(f"weights {weights}: not a readable state_dict ({_first_line(e)})") from e
        if not isinstance(state, dict):
            raise InputError(f"weights {weights}: expected a state_dict, got {type(state).__name__}")
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(f"weights {weights}: do not fit {spec} ({_first_line(e)})") from e
        digest = hashlib.sha256(data).hexdigest()
    module.eval()
    names = [p for p in inspect.signature(module.forward).parameters if p not in ("self", "args", "kwargs")]
    return SourceModel("module", spec, digest, names, module=module)


def run_torch(source: SourceModel, feeds: dict[str, np.ndarray], batch: int = 1,
              role: str = "the data") -> list[np.ndarray]:
    """Run the torch model over all rows, `batch` rows at a time; returns one array per output."""
    import torch

    n = len(next(iter(feeds.values())))
    chunks: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, n, batch):
            args = tuple(torch.from_numpy(feeds[k][start:start + batch]) for k in source.input_names)
            try:
                out = source.module(*args)
            except Exception as e:
                raise InputError(f"{role} does not fit the model: {_first_line(e)}") from e
            outs = out if isinstance(out, (tuple, list)) else (out,)
            chunks.append([o.detach().numpy() for o in outs])
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def declared_input_specs(source: SourceModel) -> list[TensorSpec] | None:
    """Input dtypes and shapes an exported program declares (symbolic dims as -1); None when unknown."""
    import torch

    if source.kind != "exported":
        return None
    specs = []
    placeholders = [n for n in source.module.graph.nodes if n.op == "placeholder"]
    for name, node in zip(source.input_names, placeholders, strict=False):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        shape = tuple(d if isinstance(d, int) else -1 for d in val.shape)
        specs.append(TensorSpec(name, shape, str(val.dtype).removeprefix("torch.")))
    return specs if len(specs) == len(source.input_names) else None


def example_args(source: SourceModel, feeds: dict[str, np.ndarray]) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[k][:1])) for k in source.input_names)


# --- pruning -----------------------------------------------------------------------------------------------

_PRUNABLE_OPS = ("conv", "linear", "addmm")


def _prunable(module: Any) -> list[tuple[Any, str, str]]:
    """(owner module, parameter name, qualified name) of every conv/linear weight."""
    import torch

    found: list[tuple[Any, str, str]] = []
    if isinstance(module, torch.fx.GraphModule):
        # torch.export's module() keeps parameters under their original names but calls aten ops, so find the
        # weights by the ops that consume them.
        for node in module.graph.nodes:
            if node.op == "call_function" and any(op in str(node.target) for op in _PRUNABLE_OPS):
                for arg in node.args[1:2]:
                    if getattr(arg, "op", None) == "get_attr":
                        owner_path, _, pname = str(arg.target).rpartition(".")
                        owner = module.get_submodule(owner_path) if owner_path else module
                        found.append((owner, pname, str(arg.target)))
        return found
    for qual, sub in module.named_modules():
        if isinstance(sub, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            found.append((sub, "weight", f"{qual}.weight" if qual else "weight"))
    return found


@dataclass(frozen=True)
class PruneResult:
    amount: float
    parameters_pruned: int
    sparsity: float  # zeros / weights over the pruned tensors, measured after pruning
    tensors: int


def prune_global_l1(source: SourceModel, amount: float) -> PruneResult:
    """Global unstructured L1 pruning of conv/linear weights, made permanent (torch.nn.utils.prune)."""
    import torch
    from torch.nn.utils import prune

    if source.kind == "torchscript":
        raise InputError("--prune needs a .pt2 or a package.module:factory model; TorchScript weights are frozen")
    if not source.is_torch:
        raise InputError("--prune needs a PyTorch model; prune before exporting to ONNX")
    targets = _prunable(source.module)
    if not targets:
        raise InputError("--prune: the model has no conv or linear weights to prune")
    pairs = [(owner, name) for owner, name, _ in targets]
    prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=amount)
    for owner, name in pairs:
        prune.remove(owner, name)
    with torch.no_grad():
        total = sum(getattr(o, n).numel() for o, n in pairs)
        zeros = sum(int((getattr(o, n) == 0).sum()) for o, n in pairs)
    log.info("pruned %d tensors to %.1f%% sparsity", len(pairs), 100.0 * zeros / total)
    return PruneResult(amount, total, zeros / total, len(pairs))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
