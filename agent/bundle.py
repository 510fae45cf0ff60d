"""The bundle format: one definition, used by the packager to write and by the agent to read.

A bundle is an uncompressed POSIX ustar archive of flat, plain regular files. `manifest.json` comes first and
records the sha256 and size of every other member, so a reader can bound and check each member before trusting it.
The reader parses the ustar headers itself rather than through `tarfile`: every member must be one ustar header
followed by its bytes, so sparse files, pax and GNU extension records (which let a small file declare a huge or
renamed member) are refused, and the bytes extraction writes never exceed the bundle file's own size. Reading also
refuses absolute paths, `..`, directories, links, device files, duplicate or unlisted members and sizes beyond the
manifest; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from agent.errors import BundleRejected
from agent.fsutil import fsync_dir

if TYPE_CHECKING:
    import numpy as np

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GOLDEN_FILE = "golden.npz"  # the golden set: inputs and each format's expected outputs (golden_*_key)
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_DEPTH = 32  # nesting of objects/arrays; the packager writes 5 at most
MAX_VERSION = (1 << 53) - 1  # versions survive a round trip through any JSON reader (IEEE doubles)
MAX_DIMENSION = 1 << 31
MAX_RANK = 16
MAX_MEMBERS = 1024  # manifest.json included; the headers are all read (and kept) before any member is
MAX_MEMBER_BYTES = 8**11 - 1  # the largest size a ustar header holds (11 octal digits)
# numpy dtype names a manifest's tensors may use: what onnxruntime and LiteRT take and the OIP codec carries.
TENSOR_DTYPES = frozenset({
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64",
})
_INT_RANGES = {
    f"{sign}int{bits}": ((0, (1 << bits) - 1) if sign else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1))
    for sign in ("", "u") for bits in (8, 16, 32, 64)
}
DEFAULT_MAX_BUNDLE_BYTES = 2 << 30
# The largest batch (first dimension) one inference request may carry when the manifest does not say.
DEFAULT_MAX_BATCH = 64
MAX_BATCH_LIMIT = 65536
TASKS = ("classification", "regression", "embedding")
FORMATS = {"onnx": "onnxruntime", "tflite": "litert"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_MEMBER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # fits a ustar name field: no extension record
_HASH_CHUNK = 1 << 20
# Class names and preprocessing (issue 15): bounds a hostile manifest cannot exceed (the 1 MiB manifest bounds the
# total too).
MAX_LABELS = 65536
MAX_LABEL_CHARS = 256
MAX_CHANNELS = 4096  # entries of a per-channel mean or std
MAX_RAW_SIDE = 8192  # the largest height or width a client may send an input that the device resizes
LAYOUTS = ("NCHW", "NHWC")
RESIZE_METHODS = ("nearest", "bilinear")
SCORES = ("softmax", "raw")
RAW_DTYPES = ("uint8", "float32")


def valid_name(name: str) -> bool:
    """Bundle names go into file names and MQTT topics: lowercase, digits, `.`, `_`, `-`."""
    return bool(_NAME_RE.match(name))


def bundle_filename(name: str, version: int) -> str:
    return f"{name}-{version}.bundle"


def golden_input_key(name: str) -> str:
    """The golden set's array for the model input `name` (rows along the first axis)."""
    return f"input.{name}"


def golden_output_key(fmt: str, i: int) -> str:
    """The golden set's expected output `i` of artifact format `fmt` ("onnx", "tflite"), as the packager ran it."""
    return f"{fmt}.output.{i}"


def read_golden_rows(release: Path, manifest: Manifest, fmt: str, rows: int
                     ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The first `rows` golden inputs (by the manifest's input names) and `fmt`'s expected outputs (outputs 0, 1, ...
    while present; an empty list when the set has none for `fmt`) from the extracted bundle in `release`.
    BundleRejected("parity") when the file is unreadable or an input is missing. Never unpickles."""
    import zipfile

    import numpy as np

    path = release / GOLDEN_FILE
    try:
        with np.load(path, allow_pickle=False) as g:
            inputs = {t.name: g[golden_input_key(t.name)][:rows] for t in manifest.inputs}
            outputs: list[np.ndarray] = []
            while golden_output_key(fmt, len(outputs)) in g.files:
                outputs.append(g[golden_output_key(fmt, len(outputs))][:rows])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise BundleRejected(f"cannot read the golden rows of {path}: {e}", reason="parity") from e
    return inputs, outputs


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the caller sees it, plus the artifact's own int8 quantization if any.

    `shape` uses -1 for a dynamic dimension. `dtype` is the numpy dtype name the caller sends or receives
    (float32 for quantized tensors). `scale`/`zero_point` are set when the artifact's tensor is int8/uint8
    and the adapter converts (the TFLite full-int8 case).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None
    quantized_dtype: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.scale is not None:
            out.update(scale=self.scale, zero_point=self.zero_point, quantized_dtype=self.quantized_dtype)
        return out

    @classmethod
    def from_json(cls, d: dict[str, object]) -> TensorSpec:
        shape = d["shape"]
        if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
            raise ValueError(f"tensor {d.get('name')!r}: shape must be a list of integers")
        scale = d.get("scale")
        zp = d.get("zero_point")
        qd = d.get("quantized_dtype")
        return cls(
            name=str(d["name"]),
            shape=tuple(shape),
            dtype=str(d["dtype"]),
            scale=float(scale) if isinstance(scale, (int, float)) else None,
            zero_point=int(zp) if isinstance(zp, int) else None,
            quantized_dtype=str(qd) if qd is not None else None,
        )


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Preprocessing:
    """What the device does to one input before the model sees it (manifest `preprocessing` with an `input`).

    A client sends the input raw: in `layout` (NCHW or NHWC), any numeric datatype (`dtype` is what it is told to
    send), of any height and width when `resize` is set. The device computes `(x * scale - mean[c]) / std[c]` per
    channel c (a single mean/std applies to every channel), resizes to the model's height and width (`nearest`, or
    `bilinear` with half-pixel centres) and transposes to `model_layout`, then feeds float32. Pure data:
    agent/preprocess.py applies it."""

    input: str
    layout: str = "NCHW"
    model_layout: str = "NCHW"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: str | None = None
    dtype: str = "float32"

    @property
    def image(self) -> bool:
        """Needs a 4-D image input (a layout change, a resize or per-channel statistics)."""
        return self.layout != self.model_layout or self.resize is not None or max(len(self.mean), len(self.std)) > 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input": self.input, "layout": self.layout, "model_layout": self.model_layout,
                               "scale": self.scale, "mean": list(self.mean), "std": list(self.std),
                               "dtype": self.dtype}
        if self.resize is not None:
            out["resize"] = self.resize
        return out


@dataclass(frozen=True)
class Labels:
    """Class names for one classification output (manifest `labels`): `names[i]` is class index i. `scores`:
    `softmax` (the output holds logits: the device reports softmax probabilities) or `raw` (reported as the model
    gives them, e.g. probabilities already)."""

    output: str
    names: tuple[str, ...]
    scores: str = "softmax"

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "names": list(self.names), "scores": self.scores}


@dataclass(frozen=True)
class Artifact:
    """One runnable model file in the bundle and what the packager measured for it."""

    format: str  # "onnx" | "tflite"
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    recipe: Mapping[str, Any]
    metric_value: float
    drop: float
    host_p50_ms: float
    host_p95_ms: float

    @property
    def runtime(self) -> str:
        return FORMATS[self.format]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "runtime": self.runtime,
            "file": self.file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "recipe": dict(self.recipe),
            "metric_value": self.metric_value,
            "drop": self.drop,
            "host_p50_ms": self.host_p50_ms,
            "host_p95_ms": self.host_p95_ms,
        }


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    task: str
    created: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    artifacts: tuple[Artifact, ...]
    metric: str
    fp32_metric_value: float
    max_drop: float
    parity: Mapping[str, Any]
    latency_budget_ms: float
    target: Mapping[str, Any]
    preprocessing: Mapping[str, Any]
    provenance: Mapping[str, Any]
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    max_batch: int = DEFAULT_MAX_BATCH  # the agent answers requests with a larger first dimension 413
    labels: Labels | None = None  # class names for a classification output; None: indices only

    @cached_property
    def preprocess(self) -> Preprocessing | None:
        """The declared preprocessing (validated when the manifest was read), or None: inputs are fed as sent."""
        return preprocessing_from_json(self.preprocessing, self.inputs) if "input" in self.preprocessing else None

    def artifact(self, fmt: str) -> Artifact:
        for a in self.artifacts:
            if a.format == fmt:
                return a
        raise KeyError(fmt)

    def with_files(self, files: Mapping[str, FileEntry]) -> Manifest:
        return replace(self, files=dict(files))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "created": self.created,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "artifacts": [a.to_json() for a in self.artifacts],
            "accuracy": {
                "metric": self.metric,
                "fp32": self.fp32_metric_value,
                "max_drop": self.max_drop,
                "int8": {a.format: {"value": a.metric_value, "drop": a.drop} for a in self.artifacts},
            },
            "parity": dict(self.parity),
            "latency_budget_ms": self.latency_budget_ms,
            "max_batch": self.max_batch,
            "target": dict(self.target),
            "preprocessing": dict(self.preprocessing),
            **({"labels": self.labels.to_json()} if self.labels is not None else {}),
            "provenance": dict(self.provenance),
            "files": {k: {"sha256": v.sha256, "bytes": v.bytes} for k, v in sorted(self.files.items())},
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_json(cls, d: Any) -> Manifest:
        """Validate and parse a manifest; any problem raises BundleRejected(reason="manifest")."""
        try:
            return _parse_manifest(d)
        except BundleRejected:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise BundleRejected(f"invalid manifest: {detail}", reason="manifest") from e


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise BundleRejected(f"invalid manifest: {message}", reason="manifest")


def _number(v: Any, what: str) -> float:
    _require(isinstance(v, (int, float)) and not isinstance(v, bool), f"{what} must be a number")
    try:
        f = float(v)  # JSON's 1e400 reads as inf; an integer such as 10**400 does not fit a float at all
    except OverflowError:
        f = math.inf
    _require(math.isfinite(f), f"{what} must be finite, got {_short(v)}")
    return f


def _integer(v: Any, what: str, low: int, high: int) -> int:
    _require(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high,
             f"{what} must be an integer from {low} to {high}, got {_short(v)}")
    return int(v)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (a hostile value may be deep)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, depth)
            if depth > MAX_MANIFEST_DEPTH:
                break
            stack.extend((v, depth + 1) for v in value)
    return deepest


def _mapping(v: Any, what: str) -> dict[str, Any]:
    _require(isinstance(v, dict), f"{what} must be an object")
    return dict(v)


def _tensors(v: Any, what: str) -> tuple[TensorSpec, ...]:
    _require(isinstance(v, list) and len(v) > 0, f"{what} must be a non-empty list")
    return tuple(_tensor(_mapping(t, what), what) for t in v)


def _tensor(t: dict[str, Any], what: str) -> TensorSpec:
    name = t["name"]
    _require(isinstance(name, str) and 0 < len(name) <= 256, f"{what}: tensor name must be a string of 1..256")
    where = f"{what} {name!r}"
    shape = t["shape"]
    _require(isinstance(shape, list) and len(shape) <= MAX_RANK, f"{where}: shape must be a list of at most "
             f"{MAX_RANK} dimensions")
    for dim in shape:  # -1 is a dynamic dimension
        _require(dim == -1 or (isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim <= MAX_DIMENSION),
                 f"{where}: a dimension must be -1 or an integer from 0 to {MAX_DIMENSION}, got {_short(dim)}")
    _require(t["dtype"] in TENSOR_DTYPES, f"{where}: dtype {_short(t['dtype'])} is not one of "
             f"{', '.join(sorted(TENSOR_DTYPES))}")
    quant = [t.get(k) for k in ("scale", "zero_point", "quantized_dtype")]
    if any(q is not None for q in quant):
        scale, zero_point, qdtype = quant
        low_high = _INT_RANGES.get(qdtype) if isinstance(qdtype, str) else None
        _require(low_high is not None, f"{where}: quantized_dtype must be an integer dtype, got {_short(qdtype)}")
        assert low_high is not None
        _require(_number(scale, f"{where} scale") > 0, f"{where}: scale must be positive")
        _integer(zero_point, f"{where} zero_point", *low_high)
    return TensorSpec.from_json(t)


def _parse_manifest(d: Any) -> Manifest:
    _require(_depth(d) <= MAX_MANIFEST_DEPTH, f"nested more than {MAX_MANIFEST_DEPTH} levels deep")
    d = _mapping(d, "manifest")
    _require(d.get("schema") == SCHEMA_VERSION, f"unsupported schema {_short(d.get('schema'))}")
    name = d["name"]
    _require(isinstance(name, str) and valid_name(name), f"bad name {_short(name)}")
    version = _integer(d["version"], "version", 1, MAX_VERSION)
    _require(isinstance(d["created"], str) and len(d["created"]) <= 64, "created must be a string (ISO 8601)")
    _require(d["task"] in TASKS, f"task must be one of {', '.join(TASKS)}")
    files_raw = _mapping(d["files"], "files")
    _require(len(files_raw) < MAX_MEMBERS, f"files lists more than {MAX_MEMBERS - 1} members")
    files: dict[str, FileEntry] = {}
    for member, entry in files_raw.items():
        _require(isinstance(member, str) and bool(_MEMBER_RE.match(member)) and member != MANIFEST,
                 f"unsafe member name {_short(member)}")
        e = _mapping(entry, f"files[{member}]")
        digest, size = e["sha256"], e["bytes"]
        _require(isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) is not None,
                 f"files[{member}].sha256 is not a sha256 hex digest")
        files[member] = FileEntry(digest, _integer(size, f"files[{member}].bytes", 0, MAX_MEMBER_BYTES))
    artifacts = []
    _require(isinstance(d["artifacts"], list) and len(d["artifacts"]) > 0, "artifacts must be a non-empty list")
    for raw in d["artifacts"]:
        a = _mapping(raw, "artifact")
        _require(a["format"] in FORMATS, f"unknown artifact format {_short(a['format'])}")
        _require(a["file"] in files, f"artifact file {_short(a['file'])} is not listed in files")
        artifacts.append(Artifact(
            format=a["format"], file=a["file"],
            inputs=_tensors(a["inputs"], "artifact inputs"), outputs=_tensors(a["outputs"], "artifact outputs"),
            recipe=_mapping(a["recipe"], "recipe"), metric_value=_number(a["metric_value"], "metric_value"),
            drop=_number(a["drop"], "drop"), host_p50_ms=_number(a["host_p50_ms"], "host_p50_ms"),
            host_p95_ms=_number(a["host_p95_ms"], "host_p95_ms"),
        ))
    _require(len({a.format for a in artifacts}) == len(artifacts), "two artifacts share a format")
    acc = _mapping(d["accuracy"], "accuracy")
    # optional: bundles written before it existed read as the default
    max_batch = _integer(d.get("max_batch", DEFAULT_MAX_BATCH), "max_batch", 1, MAX_BATCH_LIMIT)
    latency_budget_ms = _number(d["latency_budget_ms"], "latency_budget_ms")
    _require(latency_budget_ms > 0, f"latency_budget_ms must be positive, got {latency_budget_ms!r}")
    inputs, outputs = _tensors(d["inputs"], "inputs"), _tensors(d["outputs"], "outputs")
    preprocessing = _mapping(d["preprocessing"], "preprocessing")
    if "input" in preprocessing:  # structured: every key checked (older manifests hold a free-form note)
        preprocessing_from_json(preprocessing, inputs)
    labels = labels_from_json(d["labels"], outputs) if "labels" in d else None
    return Manifest(
        name=name, version=version, task=d["task"], created=d["created"],
        inputs=inputs, outputs=outputs, labels=labels,
        artifacts=tuple(artifacts), metric=str(acc["metric"]),
        fp32_metric_value=_number(acc["fp32"], "accuracy.fp32"), max_drop=_number(acc["max_drop"], "max_drop"),
        parity=_mapping(d["parity"], "parity"),
        latency_budget_ms=latency_budget_ms,
        target=_mapping(d["target"], "target"), preprocessing=preprocessing,
        provenance=_mapping(d["provenance"], "provenance"), files=files, max_batch=max_batch,
    )


_PREPROCESS_KEYS = frozenset({"input", "layout", "model_layout", "scale", "mean", "std", "resize", "dtype", "note"})


def preprocessing_from_json(p: Mapping[str, Any], inputs: tuple[TensorSpec, ...]) -> Preprocessing:
    """The structured `preprocessing` section, checked against the model's inputs; BundleRejected("manifest").

    Unknown keys are refused: an agent that does not know a step must not serve the model without it."""
    unknown = sorted(str(k) for k in p if k not in _PREPROCESS_KEYS)
    _require(not unknown, f"preprocessing: unknown key(s) {_short(unknown)}")
    name = p["input"]
    spec = next((t for t in inputs if t.name == name), None)
    _require(spec is not None, f"preprocessing.input {_short(name)} is not one of the model's inputs")
    assert spec is not None
    _require(spec.dtype in ("float16", "float32", "float64"),
             f"preprocessing.input {name!r} is {spec.dtype}; preprocessing feeds float inputs only")
    layout, model_layout = p.get("layout", "NCHW"), p.get("model_layout", "NCHW")
    _require(layout in LAYOUTS and model_layout in LAYOUTS,
             f"preprocessing layout and model_layout must be one of {', '.join(LAYOUTS)}")
    scale = _number(p.get("scale", 1.0), "preprocessing.scale")
    _require(scale != 0, "preprocessing.scale must not be 0")
    stats = {}
    for key, default in (("mean", [0.0]), ("std", [1.0])):
        v = p.get(key, default)
        _require(isinstance(v, list) and 1 <= len(v) <= MAX_CHANNELS,
                 f"preprocessing.{key} must be a list of 1 to {MAX_CHANNELS} numbers")
        stats[key] = tuple(_number(x, f"preprocessing.{key}") for x in v)
    _require(all(s > 0 for s in stats["std"]), "preprocessing.std values must be positive")
    resize = p.get("resize")
    _require(resize is None or resize in RESIZE_METHODS,
             f"preprocessing.resize must be one of {', '.join(RESIZE_METHODS)}, got {_short(resize)}")
    dtype = p.get("dtype", "float32")
    _require(dtype in RAW_DTYPES, f"preprocessing.dtype must be one of {', '.join(RAW_DTYPES)}")
    note = p.get("note")
    _require(note is None or (isinstance(note, str) and len(note) <= 1024), "preprocessing.note must be a string")
    out = Preprocessing(name, layout, model_layout, scale, stats["mean"], stats["std"], resize, dtype)
    channels = max(len(out.mean), len(out.std))
    if out.image:
        _require(len(spec.shape) == 4, f"preprocessing of {name!r} (layout, resize or per-channel statistics) "
                 f"needs a 4-D image input, the model's has shape {list(spec.shape)}")
        c = spec.shape[1] if model_layout == "NCHW" else spec.shape[3]
        _require(min(len(out.mean), len(out.std)) in (1, channels),
                 "preprocessing.mean and std must have one value or one per channel each")
        _require(channels == 1 or c in (-1, channels),
                 f"preprocessing has {channels} channel statistics, input {name!r} has {c} channels")
    if resize is not None:
        h, w = (spec.shape[2], spec.shape[3]) if model_layout == "NCHW" else (spec.shape[1], spec.shape[2])
        _require(h > 0 and w > 0, f"preprocessing.resize needs a fixed height and width, input {name!r} has "
                 f"shape {list(spec.shape)}")
    return out


def labels_from_json(v: Any, outputs: tuple[TensorSpec, ...]) -> Labels:
    d = _mapping(v, "labels")
    unknown = sorted(str(k) for k in d if k not in ("output", "names", "scores"))
    _require(not unknown, f"labels: unknown key(s) {_short(unknown)}")
    out = next((t for t in outputs if t.name == d["output"]), None)
    _require(out is not None, f"labels.output {_short(d['output'])} is not one of the model's outputs")
    assert out is not None
    names = d["names"]
    _require(isinstance(names, list) and 1 <= len(names) <= MAX_LABELS,
             f"labels.names must be a list of 1 to {MAX_LABELS} strings")
    for i, n in enumerate(names):
        _require(isinstance(n, str) and 0 < len(n) <= MAX_LABEL_CHARS and n.isprintable(),
                 f"labels.names[{i}] must be a printable string of 1 to {MAX_LABEL_CHARS} characters, got {_short(n)}")
    classes = math.prod(out.shape[1:]) if out.shape[1:] and all(s > 0 for s in out.shape[1:]) else -1
    _require(classes in (-1, len(names)), f"labels.names has {len(names)} names, output {out.name!r} has {classes} "
             "classes")
    scores = d.get("scores", "softmax")
    _require(scores in SCORES, f"labels.scores must be one of {', '.join(SCORES)}")
    return Labels(out.name, tuple(names), scores)


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and validate manifest.json's bytes; any problem raises BundleRejected (reason `manifest`, or
    `too_large` beyond MAX_MANIFEST_BYTES)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleRejected(f"manifest larger than {MAX_MANIFEST_BYTES} bytes", reason="too_large")
    try:
        obj = json.loads(raw, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except RecursionError as e:  # the size bound still allows ~1M levels of [[[...
        raise BundleRejected(f"invalid manifest: nested more than {MAX_MANIFEST_DEPTH} levels deep",
                             reason="manifest") from e
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of more than 4300 digits, the hooks below
        raise BundleRejected(f"manifest.json is not valid JSON: {e}", reason="manifest") from e
    return Manifest.from_json(obj)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # a key given twice could mean one thing to this reader and another to the next one
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {_short(key)} appears twice in one object")
        seen.add(key)
    return dict(pairs)


# --- writing -----------------------------------------------------------------------------------------------


def write_bundle(out_path: Path, manifest: Manifest, members: Mapping[str, Path]) -> Manifest:
    """Write `out_path` atomically: the manifest (with every member's hash and size) first, then the members.

    Returns the manifest as written. On any failure nothing is left at `out_path` or beside it.
    """
    for member in members:
        if not _MEMBER_RE.match(member) or member == MANIFEST:
            raise ValueError(f"unsafe bundle member name {member!r}")
    files = {m: FileEntry(sha256_file(p), p.stat().st_size) for m, p in members.items()}
    for member, entry in files.items():
        if entry.bytes > MAX_MEMBER_BYTES:
            raise ValueError(f"bundle member {member!r} is {entry.bytes} bytes, more than a ustar member holds")
    final = manifest.with_files(files)
    manifest_bytes = final.to_bytes()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent)
    tmp = Path(tmp_name)
    try:
        # ustar, not pax: every member is one plain header, as the reader requires (byte-identical to what
        # PAX_FORMAT wrote for these names and sizes)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            tar.addfile(_tarinfo(MANIFEST, len(manifest_bytes)), io.BytesIO(manifest_bytes))
            for member, path in sorted(members.items()):
                with path.open("rb") as f:
                    tar.addfile(_tarinfo(member, files[member].bytes), f)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so the same inputs give the same bytes (reproducible bundles).
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = size, 0o644, 0, 0, 0
    info.uname = info.gname = ""
    return info


# --- reading -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: Manifest
    bytes: int


_BLOCK = 512
_USTAR_MAGICS = (b"ustar\x0000", b"ustar  \x00")  # POSIX (what write_bundle writes) and GNU
_PLAIN_TYPES = (b"0", b"\x00")
# Records that are files to tarfile but not plain: refused as `unsafe_path` (they point elsewhere or are no file)
_NOT_FILES = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
              b"5": "a directory", b"6": "a FIFO"}
# ... and as `unsafe_member`: records that rename, resize or re-type the member after them, or expand it
_EXTENSIONS = {b"x": "a pax extended header", b"g": "a pax global header", b"L": "a GNU long-name record",
               b"K": "a GNU long-link record", b"S": "a GNU sparse file", b"7": "a contiguous file",
               b"M": "a GNU multi-volume continuation", b"V": "a GNU volume label", b"N": "a GNU old long name",
               b"D": "a GNU dump directory"}


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    data_offset: int  # where its bytes start in the bundle file


def _format(message: str) -> BundleRejected:
    return BundleRejected(message, reason="format")


def _octal(field: bytes, what: str) -> int:
    digits = field.replace(b"\x00", b" ").strip()
    if not digits or any(c not in b"01234567" for c in digits):
        raise _format(f"bad {what} field {field!r} in a tar header")
    return int(digits, 8)


def _scan(f: IO[bytes], file_size: int) -> list[_Member]:
    """Read every tar header in the bundle (none of the members' bytes) and refuse anything but a flat, plain
    regular file. Each member lies wholly inside the file and members do not overlap, so their sizes add up to
    less than `file_size`."""
    members: list[_Member] = []
    pos = 0
    while True:
        f.seek(pos)
        block = f.read(_BLOCK)
        if not block or block == bytes(_BLOCK):  # end of archive (a zero block, or the file's end after one)
            return members
        if len(members) == MAX_MEMBERS:
            raise BundleRejected(f"bundle has more than {MAX_MEMBERS} members", reason="too_large")
        if len(block) < _BLOCK:
            raise _format(f"tar header at byte {pos} is cut short")
        stored_sum = _octal(block[148:156], "checksum")
        if stored_sum != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise _format(f"tar header at byte {pos} fails its checksum (not a tar file, or damaged)")
        if block[257:265] not in _USTAR_MAGICS:
            raise _format(f"tar header at byte {pos} is not ustar")
        raw_name = block[:100].split(b"\x00", 1)[0]
        shown = repr(raw_name.decode("ascii", "replace"))
        kind = block[156:157]
        if kind in _NOT_FILES:
            raise BundleRejected(f"member {shown} is {_NOT_FILES[kind]}; a bundle holds plain regular files only "
                                 "(links and directories are refused)", reason="unsafe_path")
        if kind not in _PLAIN_TYPES:
            what = _EXTENSIONS.get(kind, f"a tar record of type {kind!r}")
            raise BundleRejected(f"bundle holds {what} (at {shown}); a bundle holds plain regular files only",
                                 reason="unsafe_member")
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            name = ""
        if (not name or not name.isprintable() or name.startswith("/") or ".." in name.split("/")
                or "/" in name or "\\" in name or any(block[345:500])):  # 345..500: ustar's path prefix
            raise BundleRejected(f"unsafe member path {shown} in bundle", reason="unsafe_path")
        if block[124] & 0x80:  # base-256 size: only GNU writes it, for sizes a ustar header cannot hold
            raise BundleRejected(f"member {shown} has a base-256 size", reason="unsafe_member")
        size = _octal(block[124:136], "size")
        data_offset = pos + _BLOCK
        if data_offset + size > file_size:
            raise _format(f"member {shown} declares {size} bytes but the bundle ends before them")
        members.append(_Member(name, size, data_offset))
        pos = data_offset + -(-size // _BLOCK) * _BLOCK


def _read_member(f: IO[bytes], member: _Member) -> Iterator[bytes]:
    """The member's bytes in chunks: exactly `member.size` bytes from its data offset, never more."""
    f.seek(member.data_offset)
    remaining = member.size
    while remaining:
        chunk = f.read(min(_HASH_CHUNK, remaining))
        if not chunk:
            raise _format(f"bundle ends inside member {member.name!r}")
        remaining -= len(chunk)
        yield chunk


def verify_bundle(path: Path, dest: Path | None = None,
                  max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> VerifiedBundle:
    """Check every member of the bundle at `path` against its manifest; with `dest`, also extract it there.

    Every header and the manifest are checked before any member byte is written. Extraction goes to a
    temporary directory beside `dest` and is renamed into place only when every member has been checked, so
    `dest` is either complete and verified or absent.
    """
    try:
        f = path.open("rb")
    except OSError as e:
        raise BundleRejected(f"cannot read bundle {path}: {e.strerror}", reason="unreadable") from e
    with f:
        size = os.fstat(f.fileno()).st_size  # of the file we read: later bounds cannot be raced by a swap
        if size > max_bytes:
            raise BundleRejected(f"bundle is {size} bytes, more than the limit of {max_bytes}", reason="too_large")
        staging: Path | None = None
        if dest is not None:
            if dest.exists():
                # never merge into or replace something already there: the caller picks a fresh directory
                raise FileExistsError(f"{dest} already exists")
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            manifest = _verify_members(f, size, staging)
            if dest is not None and staging is not None:
                os.replace(staging, dest)
                staging = None
            return VerifiedBundle(path, manifest, size)
        finally:
            if staging is not None:
                _remove_tree(staging)


def _verify_members(f: IO[bytes], size: int, staging: Path | None) -> Manifest:
    members = _scan(f, size)
    if not members or members[0].name != MANIFEST:
        raise _format("bundle does not start with manifest.json")
    first, rest = members[0], members[1:]
    if first.size > MAX_MANIFEST_BYTES:
        raise BundleRejected(f"manifest larger than {MAX_MANIFEST_BYTES} bytes", reason="too_large")
    raw_manifest = b"".join(_read_member(f, first))
    manifest = parse_manifest(raw_manifest)
    listed = first.size + sum(e.bytes for e in manifest.files.values())
    if listed > size:  # _scan bounds what is there; this bounds what the manifest promises
        raise BundleRejected(f"manifest lists {listed} bytes of members but the bundle is {size} bytes",
                             reason="size_mismatch")
    seen: set[str] = set()
    for m in rest:  # the whole member list against the manifest, before any byte is written
        entry = manifest.files.get(m.name)
        if entry is None:
            raise BundleRejected(f"member {m.name!r} is not listed in the manifest", reason="unlisted")
        if m.name in seen:
            raise BundleRejected(f"member {m.name!r} appears twice", reason="duplicate")
        seen.add(m.name)
        if m.size != entry.bytes:
            raise BundleRejected(f"member {m.name!r} is {m.size} bytes, manifest says {entry.bytes}",
                                 reason="size_mismatch")
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise BundleRejected(f"bundle lacks members listed in the manifest: {', '.join(missing)}",
                             reason="missing_member")
    if staging is not None:  # the unpacked release carries its (verified) manifest for later steps
        (staging / MANIFEST).write_bytes(raw_manifest)
    for m in rest:
        h = hashlib.sha256()
        out = (staging / m.name).open("xb") if staging is not None else None
        try:
            for chunk in _read_member(f, m):
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
        finally:
            if out is not None:
                out.close()
        if h.hexdigest() != manifest.files[m.name].sha256:
            raise BundleRejected(f"member {m.name!r} does not match its sha256 in the manifest",
                                 reason="hash_mismatch")
    return manifest


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
