"""`--labels` and `--preprocess`: what the device does before and after the model, checked and written into the
manifest (`labels`, `preprocessing`). The device applies them (agent/preprocess.py); the checks here are the
device's own (agent.bundle), run at build time so a bad declaration costs no build.

`--preprocess` is `key=value` pairs separated by spaces or `;`:
    input=NAME           the model input it applies to (default: the only float input, else the first)
    layout=NHWC|NCHW     the layout clients send (default: the model's)
    model_layout=NCHW|NHWC   the model's own layout (default NCHW, as PyTorch exports)
    scale=F              multiply raw values by F first; `1/255` is accepted (default 1)
    mean=M[,M...]        subtract, one value or one per channel (default 0)
    std=S[,S...]         then divide, one value or one per channel (default 1)
    resize=nearest|bilinear   clients may send any height and width; the device resizes to the model's
    dtype=uint8|float32  the datatype clients are told to send (model metadata; any numeric datatype is taken)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import (
    LAYOUTS,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    RAW_DTYPES,
    RESIZE_METHODS,
    Labels,
    Preprocessing,
    TensorSpec,
    labels_from_json,
    preprocessing_from_json,
)
from agent.errors import BundleRejected
from packager.errors import InputError

MAX_LABELS_FILE_BYTES = 4 << 20
_KEYS = ("input", "layout", "model_layout", "scale", "mean", "std", "resize", "dtype")


def read_labels(path: Path) -> list[str]:
    """Class names from a text file, one per line in class-index order (UTF-8; trailing blank lines ignored)."""
    try:
        size = path.stat().st_size
        if size > MAX_LABELS_FILE_BYTES:
            raise InputError(f"--labels {path}: {size} bytes, more than {MAX_LABELS_FILE_BYTES}")
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as e:
        raise InputError(f"--labels {path}: no such file") from e
    except UnicodeDecodeError as e:
        raise InputError(f"--labels {path}: not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise InputError(f"--labels {path}: cannot read it ({e.strerror or e})") from e
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise InputError(f"--labels {path}: no class names (one per line)")
    if len(lines) > MAX_LABELS:
        raise InputError(f"--labels {path}: {len(lines)} names, at most {MAX_LABELS}")
    names = []
    for i, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise InputError(f"--labels {path}: line {i} is blank; every class needs a name")
        if len(name) > MAX_LABEL_CHARS or not name.isprintable():
            raise InputError(f"--labels {path}: line {i} must be printable text of at most {MAX_LABEL_CHARS} "
                             "characters")
        names.append(name)
    return names


def parse_preprocess(text: str) -> dict[str, Any]:
    """The `--preprocess` option as manifest values (not yet checked against a model); InputError if malformed."""
    out: dict[str, Any] = {}
    for part in re.split(r"[;\s]+", text.strip()):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not value:
            raise InputError(f"--preprocess: {part!r} is not key=value (keys: {', '.join(_KEYS)})")
        if key not in _KEYS:
            raise InputError(f"--preprocess: unknown key {key!r} (keys: {', '.join(_KEYS)})")
        if key in out:
            raise InputError(f"--preprocess: {key} given twice")
        if key in ("layout", "model_layout"):
            out[key] = _choice(key, value.upper(), LAYOUTS)
        elif key == "resize":
            out[key] = _choice(key, value.lower(), RESIZE_METHODS)
        elif key == "dtype":
            out[key] = _choice(key, value.lower(), RAW_DTYPES)
        elif key == "scale":
            out[key] = _number(key, value)
        elif key in ("mean", "std"):
            out[key] = [_number(key, v) for v in value.split(",")]
        else:
            out[key] = value
    if not out:
        raise InputError("--preprocess: empty (give key=value pairs, e.g. 'scale=1/255 layout=NHWC')")
    return out


def _choice(key: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise InputError(f"--preprocess: {key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _number(key: str, text: str) -> float:
    num, sep, den = text.partition("/")
    try:
        value = float(num) / float(den) if sep else float(num)
    except (ValueError, ZeroDivisionError) as e:
        raise InputError(f"--preprocess: {key} value {text!r} is not a number") from e
    if not math.isfinite(value):
        raise InputError(f"--preprocess: {key} value {text!r} is not finite")
    return value


def preprocessing_section(options: dict[str, Any], inputs: Sequence[TensorSpec]) -> tuple[dict[str, Any],
                                                                                            Preprocessing]:
    """The manifest's `preprocessing` for the model's `inputs`, checked exactly as a device checks it."""
    section = dict(options)
    if "input" not in section:
        floats = [t.name for t in inputs if t.dtype.startswith("float")]
        section["input"] = floats[0] if floats else inputs[0].name
    section.setdefault("model_layout", "NCHW")
    section.setdefault("layout", section["model_layout"])
    try:
        spec = preprocessing_from_json(section, tuple(inputs))
    except BundleRejected as e:
        raise InputError(f"--preprocess: {str(e).removeprefix('invalid manifest: ')}") from e
    return spec.to_json(), spec


def labels_section(names: list[str], outputs: Sequence[TensorSpec], fp32_out: np.ndarray) -> Labels:
    """The manifest's `labels` for the first output; `scores` is `raw` when that output already holds
    probabilities on the evaluation set (every row in [0, 1] summing to 1), else `softmax`."""
    flat = fp32_out.reshape(len(fp32_out), -1).astype(np.float64)
    if flat.shape[1] != len(names):
        raise InputError(f"--labels: {len(names)} class names, the model's output {outputs[0].name!r} has "
                         f"{flat.shape[1]} classes")
    probabilities = bool(flat.min() >= 0.0 and flat.max() <= 1.0 and np.allclose(flat.sum(axis=1), 1.0, atol=1e-3))
    doc = {"output": outputs[0].name, "names": names, "scores": "raw" if probabilities else "softmax"}
    try:
        return labels_from_json(doc, tuple(outputs))
    except BundleRejected as e:
        raise InputError(f"--labels: {str(e).removeprefix('invalid manifest: ')}") from e
