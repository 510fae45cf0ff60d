"""Full-int8 TFLite from a PyTorch module: torch.export -> PT2E static int8 quantization -> litert-torch.

The PT2E quantizer leaves embedding tables (`aten.embedding`) in float32; for token models they are most of
the file. When the graph has embeddings, the converted flatbuffer gets one more pass through ai-edge-quantizer
that stores every float EMBEDDING_LOOKUP table as int8 with one scale per row, which LiteRT's hybrid
EMBEDDING_LOOKUP kernel reads directly (no float copy of the table at runtime).

litert-torch, torchao and the LiteRT converter are imported only when a conversion runs: they are heavy and
noisy at import time. Everything they raise is translated into one-line `ConversionError`s.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.fsutil import write_atomic
from packager.errors import ConversionError

logger = logging.getLogger(__name__)

# litert-torch prints a rich progress tree to sys.stdout unless this is off; stdout must stay clean for --json.
_PROGRESS_ENV = "LITERT_TORCH_SHOW_PROGRESS"

# Conversion flips process-wide state (env, fd 1, warning filters), so two conversions must not overlap.
_CONVERT_LOCK = threading.Lock()

_MAX_DETAIL = 300


class _DemoteToDebug(logging.Filter):
    """Re-log known-harmless third-party warnings at DEBUG on our logger instead of showing them."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self._fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(f in message for f in self._fragments):
            logger.debug("%s: %s", record.name, message)
            return False
        return True


class _DemoteLitertInfo(logging.Filter):
    """litert-torch logs per-op chatter ("Use JAX lowering: aten.mm") at INFO on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and f"{os.sep}litert_torch{os.sep}" in record.pathname:
            logger.debug("litert-torch: %s", record.getMessage())
            return False
        return True


_noise_filters_installed = False


def _install_noise_filters() -> None:
    """Demote known noise: torchao's optional CUDA/triton kernels, torch deprecations and export chatter."""
    global _noise_filters_installed
    if _noise_filters_installed:
        return
    logging.getLogger("torchao").addFilter(_DemoteToDebug("Failed to load"))
    logging.getLogger("torchao.kernel.intmm").addFilter(_DemoteToDebug("Detected no triton"))
    logging.getLogger("torch.utils._pytree").addFilter(_DemoteToDebug("is an Enum subclass"))
    # Logged by torch.export on data-dependent failures, which _describe() already reports.
    logging.getLogger("torch.fx.experimental.symbolic_shapes").addFilter(_DemoteToDebug("Unable to find user code"))
    _noise_filters_installed = True


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point fd 1 at fd 2 so nothing a converter prints (Python or C++) lands on our stdout."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (daemonised): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _quiet_conversion() -> Iterator[None]:
    """Silence litert-torch's progress printing and route Python warnings to logging for the duration."""
    previous = os.environ.get(_PROGRESS_ENV)
    os.environ[_PROGRESS_ENV] = "0"
    root_filter = _DemoteLitertInfo()
    logging.getLogger().addFilter(root_filter)
    try:
        with warnings.catch_warnings(record=True) as caught, _stdout_to_stderr():
            warnings.simplefilter("default")
            try:
                yield
            finally:
                for w in caught:
                    logger.debug("%s: %s", w.category.__name__, w.message)
    finally:
        logging.getLogger().removeFilter(root_filter)
        if previous is None:
            os.environ.pop(_PROGRESS_ENV, None)
        else:
            os.environ[_PROGRESS_ENV] = previous


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= _MAX_DETAIL else line[: _MAX_DETAIL - 3] + "..."
    return ""


def _describe(e: BaseException) -> str:
    """One line saying what went wrong, from the shapes of torch.export / litert-torch errors."""
    text = str(e)
    m = re.search(r"Lowering not found: (aten\.\w+)", text)
    if m:
        return f"operator {m.group(1)} is not supported by litert-torch"
    if "data-dependent" in text or "data dependent" in text:
        where = ""
        site = re.search(
            r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in \w+\s*\n\s*(.+)', text
        )
        if site:
            where = f" at {Path(site.group(1)).name}:{site.group(2)} ({site.group(3).strip()})"
        return f"the model has data-dependent control flow or shapes{where}; torch.export needs one static graph"
    line = _first_line(text)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _fail(stage: str, e: BaseException) -> ConversionError:
    logger.debug("TFLite conversion failed during %s", stage, exc_info=e)
    return ConversionError(f"TFLite conversion failed during {stage}: {_describe(e)}")


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Export in eval mode, then give the caller's module back in the mode it came in."""
    was_training = module.training
    try:
        module.eval()
        switched = True
    except NotImplementedError:
        # torch.export'ed GraphModules refuse eval(); their train/eval behaviour was fixed at export time.
        switched = False
    try:
        yield
    finally:
        if switched:
            module.train(was_training)


def _check_loadable(content: bytes) -> list[str]:
    """Load the flatbuffer in LiteRT (what the device will do); returns the I/O dtypes for the log."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    return [
        f"{d['name']}:{d['dtype'].__name__}"
        for d in [*interpreter.get_input_details(), *interpreter.get_output_details()]
    ]


def _has_embedding(graph_module: torch.fx.GraphModule) -> bool:
    return any(
        node.op == "call_function" and node.target is torch.ops.aten.embedding.default
        for node in graph_module.graph.nodes
    )


def _embedding_table_dtypes(content: bytes) -> list[str]:
    """dtype of the table (value) input of every EMBEDDING_LOOKUP op in a flatbuffer."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    dtypes = {int(d["index"]): np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}
    return [
        dtypes[int(op["inputs"][1])]
        for op in interpreter._get_ops_details()
        if op["op_name"] == "EMBEDDING_LOOKUP" and len(op["inputs"]) == 2
    ]


def _int8_embeddings(content: bytes) -> bytes:
    """Store float EMBEDDING_LOOKUP tables as per-row int8 (ai-edge-quantizer dynamic-range config).

    Every other op is left as litert-torch wrote it: the recipe names only EMBEDDING_LOOKUP, whose int8
    table feeds LiteRT's hybrid kernel (int8 table, float rows out).
    """
    from ai_edge_quantizer import qtyping, quantizer

    qt = quantizer.Quantizer(content)
    qt.add_dynamic_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.EMBEDDING_LOOKUP,
        num_bits=8,
        granularity=qtyping.QuantGranularity.CHANNELWISE,
    )
    # Its transformation step draws a tqdm bar on sys.stderr for models with 100+ tensors, whatever it is told.
    with contextlib.redirect_stderr(io.StringIO()):
        result = qt.quantize(enable_progress_bar=False, enable_progress_report=False)
    return bytes(result.quantized_model)


def _with_int8_embeddings(content: bytes) -> bytes:
    """`content` with int8 embedding tables, or `content` itself (and a warning) if that does not work.

    A size optimisation of a model that already converted: a failure here must not fail the conversion.
    """
    try:
        quantized = _int8_embeddings(content)
        tables = _embedding_table_dtypes(quantized)
    except Exception as e:
        logger.debug("int8 embedding quantization failed", exc_info=e)
        logger.warning("embedding tables stay float32: int8 embedding quantization failed: %s", _describe(e))
        return content
    if "float32" in tables:
        logger.warning("some embedding tables stay float32 (EMBEDDING_LOOKUP tables: %s)", ", ".join(tables))
    logger.debug("embedding tables: %s (%d -> %d bytes)", ", ".join(tables), len(content), len(quantized))
    return quantized


def _as_args(batch: Any) -> tuple[Any, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    return tuple(batch)


def _convert(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    calib_batches: Iterable[tuple[torch.Tensor, ...]],
    per_channel: bool,
) -> bytes:
    _install_noise_filters()
    try:
        import litert_torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        raise ConversionError(
            f"TFLite conversion needs litert-torch and torchao (install edgeship[packager]): {e}"
        ) from e

    # torch.export prints the partial graph of a failed export to sys.stderr; keep it for --verbose only.
    export_stderr = io.StringIO()
    with _eval_mode(module):
        try:
            with contextlib.redirect_stderr(export_stderr):
                exported = torch.export.export(module, args, strict=False).module()
        except Exception as e:
            raise _fail("torch.export", e) from e
        finally:
            if export_stderr.getvalue().strip():
                logger.debug("torch.export stderr:\n%s", export_stderr.getvalue().rstrip())

    has_embedding = _has_embedding(exported)
    try:
        # Drops dropout / switches batchnorm in case the graph was exported from a model in training mode.
        move_exported_model_to_eval(exported)
        quantizer = PT2EQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=False)
        )
        prepared = prepare_pt2e(exported, quantizer)
    except Exception as e:
        raise _fail("int8 quantization", e) from e

    n_batches = 0
    with torch.no_grad():
        for batch in calib_batches:
            try:
                prepared(*_as_args(batch))
            except Exception as e:
                raise _fail(f"calibration (batch {n_batches})", e) from e
            n_batches += 1
    if n_batches == 0:
        raise ConversionError("TFLite conversion failed: no calibration batches were given")

    try:
        quantized = convert_pt2e(prepared, fold_quantize=False)
    except Exception as e:
        raise _fail("int8 quantization", e) from e
    # litert-torch warns about modules left in training mode; this graph is already in eval form.
    quantized.training = False

    try:
        edge_model = litert_torch.convert(quantized, args, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        content = bytes(edge_model.model_content())
    except Exception as e:
        raise _fail("litert-torch conversion", e) from e

    if has_embedding:
        content = _with_int8_embeddings(content)

    try:
        io_dtypes = _check_loadable(content)
    except Exception as e:
        raise _fail("loading the converted model in LiteRT", e) from e
    logger.debug("TFLite model I/O: %s (calibrated on %d batches)", ", ".join(io_dtypes), n_batches)
    return bytes(content)


def convert_int8_tflite(
    module: torch.nn.Module,
    example_args: tuple[torch.Tensor, ...],
    calib_batches: Iterable[tuple[torch.Tensor, ...]],
    out_path: Path,
    per_channel: bool = True,
) -> None:
    """Write a full-int8 TFLite model of `module` to `out_path` (atomically; nothing is left on failure).

    `module` is an nn.Module or the GraphModule of `torch.export.load(p).module()`. `example_args` and every
    calibration batch are batch-1 tuples of positional arguments; the TFLite signature names them args_0,
    args_1, ... in that order. Float inputs become int8 with their scale/zero-point; integer inputs (token
    ids) stay integer, int64 narrowed to int32. An nn.Module is switched to eval mode for the conversion and
    restored afterwards. Raises ConversionError with one line on any failure.
    """
    out_path = Path(out_path)
    args = _as_args(example_args)
    start = time.monotonic()
    with _CONVERT_LOCK, _quiet_conversion():
        content = _convert(module, args, calib_batches, per_channel)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out_path, content)
    except OSError as e:
        raise ConversionError(f"TFLite conversion failed: cannot write {out_path}: {e.strerror or e}") from e
    logger.info("wrote int8 TFLite model %s (%d bytes) in %.1f s", out_path, len(content), time.monotonic() - start)
