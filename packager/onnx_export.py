"""PyTorch -> one self-contained fp32 .onnx file.

nn.Module and ExportedProgram go through the dynamo exporter (torch.export + onnxscript); TorchScript
only works with the legacy TorchScript exporter. Whatever the exporter does about external `.data`
files, the result is loaded back and re-saved as a single file, so a bundle never depends on a sidecar.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agent.bundle import sha256_file
from packager.errors import ConversionError, InputError

if TYPE_CHECKING:
    import onnx
    import torch

    from packager.torch_model import SourceModel

log = logging.getLogger(__name__)

# torchlib (the dynamo exporter's op library) is written for opset 18: asking for it avoids a version
# conversion pass, it is >= 17 (LayerNormalization) as onnxruntime's quantizer wants, and onnxruntime has
# run it since 1.14. Left alone, the exporter up-converts to 20, which older device runtimes refuse.
OPSET = 18

_PROTOBUF_LIMIT = 2**31 - 1
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Where the exporters name an operator they cannot translate, most specific first.
_UNSUPPORTED_OP = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),
    re.compile(r"No ONNX function found for ([\w.:]+)"),
    re.compile(r"[Ee]xporting the operator '?([\w.:]+)'? to ONNX opset version \d+ is not supported"),
    re.compile(r"Unsupported: ONNX export of operator ([\w.:]+)"),
)
_SUMMARY_LINE = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>: (.+)$", re.MULTILINE)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python-level and fd 1) to stderr for the duration.

    Exporters and onnxruntime's calibrators print progress; stdout must stay clean for `--json`.
    """
    sys.stdout.flush()
    saved: int | None = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 (embedded interpreter): the Python-level redirect still applies
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def describe_error(e: BaseException) -> str:
    """One line for an exporter/converter exception, naming the unsupported operator when it says which."""
    texts: list[str] = []
    kinds: set[str] = set()
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(texts) < 8:
        seen.add(id(cur))
        texts.append(_ANSI.sub("", str(cur)))
        kinds.add(type(cur).__name__)
        cur = cur.__cause__ or cur.__context__
    text = "\n".join(texts)
    for pat in _UNSUPPORTED_OP:
        m = pat.search(text)
        if m:
            return f"unsupported operator {m.group(1)}"
    # The dynamo exporter puts the root cause under "## Exception summary" as "<class 'X'>: message".
    m = _SUMMARY_LINE.search(text)
    line = f"{m.group(1)}: {m.group(2)}" if m else next(
        (ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    if "TorchExportError" in kinds:  # step 1 of 3: the model itself could not be traced
        line = f"torch.export could not capture the model: {line}"
    line = " ".join(line.split())
    return line if len(line) <= 300 else line[:297] + "..."


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node metadata and doc strings in place.

    The dynamo exporter records a Python stack trace and FX node per ONNX node: ~10% of a small model's
    bytes, and it leaks the build machine's source paths into shipped artifacts.
    """
    import onnx

    def graph(g: onnx.GraphProto) -> None:
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        graph(sub)

    graph(model.graph)
    for fn in model.functions:
        for node in fn.node:
            del node.metadata_props[:]
            node.doc_string = ""


def save_self_contained(model: onnx.ModelProto, out_path: Path) -> None:
    """Write `model` as one .onnx file (weights inline), atomically: temp file beside it, then os.replace."""
    out_path = Path(out_path)
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise ConversionError(f"model is {model.ByteSize()} bytes: too large for a single-file ONNX model (2 GiB)")
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # A sidecar from an earlier multi-file export of the same name is obsolete now; leaving it would
    # suggest the model still needs it.
    stale = out_path.with_name(out_path.name + ".data")
    if stale.is_file():
        log.debug("removing stale external data file %s", stale)
        stale.unlink()


def load_onnx_source(path: Path) -> SourceModel:
    """Read an .onnx MODEL's input names and check it, external data included, whatever the working directory."""
    import onnx

    from packager.torch_model import SourceModel

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
        # Given a path, the checker resolves external data against the model's own directory; given the loaded
        # proto it would look in the working directory, so a model would build only when run from its folder.
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...: all mean "not a usable model"
        raise InputError(f"model {path}: not a valid ONNX model ({describe_error(e)})") from e
    initializer_names = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializer_names]
    return SourceModel("onnx", str(path), sha256_file(path), names, onnx_path=path)


def copy_self_contained(src: Path, dst: Path) -> None:
    """Copy a user's .onnx model (which may keep weights in external files) to `dst` as one file.

    External data is read from `src`'s directory (onnx.load's base directory is the model file's), never the
    working directory.
    """
    import onnx

    src = Path(src)
    try:
        model = onnx.load(str(src), load_external_data=True)
    except Exception as e:
        raise InputError(f"cannot read ONNX model {src}: {describe_error(e)}") from e
    if not model.graph.node:
        raise InputError(f"cannot read ONNX model {src}: the graph has no nodes")
    save_self_contained(model, Path(dst))


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _batch_dims(model: onnx.ModelProto) -> list[str | int]:
    out: list[str | int] = []
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        if dims:
            out.append(dims[0].dim_param or dims[0].dim_value)
    return out


# Warns on every export that torchvision's detection ops are not registered: irrelevant here.
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    lg = logging.getLogger(name)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _first_rows(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(a[:1] if a.dim() > 0 else a for a in args)


def _run_exporter(
    model: Any, kind: str, args: tuple[torch.Tensor, ...], names: list[str], dst: Path, dynamic: bool
) -> None:
    import torch

    with stdout_to_stderr(), warnings.catch_warnings(), _quiet_logger(_REGISTRATION_LOGGER):
        warnings.simplefilter("ignore")  # deprecation chatter from torch.export internals
        if kind == "torchscript":
            axes = {n: {0: "batch"} for n, a in zip(names, args, strict=True) if a.dim() > 0} if dynamic else None
            torch.onnx.export(model, args, str(dst), input_names=names, opset_version=OPSET, dynamo=False,
                              dynamic_axes=axes, do_constant_folding=True, verbose=False)
            return
        shapes: tuple[dict[int, Any] | None, ...] | None = None
        if dynamic and kind == "module":
            batch = torch.export.Dim("batch")
            shapes = tuple({0: batch} if a.dim() > 0 else None for a in args)
        # ExportedProgram carries its own (possibly dynamic) shapes from torch.export.
        torch.onnx.export(model, args, str(dst), input_names=names, opset_version=OPSET, dynamo=True,
                          dynamic_shapes=shapes, external_data=False, verbose=False, optimize=True)


def _batch_two_runs(path: Path, args: tuple[torch.Tensor, ...], names: list[str]) -> None:
    """Raise if the exported model cannot run two rows at once (TorchScript may hard-code the batch)."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for n, a in zip(names, args, strict=True):
        arr = a.detach().cpu().numpy()
        feeds[n] = np.concatenate([arr[:1], arr[:1]]) if arr.ndim > 0 else arr
    sess.run(None, feeds)


def export_onnx(
    model: torch.nn.Module | torch.export.ExportedProgram | torch.jit.ScriptModule,
    example_args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    out_path: Path,
    dynamic_batch: bool = True,
) -> None:
    """Export `model` to one self-contained fp32 ONNX file at `out_path` (opset 18).

    Graph inputs are named `input_names`. The leading (batch) axis is dynamic when `dynamic_batch` and the
    model allows it; otherwise the model is exported for batch 1 (OnnxSession loops over larger batches).
    Nothing is left at `out_path` on failure. Raises ConversionError with one line on exporter failure.
    """
    import onnx
    import torch

    names = list(input_names)
    args = tuple(example_args)
    if len(names) != len(args):
        raise InputError(f"{len(names)} input names {names} for {len(args)} example inputs")
    if len(set(names)) != len(names):
        raise InputError(f"input names must be unique, got {names}")
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise InputError("example inputs must all be torch tensors")

    if isinstance(model, torch.export.ExportedProgram):
        kind = "program"
    elif isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        kind = "torchscript"
    elif isinstance(model, torch.nn.Module):
        kind = "module"
    else:
        raise TypeError(f"cannot export a {type(model).__name__}: expected nn.Module, ExportedProgram or "
                        "ScriptModule")

    out_path = Path(out_path)
    module = model if isinstance(model, torch.nn.Module) else None  # ScriptModule is an nn.Module too
    training = module is not None and module.training and _set_training(module, False)
    try:
        with tempfile.TemporaryDirectory(prefix="edgeship-export-") as td:
            raw = Path(td) / "model.onnx"
            _export(model, kind, args, names, raw, dynamic_batch and kind != "program")
            # Load with external data, whatever the exporter wrote, and keep it all in one file.
            proto = onnx.load(str(raw), load_external_data=True)
            strip_debug_info(proto)
            got = _graph_inputs(proto)
            if got != names:
                raise ConversionError(f"ONNX export failed: graph inputs {got} do not match input names {names}")
            save_self_contained(proto, out_path)
    finally:
        if module is not None and training:
            _set_training(module, True)
    log.info("exported %s to %s (opset %d, batch %s, %d bytes)", type(model).__name__, out_path.name,
             OPSET, _batch_dims(proto)[:1] or "-", out_path.stat().st_size)


def _set_training(module: torch.nn.Module, mode: bool) -> bool:
    """Switch train/eval (export wants eval: dropout off, batch-norm running stats); False if refused.

    `ExportedProgram.module()` refuses: its train/eval behaviour was fixed when it was exported.
    """
    try:
        module.train(mode)
    except NotImplementedError:
        log.debug("%s does not switch train/eval; exporting it as captured", type(module).__name__)
        return False
    return True


def _export(model: Any, kind: str, args: tuple[torch.Tensor, ...], names: list[str], raw: Path,
            dynamic: bool) -> None:
    """Export to `raw`: a dynamic batch first, else a static batch of 1, else the example's own batch."""
    if dynamic:
        try:
            _run_exporter(model, kind, args, names, raw, dynamic=True)
            if kind == "torchscript":
                _batch_two_runs(raw, args, names)
            return
        except Exception as e:
            why = describe_error(e)
            if why.startswith("unsupported operator"):
                raise ConversionError(f"ONNX export failed: {why}") from e  # a static batch will not help
            log.warning("export with a dynamic batch axis failed (%s); exporting for batch 1", why)
            _clear(raw.parent)
    # Batch 1 first; then the caller's own batch, which a module from ExportedProgram.module() may insist on.
    attempts = [args] if kind == "program" else [_first_rows(args)]
    if kind != "program" and any(a.dim() > 0 and a.shape[0] != 1 for a in args):
        attempts.append(args)
    for i, attempt in enumerate(attempts):
        try:
            _run_exporter(model, kind, attempt, names, raw, dynamic=False)
            if i:
                log.warning("exported with the example batch size fixed (%d rows)",
                            next(a.shape[0] for a in args if a.dim() > 0))
            return
        except Exception as e:
            _clear(raw.parent)
            if i + 1 < len(attempts):
                continue
            _raise_export_error(e)


def _clear(directory: Path) -> None:
    """Empty the export directory between attempts, so a failed attempt's files cannot be picked up."""
    for p in directory.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _raise_export_error(e: Exception) -> NoReturn:
    why = describe_error(e)
    if "Guard failed" in why:  # a module from ExportedProgram.module() checks its input shapes
        raise InputError(f"example inputs do not fit the shapes the model was exported for: "
                         f"{why.rsplit(': ', 1)[-1]}") from e
    raise ConversionError(f"ONNX export failed: {why}") from e
