"""The int8 verdict (packager/verdict.py) and its build-side helpers: pure decisions, no clock, no model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from packager import verdict
from packager.onnx_quant import TARGETS, OnnxRecipe, host_saturates
from packager.payoff import failure_line
from packager.tuning import Trial, TuningResult, choose

FP32 = verdict.Fp32(bytes=1000, p50_ms=1.0)


@pytest.mark.parametrize(
    ("kwargs", "failed"),
    [
        ({"drop": 0.1, "nbytes": 300, "error": "quantizer crashed"}, "error"),
        ({"drop": 1.5, "nbytes": 300}, "accuracy"),
        ({"drop": math.nan, "nbytes": 300}, "accuracy"),
        ({"drop": 0.1, "nbytes": 1080}, "size"),  # the 1.08x "int8" artifact
        ({"drop": 0.1, "nbytes": 1000}, "size"),  # not smaller is not paying
        ({"drop": 0.1, "nbytes": 300, "p50_ms": 2.0}, "latency"),  # the issue's ~2x slower artifact
        ({"drop": 0.1, "nbytes": 300, "p50_ms": 1.11}, "latency"),  # just past the tolerance
        ({"drop": 0.1, "nbytes": 300, "p50_ms": 1.09}, None),  # within the tolerance: timing noise
        ({"drop": 0.1, "nbytes": 300, "p50_ms": 0.4}, None),
        ({"drop": 0.1, "nbytes": 300}, None),  # latency not measured (TFLite): not judged
        ({"drop": 1.0, "nbytes": 999, "p50_ms": 1.0}, None),  # the bounds themselves pass
    ],
)
def test_judge_checks_error_accuracy_size_then_latency(kwargs: dict, failed: str | None) -> None:
    v = verdict.judge(FP32, max_drop=1.0, **kwargs)
    assert v.failed == failed
    assert v.passed is (failed is None)
    assert v.reason  # always says why, or what it gains


def test_judge_reasons_name_the_figures() -> None:
    assert "1.080x" in verdict.judge(FP32, max_drop=1.0, drop=0.0, nbytes=1080).reason
    slow = verdict.judge(FP32, max_drop=1.0, drop=0.0, nbytes=300, p50_ms=2.0)
    assert "2.00x" in slow.reason and "slower" in slow.reason
    assert "0.300x fp32 bytes" in verdict.judge(FP32, max_drop=1.0, drop=0.0, nbytes=300, p50_ms=0.5).reason


def test_microseconds_of_call_overhead_are_not_slower() -> None:
    tiny = verdict.Fp32(bytes=1000, p50_ms=0.007)
    assert verdict.judge(tiny, max_drop=1.0, drop=0.0, nbytes=900, p50_ms=0.008).passed  # 1.14x, but 1 µs
    assert verdict.judge(tiny, max_drop=1.0, drop=0.0, nbytes=900, p50_ms=0.014).failed == "latency"


def test_latency_tolerance_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verdict, "LATENCY_TOLERANCE", math.inf)
    assert verdict.judge(FP32, max_drop=1.0, drop=0.0, nbytes=300, p50_ms=50.0).passed
    monkeypatch.setattr(verdict, "LATENCY_TOLERANCE", -1.0)
    monkeypatch.setattr(verdict, "LATENCY_FLOOR_MS", -math.inf)
    assert verdict.judge(FP32, max_drop=1.0, drop=0.0, nbytes=300, p50_ms=1e-6).failed == "latency"


def test_paired_ratio_is_the_median_of_round_ratios() -> None:
    # A load spike in one round moves both models; the median of ratios ignores the odd round.
    assert verdict.paired_ratio([(1.2, 1.0), (2.4, 2.0), (0.5, 1.0), (1.3, 1.0), (1.2, 1.0)]) == pytest.approx(1.2)
    assert math.isnan(verdict.paired_ratio([(1.0, 0.0)]))


def test_no_recipe_pays_is_one_plain_line() -> None:
    line = verdict.no_recipe_pays("onnx", [
        ("a", verdict.Verdict(False, "accuracy", "drop 3 > 1")),
        ("b", verdict.Verdict(False, "size", "larger than fp32: 1.080x its bytes (1080 vs 1000)")),
        ("c", verdict.Verdict(False, "size", "larger than fp32: 1.2x")),
        ("d", verdict.Verdict(False, "error", "crashed")),
    ])
    assert line.startswith("onnx: no int8 recipe pays (4 tried: 2 larger than fp32, ")
    assert "1 missed the accuracy gate" in line and "1 failed to run" in line
    assert line.endswith("b: larger than fp32: 1.080x its bytes (1080 vs 1000)")
    assert "\n" not in line


def _trial(name: str, drop: float, nbytes: int = 300, rejected: str | None = None) -> Trial:
    return Trial({"name": name}, Path(f"/x/{name}"), nbytes, 99.0 - drop, drop, rejected=rejected)


def test_rejected_trials_do_not_pass_and_the_smallest_paying_one_wins() -> None:
    big = _trial("big-but-accurate", 0.0, 1100, rejected="larger than fp32: 1.100x its bytes")
    slow = _trial("small-but-slow", 0.0, 200, rejected="slower than fp32: 1.50x its p50")
    ok = _trial("ok", 0.5, 300)
    assert not big.passed(1.0) and not slow.passed(1.0) and ok.passed(1.0)
    assert choose([big, slow, ok], 1.0).chosen is ok
    assert big.to_json(1.0)["why"].startswith("larger") and big.to_json(1.0)["passed"] is False


def test_failure_line_keeps_the_accuracy_sentence_and_says_when_int8_does_not_pay() -> None:
    missed = choose([_trial("a", 2.0), _trial("b", 3.0)], 1.0)
    assert failure_line("onnx", missed, "top1", 99.0, 1.0) == \
        "onnx int8 top1 97 vs fp32 99: drop 2 > 1 (best of 2 recipes)"
    unpaid = choose([_trial("a", 2.0), _trial("b", 0.0, 1100, rejected="larger than fp32: 1.100x its bytes")], 1.0)
    line = failure_line("onnx", unpaid, "top1", 99.0, 1.0)
    assert line.startswith("onnx: no int8 recipe pays (2 tried: ")
    assert line.endswith("b: larger than fp32: 1.100x its bytes")
    assert isinstance(unpaid, TuningResult) and unpaid.chosen is None


@pytest.mark.parametrize(
    ("machine", "flags", "saturates"),
    [
        ("x86_64", {"avx2", "fma"}, True),  # AVX2 only: vpmaddubsw sums pairs in saturating 16 bits
        ("x86_64", {"avx2", "avx512f", "avx512bw"}, True),  # AVX-512 without VNNI still uses vpmaddubsw
        ("x86_64", {"avx2", "avx512_vnni"}, False),
        ("x86_64", {"avx2", "avx_vnni"}, False),
        ("aarch64", {"asimd"}, False),
    ],
)
def test_host_saturates(machine: str, flags: set[str], saturates: bool) -> None:
    assert host_saturates(machine, flags) is saturates


def test_targets_choose_the_weight_range_and_name_the_recipes() -> None:
    assert TARGETS["any"].weight_bits == 7 and set(TARGETS["any"].arch) == {"x86_64", "aarch64"}
    assert TARGETS["x86-avx2"].weight_bits == 7
    assert TARGETS["x86-vnni"].weight_bits == 8 and TARGETS["x86-vnni"].arch == ("x86_64",)
    assert TARGETS["arm"].weight_bits == 8 and TARGETS["arm"].arch == ("aarch64",)
    r8 = OnnxRecipe.make("static", reduce_range=False)
    assert r8.name == "static-minmax-perchannel-u8-w8" and r8.to_json()["weight_bits"] == 8
    assert OnnxRecipe.from_json(r8.to_json()) == r8
    r7 = OnnxRecipe.make("static")
    assert r7.name == "static-minmax-perchannel-u8" and OnnxRecipe.from_json(r7.to_json()).reduce_range
