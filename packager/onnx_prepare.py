"""Prepare an fp32 ONNX graph for onnxruntime's quantizer, the way onnxruntime recommends, and say what was done.

Graphs from other exporters often keep weights in `Constant` nodes and leave BatchNormalization unfused. The
quantizer only quantizes initializers ("Expected bias ... to be an initializer"), so such weights stayed fp32 and
every "int8" recipe came out larger than fp32 (issue 15). In order:

1. opset upgrade to 13 when lower (`onnx.version_converter`): per-channel QDQ needs DequantizeLinear's `axis`;
2. `Constant` nodes -> initializers (main graph);
3. BatchNormalization folded into the Conv before it (W' = W·γ/√(σ²+ε), b' = (b−μ)·γ/√(σ²+ε) + β) when that
   Conv feeds nothing else and every parameter is constant;
4. onnxruntime's `quant_pre_process`: symbolic shape inference, basic graph optimisation (constant folding and
   the fusions it knows), ONNX shape inference. Symbolic shape inference asserts on some graphs (dynamic H/W
   detectors): then it is skipped and ONNX shape inference is used, and the notes say so; if the optimiser fails
   too, ONNX shape inference alone;
5. with sample inputs, the prepared graph's outputs are compared with the original's; a graph that changed its
   outputs is not used (the model as given is quantized instead, and the notes say so).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packager.errors import InputError
from packager.onnx_export import describe_error, save_self_contained, stdout_to_stderr

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

MIN_OPSET = 13  # DequantizeLinear/QuantizeLinear `axis` (per-channel QDQ)
VERIFY_ROWS = 8
VERIFY_RTOL = 1e-3  # relative to the largest output magnitude: folding reorders float arithmetic only


@dataclass(frozen=True)
class Prepared:
    """What `prepare` did to a graph (recorded in the build report)."""

    path: Path
    opset_from: int
    opset_to: int
    constants_to_initializers: int
    batchnorms_fused: int
    shape_inference: str  # "symbolic" | "onnx" | "none"
    optimized: bool  # onnxruntime's basic graph optimisation ran
    notes: tuple[str, ...] = ()
    used: bool = True  # False: the prepared graph failed the output check; the model as given is quantized

    def to_json(self) -> dict[str, Any]:
        return {"opset_from": self.opset_from, "opset_to": self.opset_to,
                "constants_to_initializers": self.constants_to_initializers,
                "batchnorms_fused": self.batchnorms_fused, "shape_inference": self.shape_inference,
                "optimized": self.optimized, "used": self.used, "notes": list(self.notes)}

    def summary(self) -> str:
        parts = []
        if self.opset_to != self.opset_from:
            parts.append(f"opset {self.opset_from} -> {self.opset_to}")
        if self.constants_to_initializers:
            parts.append(f"{self.constants_to_initializers} Constant nodes -> initializers")
        if self.batchnorms_fused:
            parts.append(f"{self.batchnorms_fused} BatchNormalization fused")
        parts.append(f"{self.shape_inference} shape inference")
        if self.optimized:
            parts.append("onnxruntime basic optimisation")
        return ", ".join(parts) if self.used else "not used: " + "; ".join(self.notes)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """`model` converted to MIN_OPSET when it is older; unchanged (with a note) when the converter fails."""
    from onnx import version_converter

    have = default_opset(model)
    if have >= MIN_OPSET:
        return model
    try:
        out = version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:
        notes.append(f"opset {have} could not be upgraded to {MIN_OPSET} ({describe_error(e)}): per-channel "
                     "recipes may fail")
        return model
    out.ir_version = max(out.ir_version, 7)
    return out


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Replace the graph's tensor-valued `Constant` nodes by initializers of the same name, in place."""
    from onnx import numpy_helper

    keep, moved = [], 0
    for node in graph.node:
        tensor = _constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if tensor is None:
            keep.append(node)
            continue
        if tensor.name != node.output[0]:
            arr = numpy_helper.to_array(tensor)
            tensor = numpy_helper.from_array(arr, node.output[0])
        graph.initializer.append(tensor)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    from onnx import helper, numpy_helper

    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            t = type(value)()  # a TensorProto copy, so the node's own is untouched
            t.CopyFrom(value)
            return t
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            arr = np.asarray(value, dtype=np.float32 if "float" in attr.name else np.int64)
            return numpy_helper.from_array(arr, node.output[0])
    return None  # sparse or string constants stay nodes


def name_nodes(graph: onnx.GraphProto) -> int:
    """Give every unnamed node a unique name, in place (the quantizer keeps or excludes nodes by name)."""
    taken = {n.name for n in graph.node if n.name}
    named = 0
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            named += 1
    return named


def fuse_batchnorm(graph: onnx.GraphProto) -> int:
    """Fold inference-mode BatchNormalization into the Conv feeding it, in place; returns how many were fused."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    drop: set[int] = set()
    fused = 0
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or len(bn.input) != 5:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
        if attrs.get("training_mode", 0):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(conv.input) < 2 or conv.output[0] in graph_outputs:
            continue
        if consumers.get(conv.output[0], 0) != 1 or not all(n in inits for n in (*bn.input[1:], conv.input[1])):
            continue
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
            continue
        eps = float(attrs.get("epsilon", 1e-5))
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:])
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(w.shape[0])
        if not (gamma.shape == beta.shape == mean.shape == var.shape == b.shape == (w.shape[0],)):
            continue
        scale = gamma / np.sqrt(var + eps)
        new_w = (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        new_b = ((b - mean) * scale + beta).astype(np.float32)
        # New names: the old weights may be shared with another node.
        w_name, b_name = f"{conv.output[0]}_bnfused_W", f"{conv.output[0]}_bnfused_B"
        graph.initializer.extend([numpy_helper.from_array(new_w, w_name), numpy_helper.from_array(new_b, b_name)])
        inputs = [conv.input[0], w_name, b_name]
        del conv.input[:]
        conv.input.extend(inputs)
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        fused += 1
    if fused:
        keep = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(keep)
        used = {i for n in graph.node for i in n.input} | graph_outputs
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return fused


def _ort_pre_process(src: Path, dst: Path, notes: list[str]) -> tuple[str, bool]:
    """onnxruntime's quant_pre_process with fallbacks; returns (shape inference used, optimiser ran)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts: tuple[tuple[str, bool, dict[str, bool]], ...] = (("symbolic", True, {}),
                ("onnx", True, {"skip_symbolic_shape": True}),
                ("onnx", False, {"skip_symbolic_shape": True, "skip_optimization": True}))
    for shape, optimized, kwargs in attempts:
        try:
            # chdir: a failing symbolic shape inference saves sym_shape_infer_temp.onnx in the working directory
            with stdout_to_stderr(), contextlib.chdir(dst.parent):
                quant_pre_process(str(src), str(dst), **kwargs)
            return shape, optimized
        except Exception as e:
            dst.unlink(missing_ok=True)
            why = describe_error(e) or type(e).__name__
            if "skip_optimization" in kwargs:
                notes.append(f"onnxruntime's pre-processing failed ({why}): ONNX shape inference alone")
            elif kwargs:
                notes.append(f"onnxruntime's graph optimisation failed ({why}): skipped")
            else:
                notes.append(f"onnxruntime's symbolic shape inference failed ({why}): used ONNX shape inference")
    import onnx

    model = onnx.load(str(src))
    try:
        model = onnx.shape_inference.infer_shapes(model)
        shape = "onnx"
    except Exception as e:
        notes.append(f"ONNX shape inference failed too ({describe_error(e)})")
        shape = "none"
    save_self_contained(model, dst)
    return shape, False


def _max_error(a_path: Path, b_path: Path, feeds: dict[str, np.ndarray]) -> float:
    """Largest output difference between two models on `feeds`, relative to the first model's output scale."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    outs = []
    for p in (a_path, b_path):
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        outs.append(sess.run(None, {k: feeds[k] for k in names}))
    worst = 0.0
    for x, y in zip(*outs, strict=True):
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x64.shape != y64.shape:
            return float("inf")
        scale = max(1.0, float(np.max(np.abs(x64))) if x64.size else 1.0)
        worst = max(worst, float(np.max(np.abs(x64 - y64))) / scale if x64.size else 0.0)
    return worst


def prepare(src: Path, dst: Path, feeds: dict[str, np.ndarray] | None = None) -> Prepared:
    """Write `src` prepared for quantization to `dst` (one self-contained file) and return what was done.

    `feeds` (input name -> rows): when given, the prepared graph must reproduce `src`'s outputs on up to
    VERIFY_ROWS of them, else `src` itself is written to `dst` (`used` False, with the reason in `notes`).
    """
    import onnx

    src, dst = Path(src), Path(dst)
    try:
        model = onnx.load(str(src), load_external_data=True)
    except Exception as e:
        raise InputError(f"cannot read ONNX model {src}: {describe_error(e)}") from e
    notes: list[str] = []
    opset_from = default_opset(model)
    model = upgrade_opset(model, notes)
    opset_to = default_opset(model)
    moved = constants_to_initializers(model.graph)
    fused = fuse_batchnorm(model.graph)
    name_nodes(model.graph)
    with tempfile.TemporaryDirectory(prefix="edgeship-prep-") as td:
        staged = Path(td) / "staged.onnx"
        save_self_contained(model, staged)
        out = Path(td) / "prepared.onnx"
        shape, optimized = _ort_pre_process(staged, out, notes)
        prepared = onnx.load(str(out))
        used = True
        if feeds is not None:
            rows = {k: np.ascontiguousarray(v[:VERIFY_ROWS]) for k, v in feeds.items()}
            try:
                err = _max_error(src, out, rows)
            except Exception as e:  # the prepared graph does not even run: quantize the original
                err, why = float("inf"), describe_error(e)
            else:
                why = f"outputs differ by {err:.3g} of their scale"
            if not err <= VERIFY_RTOL:
                notes.append(f"the prepared graph was not used: {why}")
                used = False
                prepared = onnx.load(str(src), load_external_data=True)
        save_self_contained(prepared, dst)
    result = Prepared(dst, opset_from, opset_to, moved, fused, shape, optimized, tuple(notes), used)
    for note in notes:  # the build shows them as progress notes and in the report
        log.info("preparing %s: %s", src.name, note)
    log.info("prepared %s: %s", src.name, result.summary())
    return result
