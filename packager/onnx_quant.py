"""fp32 ONNX -> int8 ONNX with onnxruntime.quantization, driven by small named recipes.

Static recipes write QDQ (QuantizeLinear/DequantizeLinear around float ops; onnxruntime fuses them into
integer kernels). The QOperator format crashed on a conv bias here, so it is not offered. Dynamic recipes
quantize weights ahead of time and activations per batch at run time; they also quantize embedding tables
(Gather): PyTorch's dynamic quantization leaves those fp32 and stops at ~0.41x of a BERT's fp32 bytes, while
this reaches ~0.26x on the test encoder (int8 weights alone would be 0.25x).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.errors import EdgeshipError
from packager.errors import ConversionError, InputError
from packager.onnx_export import describe_error, save_self_contained, stdout_to_stderr, strip_debug_info

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

MAX_CALIB_ROWS = 256  # calibration rows used, evenly spaced over what was given
CALIB_BATCH = 32  # rows per calibration batch when the model's batch axis is dynamic
SENSITIVITY_ROWS = 32  # rows used to measure each node's quantization error
KEEP_FLOAT_KS = (1, 2, 4)
# 7-bit weights by default: x86 without VNNI (AVX2 only) sums u8 x s8 products in saturating 16 bits; `--target`
# picks 8-bit weights for devices that do not saturate (docs/packager.md).
REDUCE_RANGE = True


@dataclass(frozen=True)
class DeviceTarget:
    """The device family a build is for (`--target`): the weights' range and the architectures it may run on."""

    name: str
    reduce_range: bool  # 7-bit weights
    arch: tuple[str, ...]
    description: str

    @property
    def weight_bits(self) -> int:
        return 7 if self.reduce_range else 8

    def to_json(self) -> dict[str, object]:
        return {"device": self.name, "onnx_weight_bits": self.weight_bits}


TARGETS: dict[str, DeviceTarget] = {t.name: t for t in (
    DeviceTarget("any", True, ("x86_64", "aarch64"), "every CPU: 7-bit ONNX weights (safe on AVX2-only x86)"),
    DeviceTarget("x86-avx2", True, ("x86_64",), "x86 without VNNI: 7-bit ONNX weights (no 16-bit saturation)"),
    DeviceTarget("x86-vnni", False, ("x86_64",), "x86 with AVX-512 VNNI or AVX-VNNI: 8-bit ONNX weights"),
    DeviceTarget("arm", False, ("aarch64",), "64-bit Arm: 8-bit ONNX weights"),
)}
DEFAULT_TARGET = "any"
# x86 instructions that multiply u8 x s8 into 32 bits without the 16-bit saturating step (vpmaddubsw).
_NON_SATURATING_X86 = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def host_saturates(machine: str, cpu_flags: set[str] | frozenset[str]) -> bool:
    """True on x86 without VNNI/AMX: onnxruntime's u8 x s8 kernels there can saturate with 8-bit weights, so
    the host cannot measure an 8-bit artifact as a device that does not saturate would run it."""
    return machine.lower() in ("x86_64", "amd64", "i686", "i386") and not (set(cpu_flags) & _NON_SATURATING_X86)

# Node types whose weights or inputs the quantizer turns int8: the candidates for "keep in float".
_STATIC_NODE_TYPES = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather"})
_DYNAMIC_NODE_TYPES = frozenset({"Conv", "MatMul", "Gemm", "Gather", "Attention", "LSTM"})
# Dynamic mode has no Gemm kernel: onnxruntime rewrites every Gemm to MatMul+Add first (naming the MatMul
# "<gemm>_MatMul"), so classifier heads are quantized as MatMuls. "Gather" is what quantizes embeddings.
_DYNAMIC_OP_TYPES = ["MatMul", "Gemm", "Attention", "Gather", "EmbedLayerNormalization", "Conv", "LSTM"]

_INT_TYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


@dataclass(frozen=True)
class OnnxRecipe:
    """One way to quantize an fp32 ONNX model to int8 (weights are always symmetric int8).

    Static activations: "uint8" is asymmetric; "int8" is symmetric (asymmetric int8 would be the uint8
    grid shifted by 128, numerically identical). Dynamic recipes always have uint8 activations.
    """

    name: str  # short, unique, human readable, e.g. "static-minmax-perchannel-u8"
    mode: Literal["static", "dynamic"]
    per_channel: bool = True
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_type: Literal["uint8", "int8"] = "uint8"
    float_nodes: tuple[str, ...] = field(default=())  # node names kept in float (most sensitive layers)
    reduce_range: bool = REDUCE_RANGE  # 7-bit weights (False: 8-bit, for devices that do not saturate)

    def __post_init__(self) -> None:
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"recipe {self.name!r}: unknown mode {self.mode!r}")
        if self.calibration not in ("minmax", "entropy", "percentile"):
            raise ValueError(f"recipe {self.name!r}: unknown calibration {self.calibration!r}")
        if self.activation_type not in ("uint8", "int8"):
            raise ValueError(f"recipe {self.name!r}: unknown activation type {self.activation_type!r}")
        if self.mode == "dynamic" and self.activation_type != "uint8":
            raise ValueError(f"recipe {self.name!r}: onnxruntime's dynamic quantization only has uint8 activations")

    @classmethod
    def make(
        cls,
        mode: Literal["static", "dynamic"],
        per_channel: bool = True,
        calibration: Literal["minmax", "entropy", "percentile"] = "minmax",
        activation_type: Literal["uint8", "int8"] = "uint8",
        float_nodes: Sequence[str] = (),
        reduce_range: bool = REDUCE_RANGE,
    ) -> OnnxRecipe:
        """A recipe named after its settings ("-w8" when the weights use all 8 bits)."""
        gran = "perchannel" if per_channel else "pertensor"
        if mode == "static":
            name = f"static-{calibration}-{gran}-{'u8' if activation_type == 'uint8' else 's8'}"
        else:
            name = f"dynamic-{gran}"
        if float_nodes:
            name += f"-float{len(float_nodes)}"
        if not reduce_range:
            name += "-w8"
        return cls(name, mode, per_channel, calibration, activation_type, tuple(float_nodes), reduce_range)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "tool": "onnxruntime.quantization",
            "mode": self.mode,
            "format": "QDQ" if self.mode == "static" else "IntegerOps",
            "weight_type": "int8",
            "weight_bits": 7 if self.reduce_range else 8,
            "per_channel": self.per_channel,
            "calibration": self.calibration if self.mode == "static" else None,
            "activation_type": self.activation_type,
            "float_nodes": list(self.float_nodes),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OnnxRecipe:
        return cls(
            name=str(d["name"]),
            mode=d["mode"],
            per_channel=bool(d.get("per_channel", True)),
            calibration=d.get("calibration") or "minmax",
            activation_type=d.get("activation_type", "uint8"),
            float_nodes=tuple(str(n) for n in d.get("float_nodes", ())),
            reduce_range=d.get("weight_bits", 7) != 8,
        )


# ---------------------------------------------------------------- model inspection


@dataclass(frozen=True)
class _Input:
    name: str
    dtype: str  # numpy name
    batch: int | None  # fixed leading dim, None when dynamic (or rank 0)


def _load(path: Path, weights: bool = True) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=weights)
    except Exception as e:
        raise InputError(f"cannot read ONNX model {path}: {describe_error(e)}") from e


def _inputs(model: onnx.ModelProto) -> list[_Input]:
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        dims = tt.shape.dim
        batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        out.append(_Input(i.name, dtype, batch))
    return out


def first_recipe(fp32_path: Path, reduce_range: bool = REDUCE_RANGE) -> OnnxRecipe:
    """Static QDQ per-channel for float-input models; dynamic for integer-token-id (transformer) models."""
    inputs = _inputs(_load(Path(fp32_path), weights=False))
    if any(i.dtype in _INT_TYPES for i in inputs):
        return OnnxRecipe.make("dynamic", per_channel=True, reduce_range=reduce_range)
    return OnnxRecipe.make("static", per_channel=True, calibration="minmax", activation_type="uint8",
                           reduce_range=reduce_range)


def alternative_recipes(fp32_path: Path, calib: dict[str, np.ndarray], first: OnnxRecipe) -> list[OnnxRecipe]:
    """What an accuracy-aware tuner tries when `first` misses the gate, most promising first.

    One setting changed at a time (granularity, calibration, activation sign, static/dynamic), then `first`
    with its 1, 2 and 4 most sensitive nodes kept in float, measured with `sensitive_nodes`.
    """
    fp32_path = Path(fp32_path)
    rr = first.reduce_range
    cands: list[OnnxRecipe] = []
    if first.mode == "static":
        for cal in ("minmax", "entropy", "percentile"):
            if cal != first.calibration:
                cands.append(OnnxRecipe.make("static", first.per_channel, cal, first.activation_type, reduce_range=rr))
        cands.append(OnnxRecipe.make("static", not first.per_channel, first.calibration, first.activation_type,
                                     reduce_range=rr))
        other_sign: Literal["uint8", "int8"] = "int8" if first.activation_type == "uint8" else "uint8"
        cands.append(OnnxRecipe.make("static", first.per_channel, first.calibration, other_sign, reduce_range=rr))
        cands.append(OnnxRecipe.make("dynamic", per_channel=True, reduce_range=rr))
    else:
        cands.append(OnnxRecipe.make("dynamic", not first.per_channel, reduce_range=rr))
        cands.append(OnnxRecipe.make("static", True, "minmax", "uint8", reduce_range=rr))
        cands.append(OnnxRecipe.make("static", True, "percentile", "uint8", reduce_range=rr))

    try:
        errors = _sensitivity(fp32_path, calib, first)
    except (EdgeshipError, ValueError) as e:  # the other alternatives are still worth trying
        log.warning("could not rank nodes by sensitivity (%s): no keep-in-float recipes", e)
        errors = {}
    ranked = [n for n in sorted(errors, key=lambda n: errors[n], reverse=True) if errors[n] > 0]
    n_candidates = len(errors)
    for k in KEEP_FLOAT_KS:
        if k <= len(ranked) and k < n_candidates:  # keeping every quantizable node float is just fp32
            nodes = tuple(dict.fromkeys((*first.float_nodes, *ranked[:k])))
            cands.append(OnnxRecipe.make(first.mode, first.per_channel, first.calibration,
                                         first.activation_type, nodes, reduce_range=rr))

    seen = {first.name}
    out = []
    for r in cands:
        if r.name not in seen:
            seen.add(r.name)
            out.append(r)
    return out


# ---------------------------------------------------------------- quantization


def quantize(fp32_path: Path, recipe: OnnxRecipe, calib: dict[str, np.ndarray], out_path: Path) -> None:
    """Quantize `fp32_path` with `recipe` to one self-contained int8 .onnx file at `out_path` (atomically).

    `calib` maps input name -> rows (leading sample axis); static recipes calibrate on up to
    MAX_CALIB_ROWS of them. Raises ConversionError (one line) when onnxruntime's quantizer fails or
    produces a model onnxruntime cannot load, InputError when `calib` does not fit the model.
    """
    fp32_path = Path(fp32_path)
    with tempfile.TemporaryDirectory(prefix="edgeship-quant-") as td:
        tmp = Path(td)
        prepared = _prepare(fp32_path, tmp)
        model = _load(prepared)
        raw = tmp / "int8.onnx"
        _quantize_to(prepared, model, recipe, calib, raw, tmp)
        try:
            qmodel = _load(raw)
        except InputError as e:
            raise ConversionError(f"recipe {recipe.name}: the quantizer wrote no readable model ({e})") from e
        compact(qmodel)
        _check_loads(qmodel, recipe)
        save_self_contained(qmodel, Path(out_path))
    log.info("quantized %s with %s: %d -> %d bytes", fp32_path.name, recipe.name, fp32_path.stat().st_size,
             Path(out_path).stat().st_size)


def _quantize_to(
    prepared: Path,
    model: onnx.ModelProto,
    recipe: OnnxRecipe,
    calib: dict[str, np.ndarray],
    dst: Path,
    tmp: Path,
    nodes_to_quantize: Sequence[str] = (),
) -> None:
    """Run onnxruntime's quantizer with `recipe`'s settings, translating its failures."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    # Shape arithmetic (a detector's Resize scales computed from Shape) must stay exact: never quantized.
    exclude = _aliases((*recipe.float_nodes, *shape_nodes(model)), recipe.mode)
    only = _aliases(nodes_to_quantize, recipe.mode)
    try:
        if recipe.mode == "dynamic":
            with stdout_to_stderr():
                quantize_dynamic(
                    prepared, dst,
                    op_types_to_quantize=_DYNAMIC_OP_TYPES,
                    per_channel=recipe.per_channel,
                    weight_type=QuantType.QInt8,
                    reduce_range=recipe.reduce_range,
                    nodes_to_quantize=only or None,
                    nodes_to_exclude=exclude or None,
                    extra_options={"MatMulConstBOnly": True},
                )
            return
        cache = _calibration(prepared, model, calib, recipe.calibration, tmp)
        extra: dict[str, Any] = {
            # Norm layers' 1-D scales have only axis 0; the default axis 1 just warns and falls back.
            "QDQOpTypePerChannelSupportToAxis": {"LayerNormalization": 0, "InstanceNormalization": 0},
            # Asymmetric int8 activations are uint8 shifted by 128 (same grid, same error); the signed
            # recipe is the symmetric one that ARM and TensorRT-style int8 kernels prefer.
            "ActivationSymmetric": recipe.activation_type == "int8",
        }
        with stdout_to_stderr():
            quantize_static(
                prepared, dst, None,
                quant_format=QuantFormat.QDQ,
                per_channel=recipe.per_channel,
                activation_type=QuantType.QUInt8 if recipe.activation_type == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                reduce_range=recipe.reduce_range,
                nodes_to_quantize=only or None,
                nodes_to_exclude=exclude or None,
                calibrate_method=_calibration_method(recipe.calibration),
                extra_options=extra,
                calibration_cache_path=cache,
            )
    except (InputError, ConversionError):
        raise
    except Exception as e:
        raise ConversionError(f"onnxruntime quantizer failed with recipe {recipe.name}: {describe_error(e)}") from e


def _calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


# onnxruntime's entropy defaults (128 histogram bins for 128 quantized bins) leave KL divergence a single
# threshold to pick, the full range: byte for byte the MinMax model. 512 bins give it choices at a
# fraction of the cost of TensorRT's 2048 (~0.07 s instead of ~0.45 s per tensor).
_CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}
# Activation ranges depend only on the prepared model, the rows and the method, not on the rest of the
# recipe: the tuner's per-tensor, signed and keep-in-float variants reuse one calibration.
_RANGES: OrderedDict[str, bytes] = OrderedDict()
_RANGES_KEPT = 8


def _calibration(prepared: Path, model: onnx.ModelProto, calib: dict[str, np.ndarray], method: str,
                 tmp: Path) -> Path:
    """A calibration cache file (onnxruntime's JSON tensor ranges) in `tmp` for `quantize_static`."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    batches = _calib_batches(model, calib, MAX_CALIB_ROWS)
    h = hashlib.sha256(prepared.read_bytes())
    h.update(method.encode())
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(str(b[k].dtype).encode() + str(b[k].shape).encode())
            h.update(b[k].tobytes())
    key = h.hexdigest()
    out = tmp / f"ranges-{method}.json"
    if key in _RANGES:
        _RANGES.move_to_end(key)
        out.write_bytes(_RANGES[key])
        return out
    with stdout_to_stderr():
        calibrator = create_calibrator(
            prepared,
            sorted(set(QDQRegistry) | set(QLinearOpsRegistry)),  # what quantize_static calibrates by default
            augmented_model_path=str(tmp / "augmented.onnx"),
            calibrate_method=_calibration_method(method),
            extra_options=_CALIBRATOR_OPTIONS[method],
        )
        try:
            calibrator.collect_data(_Reader(batches))
            ranges = calibrator.compute_data()
        finally:
            del calibrator
    save_tensors_data(ranges, out)
    _RANGES[key] = out.read_bytes()
    while len(_RANGES) > _RANGES_KEPT:
        _RANGES.popitem(last=False)
    return out


def _aliases(nodes: Sequence[str], mode: str) -> list[str]:
    # Dynamic mode rewrites Gemm "x" to MatMul "x_MatMul" + Add before it quantizes.
    out = list(nodes)
    if mode == "dynamic":
        out += [f"{n}_MatMul" for n in nodes]
    return out


def _check_loads(model: onnx.ModelProto, recipe: OnnxRecipe) -> None:
    """Refuse an artifact onnxruntime cannot load (e.g. a kernel missing for a quantized op type)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ConversionError(f"recipe {recipe.name} produced a model onnxruntime cannot load: "
                              f"{describe_error(e)}") from e


def compact(model: onnx.ModelProto) -> None:
    """Drop what an int8 artifact does not need, in place; the computation is unchanged.

    On a ~150k-parameter CNN the graph around the weights is ~8% of the int8 file: per-node debug
    metadata, value_info shape annotations (onnxruntime infers them again) and the all-zero int32 zero
    points of bias DequantizeLinear nodes (zero is the default; onnxruntime still fuses the node group).
    """
    from onnx import numpy_helper

    strip_debug_info(model)
    del model.graph.value_info[:]
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 3:
            continue
        x, zp = inits.get(node.input[0]), inits.get(node.input[2])
        # Only int32 (bias): an int8/uint8 weight's zero point is what QLinearConv/QGemm fusion looks for.
        if x is not None and zp is not None and zp.data_type == 6 and not numpy_helper.to_array(zp).any():
            del node.input[2]
    used = {name for node in model.graph.node for name in node.input}
    used.update(o.name for o in model.graph.output)
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


# Prepared graphs by the sha256 of the fp32 file: the build, every recipe and the sensitivity ranking prepare the
# same model once.
_PREPARED: OrderedDict[str, bytes] = OrderedDict()
_PREPARED_KEPT = 2


def _prepare(fp32_path: Path, tmp: Path) -> Path:
    """The graph prepared for quantization (`packager/onnx_prepare.py`), written into `tmp`."""
    from packager.onnx_prepare import prepare

    out = tmp / "prepared.onnx"
    key = hashlib.sha256(Path(fp32_path).read_bytes()).hexdigest()
    if key in _PREPARED:
        _PREPARED.move_to_end(key)
        out.write_bytes(_PREPARED[key])
        return out
    prepare(Path(fp32_path), out)
    remember_prepared(fp32_path, out)
    return out


def remember_prepared(fp32_path: Path, prepared: Path) -> None:
    """Use `prepared` whenever `fp32_path`'s bytes are quantized (the build prepares once, with a check)."""
    _PREPARED[hashlib.sha256(Path(fp32_path).read_bytes()).hexdigest()] = Path(prepared).read_bytes()
    while len(_PREPARED) > _PREPARED_KEPT:
        _PREPARED.popitem(last=False)


def shape_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute on shapes: fed only by `Shape` outputs, constants and each other.

    Their float outputs are sizes and scales (a detector's `Resize` to another map's size); quantized, the
    upsampled map no longer matched the one it is added to and onnxruntime failed at run time.
    """
    inits = {i.name for i in model.graph.initializer}
    shape_tensors: set[str] = set()
    names: list[str] = []
    for node in model.graph.node:  # graph order is topological
        ins = [i for i in node.input if i]
        if node.op_type == "Shape" or (ins and all(i in shape_tensors or i in inits for i in ins)
                                       and any(i in shape_tensors for i in ins)):
            shape_tensors.update(node.output)
            if node.name and node.op_type != "Shape":
                names.append(node.name)
    return names


def emulation_session(path: Path, input_names: Sequence[str] | None = None) -> Any:
    """`path` (a QDQ int8 model) run op by op in float, graph optimisations off: DequantizeLinear, the float op,
    QuantizeLinear. That is what an exact, non-saturating int8 kernel computes (measured on a VNNI host: the fused
    int8 kernels and this agree to a relative squared error of 2e-6), so it scores 8-bit artifacts for devices
    that do not saturate on a host whose own kernels would. Returns an object with `run(feeds) -> [outputs]`;
    `input_names` rename the model's inputs positionally, as the runtime adapters do."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    own = [i.name for i in sess.get_inputs()]
    names = list(input_names) if input_names is not None else own
    batch_one = all((i.shape[:1] == [1]) for i in sess.get_inputs())

    class _Emulation:
        def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            arrays = [np.asarray(feeds[n]) for n in names]
            if not batch_one:
                return [np.asarray(o) for o in sess.run(None, dict(zip(own, arrays, strict=True)))]
            rows = [sess.run(None, {k: a[r:r + 1] for k, a in zip(own, arrays, strict=True)})
                    for r in range(len(arrays[0]))]
            return [np.concatenate([row[i] for row in rows]) for i in range(len(rows[0]))]

    return _Emulation()


# ---------------------------------------------------------------- calibration data


class _Reader:
    """onnxruntime CalibrationDataReader over prepared batches (duck-typed: it only calls get_next)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches
        self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def _fit_rows(model: onnx.ModelProto, calib: dict[str, np.ndarray], cap: int) -> tuple[dict[str, np.ndarray], int]:
    """`calib` cast to the model's input dtypes and subsampled (evenly spaced) to at most `cap` rows."""
    inputs = _inputs(model)
    missing = [i.name for i in inputs if i.name not in calib]
    if missing:
        raise InputError(f"calibration data has no input(s) {missing}; the model takes {[i.name for i in inputs]}")
    arrays: dict[str, np.ndarray] = {}
    for i in inputs:
        arr = np.asarray(calib[i.name])
        want = np.dtype(i.dtype)
        if arr.ndim == 0:
            raise InputError(f"calibration input {i.name!r} needs a leading sample axis, got a scalar")
        if (want.kind == "f") != (arr.dtype.kind == "f") or arr.dtype.kind not in "fiub":
            raise InputError(f"calibration input {i.name!r}: the model wants {i.dtype}, got {arr.dtype}")
        arrays[i.name] = arr.astype(want, copy=False)
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) != 1:
        raise InputError(f"calibration inputs disagree on the number of rows: "
                         f"{ {k: a.shape[0] for k, a in arrays.items()} }")
    n = rows.pop()
    if n == 0:
        raise InputError("calibration data has no rows")
    if n > cap:
        # Evenly spaced, not the first `cap`: calibration files are often sorted by class.
        idx = np.linspace(0, n - 1, cap).round().astype(np.int64)
        arrays = {k: a[idx] for k, a in arrays.items()}
        n = cap
    return arrays, n


def _calib_batches(model: onnx.ModelProto, calib: dict[str, np.ndarray], cap: int) -> list[dict[str, np.ndarray]]:
    """Calibration rows in batches the model accepts: its fixed batch size, or CALIB_BATCH when dynamic."""
    arrays, n = _fit_rows(model, calib, cap)
    fixed = {i.batch for i in _inputs(model) if i.batch is not None}
    if len(fixed) > 1:
        raise InputError(f"model inputs have different fixed batch sizes {sorted(fixed)}")
    batch = fixed.pop() if fixed else min(CALIB_BATCH, n)
    if n < batch:
        raise InputError(f"the model takes batches of {batch} rows; calibration data has only {n}")
    usable = n - n % batch
    return [{k: np.ascontiguousarray(a[s:s + batch]) for k, a in arrays.items()} for s in range(0, usable, batch)]


# ---------------------------------------------------------------- sensitivity


def _candidates(model: onnx.ModelProto, recipe: OnnxRecipe) -> list[str]:
    """Named nodes `recipe` would turn int8, in graph order, minus those it already keeps in float."""
    inits = {i.name for i in model.graph.initializer}
    types = _STATIC_NODE_TYPES if recipe.mode == "static" else _DYNAMIC_NODE_TYPES
    out = []
    for node in model.graph.node:
        if not node.name or node.op_type not in types or node.name in recipe.float_nodes:
            continue
        if node.op_type == "Gather" and node.input[0] not in inits:
            continue  # only embedding tables (constant data) are quantized
        if recipe.mode == "dynamic" and node.op_type in ("MatMul", "Gemm") and node.input[1] not in inits:
            continue  # dynamic mode quantizes only MatMuls with a constant weight
        out.append(node.name)
    return out


def sensitive_nodes(fp32_path: Path, calib: dict[str, np.ndarray], recipe: OnnxRecipe, k: int) -> list[str]:
    """Names of the `k` quantizable nodes whose quantization alone hurts the outputs most, worst first.

    Measured, not guessed: each candidate (Conv, MatMul, Gemm, embedding Gather, ...) is quantized on its
    own with `recipe`'s settings (static recipes share one calibration), and the relative squared error of
    the model outputs against fp32 is taken on up to SENSITIVITY_ROWS calibration rows. Nodes whose
    quantization changes nothing are never returned.
    """
    if k <= 0:
        return []
    errors = _sensitivity(Path(fp32_path), calib, recipe)
    return [n for n in sorted(errors, key=lambda n: errors[n], reverse=True) if errors[n] > 0][:k]


def _sensitivity(fp32_path: Path, calib: dict[str, np.ndarray], recipe: OnnxRecipe) -> dict[str, float]:
    """Output error with each candidate node quantized alone, by node name."""
    from agent.runtime.onnx_session import OnnxSession

    with tempfile.TemporaryDirectory(prefix="edgeship-sens-") as td:
        tmp = Path(td)
        prepared = _prepare(fp32_path, tmp)
        model = _load(prepared)
        cands = _candidates(model, recipe)
        if not cands:
            return {}
        rows, n = _fit_rows(model, calib, SENSITIVITY_ROWS)
        fixed = max((i.batch for i in _inputs(model) if i.batch is not None), default=1)
        if fixed > 1:  # a model fixed to batch B takes exactly B rows (batch 1 is looped by OnnxSession)
            if n < fixed:
                raise InputError(f"the model takes batches of {fixed} rows; calibration data has only {n}")
            rows = {k: a[:fixed] for k, a in rows.items()}
        ref = OnnxSession(prepared).run(rows)
        # Static candidates share one calibration (cached): its ranges cover every quantizable tensor.
        base = OnnxRecipe(recipe.name, recipe.mode, recipe.per_channel, recipe.calibration, recipe.activation_type,
                          reduce_range=recipe.reduce_range)
        errors: dict[str, float] = {}
        for i, node in enumerate(cands):
            dst = tmp / f"one-{i}.onnx"
            try:
                _quantize_to(prepared, model, base, calib, dst, tmp, nodes_to_quantize=[node])
                got = OnnxSession(dst).run(rows)
            except Exception as e:  # a node that cannot be quantized on its own is best kept float
                log.info("quantizing node %s alone failed (%s): ranking it most sensitive", node, describe_error(e))
                errors[node] = float("inf")
                continue
            finally:
                dst.unlink(missing_ok=True)
            errors[node] = _relative_error(ref, got)
    worst = sorted(errors.items(), key=lambda kv: kv[1], reverse=True)[:8]
    log.info("node sensitivity with %s: %s", recipe.name, ", ".join(f"{n}={e:.3g}" for n, e in worst))
    return errors


def _relative_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Mean over outputs of ||got - ref||^2 / ||ref||^2 (inverse signal-to-quantization-noise ratio)."""
    errs = []
    for r, g in zip(ref, got, strict=True):
        r64 = np.asarray(r, dtype=np.float64)
        g64 = np.asarray(g, dtype=np.float64)
        errs.append(float(np.sum((g64 - r64) ** 2) / max(float(np.sum(r64**2)), 1e-12)))
    return float(np.mean(errs)) if errs else 0.0
