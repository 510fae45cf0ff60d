"""Fuzz the manifest parser (agent.bundle.parse_manifest): manifest.json's bytes as they come out of a bundle.

An accepted manifest must satisfy the parser's own documented bounds (name, version, task, tensors' names, ranks,
dimensions and dtypes, member names and sizes, artifacts, max_batch, finite numbers, preprocessing, labels), and
write back to bytes that parse to the same manifest (what the packager writes is what the agent reads).
"""

from __future__ import annotations

import math
import sys

from agent import bundle
from agent.bundle import Manifest, TensorSpec, parse_manifest
from agent.errors import BundleRejected
from tests.fuzz.common import check


def _check_tensors(tensors: tuple[TensorSpec, ...], what: str) -> None:
    check(len(tensors) > 0, f"{what}: empty")
    for t in tensors:
        check(isinstance(t.name, str) and 0 < len(t.name) <= 256, f"{what}: bad tensor name {t.name!r}")
        check(len(t.shape) <= bundle.MAX_RANK, f"{what}: rank {len(t.shape)}")
        check(all(type(d) is int and (d == -1 or 0 <= d <= bundle.MAX_DIMENSION) for d in t.shape),
              f"{what}: bad shape {t.shape}")
        check(t.dtype in bundle.TENSOR_DTYPES, f"{what}: dtype {t.dtype!r}")
        if t.scale is not None or t.zero_point is not None or t.quantized_dtype is not None:
            check(t.quantized_dtype in bundle._INT_RANGES, f"{what}: quantized_dtype {t.quantized_dtype!r}")
            check(t.scale is not None and math.isfinite(t.scale) and t.scale > 0, f"{what}: scale {t.scale!r}")
            low, high = bundle._INT_RANGES[str(t.quantized_dtype)]
            check(t.zero_point is not None and low <= t.zero_point <= high, f"{what}: zero_point {t.zero_point!r}")


def check_manifest(m: Manifest) -> None:
    check(bundle.valid_name(m.name), f"name {m.name!r}")
    check(type(m.version) is int and 1 <= m.version <= bundle.MAX_VERSION, f"version {m.version!r}")
    check(m.task in bundle.TASKS, f"task {m.task!r}")
    check(isinstance(m.created, str) and len(m.created) <= 64, "created")
    _check_tensors(m.inputs, "inputs")
    _check_tensors(m.outputs, "outputs")
    check(len(m.files) < bundle.MAX_MEMBERS, "too many files")
    for member, entry in m.files.items():
        check(bool(bundle._MEMBER_RE.match(member)) and member != bundle.MANIFEST, f"member name {member!r}")
        check(len(entry.sha256) == 64 and all(c in "0123456789abcdef" for c in entry.sha256), "member sha256")
        check(type(entry.bytes) is int and 0 <= entry.bytes <= bundle.MAX_MEMBER_BYTES, "member size")
    check(len(m.artifacts) > 0 and len({a.format for a in m.artifacts}) == len(m.artifacts), "artifacts")
    for a in m.artifacts:
        check(a.format in bundle.FORMATS and a.file in m.files, f"artifact {a.format!r} {a.file!r}")
        _check_tensors(a.inputs, "artifact inputs")
        _check_tensors(a.outputs, "artifact outputs")
        check(all(math.isfinite(v) for v in (a.metric_value, a.drop, a.host_p50_ms, a.host_p95_ms)), "artifact number")
    check(all(math.isfinite(v) for v in (m.fp32_metric_value, m.max_drop, m.latency_budget_ms)), "number")
    check(m.latency_budget_ms > 0, "latency_budget_ms")
    check(type(m.max_batch) is int and 1 <= m.max_batch <= bundle.MAX_BATCH_LIMIT, f"max_batch {m.max_batch!r}")
    spec = m.preprocess
    if spec is not None:
        target = next(t for t in m.inputs if t.name == spec.input)
        check(target.dtype in ("float16", "float32", "float64"), "preprocessed input is not float")
        check(spec.layout in bundle.LAYOUTS and spec.model_layout in bundle.LAYOUTS, "layouts")
        check(spec.resize in (None, *bundle.RESIZE_METHODS) and spec.dtype in bundle.RAW_DTYPES, "resize or dtype")
        check(1 <= len(spec.mean) <= bundle.MAX_CHANNELS and 1 <= len(spec.std) <= bundle.MAX_CHANNELS, "stats")
        check(all(math.isfinite(v) for v in (spec.scale, *spec.mean, *spec.std)) and spec.scale != 0, "finite stats")
        check(all(s > 0 for s in spec.std), "std")
        if spec.image:
            check(len(target.shape) == 4, "image preprocessing of a non-4-D input")
    if m.labels is not None:
        check(any(t.name == m.labels.output for t in m.outputs), "labels.output")
        check(1 <= len(m.labels.names) <= bundle.MAX_LABELS, "labels count")
        check(all(0 < len(n) <= bundle.MAX_LABEL_CHARS and n.isprintable() for n in m.labels.names), "label names")
        check(m.labels.scores in bundle.SCORES, "labels.scores")


def test_one_input(data: bytes) -> None:
    try:
        m = parse_manifest(data)
    except BundleRejected:
        return
    check_manifest(m)
    again = parse_manifest(m.to_bytes())
    check(again == m, "the manifest written back parses to another manifest")


def main() -> None:
    from tests.fuzz.runner import fuzz

    fuzz("manifest", sys.argv)


if __name__ == "__main__":
    main()
