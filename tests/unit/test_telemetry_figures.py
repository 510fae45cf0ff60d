"""The pure telemetry figures: latency histogram, inference figures, feedback accuracy and scheduled parity."""

from __future__ import annotations

import json
import math
import threading
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import GOLDEN_FILE, Artifact, FileEntry, Manifest, TensorSpec
from agent.runtime import open_session
from agent.serve.holder import LoadedModel
from agent.telemetry.accuracy import FeedbackBook, wilson_interval
from agent.telemetry.histogram import BUCKETS_MS, LatencyHistogram
from agent.telemetry.inference import InferenceFigures
from agent.telemetry.parity import ParitySchedule

# --- histogram ---------------------------------------------------------------------------------------------------


def _bucket_width(v: float, h: LatencyHistogram) -> float:
    """The width of the bucket holding `v`, narrowed to the observed extremes (the module's error bound)."""
    i = next(i for i, b in enumerate(BUCKETS_MS) if v <= b)
    lo = max(BUCKETS_MS[i - 1] if i else 0.0, h.min_ms or 0.0)
    hi = min(BUCKETS_MS[i], h.max_ms or math.inf)
    return hi - lo


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantiles_within_the_bucket_bound_of_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ms = rng.lognormal(mean=1.5, sigma=1.2, size=5000)  # about 0.1 ms to several seconds
    h = LatencyHistogram()
    for x in ms:
        h.observe(float(x))
    for q in (0.5, 0.95, 0.99):
        est = h.quantile(q)
        assert est is not None
        want = float(np.percentile(ms, q * 100, method="inverted_cdf"))  # the order statistic of rank ceil(q*n)
        assert abs(est - want) <= _bucket_width(want, h) + 1e-9, (q, est, want)
        # numpy's default (linear) interpolates between neighbouring order statistics: still within the bound
        lin = float(np.percentile(ms, q * 100))
        assert abs(est - lin) <= _bucket_width(want, h) + _bucket_width(lin, h) + 1e-9
    assert h.count == 5000 and sum(h.counts) == 5000 and h.sum_ms == pytest.approx(float(ms.sum()))


def test_quantile_edges_empty_and_bad_values() -> None:
    h = LatencyHistogram()
    assert h.quantile(0.5) is None
    h.observe(3.0)
    assert h.quantile(0.0) == pytest.approx(3.0) and h.quantile(1.0) == pytest.approx(3.0)  # narrowed to extremes
    h.observe(7000.0)  # the +inf bucket: never above the largest value seen
    assert h.quantile(1.0) == pytest.approx(7000.0)
    assert h.counts[BUCKETS_MS.index(5.0)] == 1 and h.counts[-1] == 1
    h.observe(5.0)  # a bound belongs to its own bucket (le)
    assert h.counts[BUCKETS_MS.index(5.0)] == 2
    for bad in (math.nan, -1.0):
        with pytest.raises(ValueError):
            h.observe(bad)
    assert h.count == 3
    with pytest.raises(ValueError):
        h.quantile(1.5)


def test_merge_equals_one_histogram_of_both_and_json_round_trip() -> None:
    rng = np.random.default_rng(3)
    a_ms, b_ms = rng.exponential(4.0, 300), rng.exponential(40.0, 200)
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for x in a_ms:
        a.observe(float(x))
        both.observe(float(x))
    for x in b_ms:
        b.observe(float(x))
        both.observe(float(x))
    a.merge(b)
    assert a.counts == both.counts and a.count == 500 and a.sum_ms == pytest.approx(both.sum_ms)
    assert a.quantile(0.95) == pytest.approx(both.quantile(0.95))

    wire = json.loads(json.dumps(a.to_json()))  # strict JSON: +inf travels as null
    assert wire["bounds"][-1] is None
    back = LatencyHistogram.from_json(wire)
    assert back == a and back.quantile(0.99) == a.quantile(0.99)
    # a fleet merge from the wire
    fleet = LatencyHistogram.from_json(wire)
    fleet.merge(LatencyHistogram.from_json(json.loads(json.dumps(b.to_json()))))
    assert fleet.count == 700


@pytest.mark.parametrize("bad", [
    {"bounds": [1.0, None], "counts": [1]},  # lengths differ
    {"bounds": [1.0, None], "counts": [1, -1]},
    {"bounds": [1.0, None], "counts": [1, 1], "count": 3},
    {"bounds": [2.0, 1.0, None], "counts": [0, 0, 0]},
    {"bounds": [1.0, 2.0], "counts": [0, 0]},  # no +inf bucket
    {"bounds": ["1", None], "counts": [0, 0]},
])
def test_from_json_refuses_malformed(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LatencyHistogram.from_json(bad)
    with pytest.raises(ValueError):
        LatencyHistogram().merge(LatencyHistogram([1.0, math.inf]))


# --- inference figures -------------------------------------------------------------------------------------------


def test_inference_figures_per_version_error_rate_and_throughput() -> None:
    f = InferenceFigures()
    snap = f.snapshot("m", 1, now=100.0)
    assert snap["requests_total"] == 0 and snap["error_rate"] is None and snap["latency_ms_p95"] is None
    assert snap["throughput_rps"] is None  # no previous snapshot
    for _ in range(8):
        f.record("ok", 2.0, "m", 1)
    f.record("error", None, "m", 1)
    f.record("error", 3.0, "m", 1)  # a failure's latency is not the model's
    f.record("rejected", 0.1, "m", 1)
    f.record("ok", 50.0, "m", 2)
    f.record("error", None, None, None)  # no model loaded at all
    snap = f.snapshot("m", 1, now=102.0)
    assert (snap["requests_total"], snap["errors_total"], snap["rejected_total"]) == (11, 2, 1)
    assert snap["error_rate"] == pytest.approx(2 / 10)  # rejected requests are the client's, not answered
    assert snap["latency_ms_count"] == 8 and snap["latency_ms_buckets"][BUCKETS_MS.index(2.0)] == 8
    assert snap["latency_ms_p50"] == pytest.approx(2.0) and snap["latency_ms_sum"] == pytest.approx(16.0)
    assert snap["latency_ms_bucket_bounds"][-1] is None and len(snap["latency_ms_bucket_bounds"]) == len(BUCKETS_MS)
    assert snap["throughput_rps"] == pytest.approx(11 / 2.0)
    json.dumps(snap, allow_nan=False)

    for _ in range(4):
        f.record("ok", 1.0, "m", 1)
    peek = f.snapshot("m", 1, now=104.0, advance=False)  # /metrics must not move the publisher's mark
    assert peek["throughput_rps"] == pytest.approx(4 / 2.0)
    assert f.snapshot("m", 1, now=106.0)["throughput_rps"] == pytest.approx(4 / 4.0)
    assert f.snapshot("m", 2, now=106.0)["requests_total"] == 1
    assert f.snapshot(None, None, now=106.0)["errors_total"] == 1
    f.record("ok", math.nan, "m", 2)  # a bad latency is logged, the request still counts
    assert f.snapshot("m", 2, now=107.0)["requests_total"] == 2


def test_inference_figures_thread_safety_smoke() -> None:
    f = InferenceFigures()
    threads, per = 8, 2000

    def work(t: int) -> None:
        for i in range(per):
            f.record("ok" if i % 10 else "error", float(i % 7), "m", 1 + t % 2)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    snaps = [f.snapshot("m", v, now=1.0) for v in (1, 2)]
    assert sum(s["requests_total"] for s in snaps) == threads * per
    assert sum(s["errors_total"] for s in snaps) == threads * per // 10
    assert sum(s["latency_ms_count"] for s in snaps) == threads * per * 9 // 10


# --- accuracy ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n, low, high", [
    (8, 10, 0.490, 0.943),
    (0, 10, 0.0, 0.278),
    (10, 10, 0.722, 1.0),
    (50, 100, 0.404, 0.596),
])
def test_wilson_interval_known_values(k: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(k, n)
    assert got is not None
    assert got[0] == pytest.approx(low, abs=5e-4) and got[1] == pytest.approx(high, abs=5e-4)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) is None
    for bad in ((3, 2), (-1, 2)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _logits(cls: int, classes: int = 4) -> list[np.ndarray]:
    row = np.zeros((1, classes), np.float32)
    row[0, cls] = 5.0
    return [row]


def test_feedback_accuracy_matches_offline_with_wilson() -> None:
    clock = Clock()
    book = FeedbackBook(max_entries=100, ttl_s=60.0, clock=clock)
    predicted = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    labels = [0, 1, 2, 3, 0, 1, 2, 3, 3, 3]  # 8 of 10 right
    for i, p in enumerate(predicted):
        book.remember(f"r{i}", "m", 2, "classification", _logits(p))
    assert book.snapshot("m", 2)["accuracy"] is None  # nothing labelled yet: no figure, not 0 or 1
    assert [book.feedback(f"r{i}", y) for i, y in enumerate(labels)] == ["accepted"] * 10
    snap = book.snapshot("m", 2)
    assert snap["accuracy"] == pytest.approx(0.8) and snap["feedback_total"] == 10
    assert (snap["accuracy_low"], snap["accuracy_high"]) == pytest.approx((0.490, 0.943), abs=5e-4)
    assert snap["feedback_mae"] is None
    assert book.snapshot("m", 3)["feedback_total"] == 0  # per version
    json.dumps(snap, allow_nan=False)


def test_feedback_unknown_expired_duplicate_and_eviction() -> None:
    clock = Clock()
    book = FeedbackBook(max_entries=3, ttl_s=60.0, clock=clock)
    book.remember("a", "m", 1, "classification", _logits(1))
    clock.t += 59.0
    assert book.feedback("a", 1) == "accepted"
    assert book.feedback("a", 1) == "duplicate"
    book.remember("b", "m", 1, "classification", _logits(2))
    clock.t += 60.5
    assert book.feedback("b", 2) == "expired"
    assert book.feedback("nope", 0) == "unknown"
    for rid in ("c", "d", "e"):  # capacity 3: "a" and "b" are evicted first
        book.remember(rid, "m", 1, "classification", _logits(0))
    assert len(book) == 3
    assert book.feedback("b", 2) == "unknown"
    assert book.feedback("e", 0) == "accepted"
    snap = book.snapshot("m", 1)
    assert (snap["feedback_total"], snap["accuracy"]) == (2, 1.0)
    assert (snap["feedback_unknown_total"], snap["feedback_expired_total"], snap["feedback_duplicate_total"]) == (
        2, 1, 1)


@pytest.mark.parametrize("label", ["1", 1.0, True, None, [1, 2], 4, -1, {"c": 1}])
def test_bad_classification_labels_raise_and_change_nothing(label: Any) -> None:
    book = FeedbackBook(max_entries=10, ttl_s=60.0, clock=Clock())
    book.remember("a", "m", 1, "classification", _logits(1))
    before = book.snapshot("m", 1)
    with pytest.raises(ValueError):
        book.feedback("a", label)
    assert book.snapshot("m", 1) == before
    assert book.feedback("a", 1) == "accepted"  # the id is still there to be labelled properly


def test_regression_mae_batches_and_bad_labels() -> None:
    book = FeedbackBook(max_entries=10, ttl_s=60.0, clock=Clock())
    book.remember("one", "r", 1, "regression", [np.array([[2.5]], np.float32)])
    book.remember("vec", "r", 1, "regression", {"y": np.array([[1.0, 2.0, 3.0]], np.float32)})
    book.remember("batch", "c", 1, "classification", [np.array([[0.0, 9.0], [9.0, 0.0]], np.float32)])
    for bad in ("2", [1.0, 2.0], [[1.0, 2.0, "x"]], math.inf, 10**400, [[[[[1.0, 2.0, 3.0]]]]]):
        with pytest.raises(ValueError):
            book.feedback("vec", bad)
    assert book.snapshot("r", 1)["feedback_total"] == 0
    assert book.feedback("one", 3) == "accepted"  # an int is a number too
    assert book.feedback("vec", [[1.5, 2.0, 2.0]]) == "accepted"
    snap = book.snapshot("r", 1)
    assert snap["feedback_mae"] == pytest.approx((0.5 + 0.5 + 0.0 + 1.0) / 4)
    assert snap["accuracy"] is None and snap["feedback_total"] == 2
    with pytest.raises(ValueError, match="2 rows"):
        book.feedback("batch", 1)  # a batch of two needs a label per row
    assert book.feedback("batch", [1, 1]) == "accepted"
    assert book.snapshot("c", 1)["accuracy"] == pytest.approx(0.5) and book.snapshot("c", 1)["feedback_total"] == 2


def test_embedding_predictions_take_no_label() -> None:
    book = FeedbackBook(max_entries=10, ttl_s=60.0, clock=Clock())
    book.remember("e", "emb", 1, "embedding", [np.ones((1, 8), np.float32)])
    with pytest.raises(ValueError, match="no label"):
        book.feedback("e", 1)


def test_feedback_book_memory_per_entry_is_bounded() -> None:
    n = 5000
    book = FeedbackBook(max_entries=n, ttl_s=60.0, clock=Clock())
    out = [np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            book.remember(str(uuid.uuid4()), "m", 1, "classification", out)  # the id string is the book's to keep
        per_entry = (tracemalloc.get_traced_memory()[0] - base) / n
    finally:
        tracemalloc.stop()
    assert per_entry < 400, per_entry  # accuracy.py documents about 320 bytes


def test_feedback_book_thread_safety_smoke() -> None:
    book = FeedbackBook(max_entries=100_000, ttl_s=60.0, clock=Clock())
    threads, per = 6, 1000

    def work(t: int) -> None:
        for i in range(per):
            rid = f"{t}-{i}"
            book.remember(rid, "m", 1, "classification", _logits(i % 4))
            assert book.feedback(rid, 0) == "accepted"

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    snap = book.snapshot("m", 1)
    assert snap["feedback_total"] == threads * per and snap["accuracy"] == pytest.approx(0.25)


# --- scheduled parity, through a real onnxruntime session --------------------------------------------------------

X = TensorSpec("x", (-1, 4), "float32")
Y = TensorSpec("logits", (-1, 3), "float32")
WEIGHTS = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32)


def _onnx_model(path: Path, weights: np.ndarray) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(weights, "w")])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _manifest(parity: dict[str, Any]) -> Manifest:
    art = Artifact("onnx", "model.onnx", (X,), (Y,), {"name": "static"}, 97.5, 0.3, 0.1, 0.2)
    return Manifest(name="m", version=2, task="classification", created="2026-01-01T00:00:00+00:00", inputs=(X,),
                    outputs=(Y,), artifacts=(art,), metric="top1", fp32_metric_value=97.8, max_drop=1.0,
                    parity=parity, latency_budget_ms=5.0, target={}, preprocessing={},
                    provenance={"source_sha256": "0" * 64}, files={"model.onnx": FileEntry("0" * 64, 1)})


@pytest.fixture
def release(tmp_path: Path) -> Path:
    path = tmp_path / "release"
    path.mkdir()
    gx = np.random.default_rng(6).standard_normal((32, 4)).astype(np.float32)
    np.savez(path / GOLDEN_FILE, allow_pickle=False, **{"input.x": gx, "onnx.output.0": gx @ WEIGHTS})
    return path


def _loaded(release: Path, weights: np.ndarray, parity: dict[str, Any], name: str = "model.onnx") -> LoadedModel:
    session = open_session(_onnx_model(release / name, weights), "onnx")
    return LoadedModel("m", 2, "onnx", session, manifest=_manifest(parity))


TOLERANCE = {"kind": "tolerance", "atol": 1e-4, "rtol": 1e-4}


def test_parity_schedule_passes_then_catches_a_changed_model(release: Path) -> None:
    clock = Clock()
    sched = ParitySchedule(3600.0, clock)
    assert sched.due() and sched.last["parity_ok"] is None
    got = sched.check(_loaded(release, WEIGHTS, TOLERANCE), release, "onnx")
    assert got["parity_ok"] is True and got["parity_score"] < 1e-4 and got["parity_checked_at"] == 1000.0
    assert not sched.due()
    clock.t += 3599.0
    assert not sched.due()
    clock.t += 1.0
    assert sched.due()
    corrupted = WEIGHTS.copy()
    corrupted.view(np.uint32)[1, 2] ^= 1 << 30  # one flipped bit in one weight
    got = sched.check(_loaded(release, corrupted, TOLERANCE, "bad.onnx"), release, "onnx")
    assert got["parity_ok"] is False and got["parity_score"] > 1e-4 and "outside" in got["parity_detail"]
    assert sched.last == got and not sched.due()


def test_parity_check_never_raises(release: Path, tmp_path: Path) -> None:
    sched = ParitySchedule(10.0, Clock())
    good = _loaded(release, WEIGHTS, TOLERANCE)
    cases = [
        (good, tmp_path / "missing", "onnx", "parity"),  # no golden file
        (good, release, "tflite", "no expected tflite"),
        (_loaded(release, WEIGHTS, {"kind": "nonsense"}), release, "onnx", "unknown parity kind"),
        (LoadedModel("m", 2, "onnx", good.session), release, "onnx", "no manifest"),
    ]
    for model, where, fmt, why in cases:
        got = sched.check(model, where, fmt)
        assert got["parity_ok"] is False and got["parity_score"] is None and why in got["parity_detail"], got

    class Broken:
        format = "onnx"
        inputs: tuple[TensorSpec, ...] = (X,)
        outputs: tuple[TensorSpec, ...] = (Y,)

        def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            raise RuntimeError("session gone")

    got = sched.check(LoadedModel("m", 2, "onnx", Broken(), manifest=_manifest(TOLERANCE)), release, "onnx")
    assert got["parity_ok"] is False and "session gone" in got["parity_detail"]
    with pytest.raises(ValueError):
        ParitySchedule(0.0, Clock())
