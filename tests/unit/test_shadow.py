"""Shadow mode: the ShadowRunner with fake sessions, clocks and CPU meters (agreement, the CPU budget, never blocking
the request path), the deployment document's `shadow` entry on both sides, and the fetch client's shadow answers."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import Artifact, Manifest, TensorSpec, write_bundle
from agent.deploy.fetch_client import Candidate, ShadowCandidate, candidate_from
from agent.deploy.stage import parity_check
from agent.errors import BundleRejected
from agent.serve.holder import LoadedModel
from agent.telemetry.shadow import ShadowRunner, agreement_kind
from agent.trust.fetch import ShadowEntry, parse_deployment, parse_shadow
from packager import publish as pub
from packager import tuf_repo
from packager.errors import InputError

X = TensorSpec("x", (-1, 4), "float32")


class FakeClock:
    """Seconds of a clock the test moves; the fake session moves it (and the CPU meter) while it "runs"."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class LinearSession:
    """A model y = x @ w (one output per weight matrix); `on_run` lets a test charge time or block."""

    format = "onnx"

    def __init__(self, weights: Sequence[np.ndarray], on_run: Callable[[], None] | None = None,
                 fail: bool = False) -> None:
        self.weights = [np.asarray(w, dtype=np.float32) for w in weights]
        self.inputs = (X,)
        self.outputs = tuple(TensorSpec(f"y{i}", (-1, w.shape[1]), "float32") for i, w in enumerate(self.weights))
        self.on_run = on_run
        self.fail = fail
        self.runs = 0

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        if self.on_run is not None:
            self.on_run()
        if self.fail:
            raise RuntimeError("the shadow model broke")
        return [feeds["x"] @ w for w in self.weights]


def _model(session: LinearSession, name: str = "digits", version: int = 2) -> LoadedModel:
    return LoadedModel(name, version, "onnx", session)


def _runner(session: LinearSession, kind: str = "top1", *, budget: float = 1.0, sample: float = 1.0,
            clock: Callable[[], float] | None = None, cpu: Callable[[], float] | None = None,
            rng: random.Random | None = None, queue_size: int = 2) -> ShadowRunner:
    return ShadowRunner(_model(session), kind, budget, sample, clock or FakeClock(),
                        cpu_clock=cpu or (lambda: 0.0), rng=rng, queue_size=queue_size)


@pytest.fixture
def close_runners() -> list[ShadowRunner]:
    return []


# --- agreement --------------------------------------------------------------------------------------------------


def _requests(n: int, rows: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1 + i % rows, 4)).astype(np.float32) for i in range(n)]


@pytest.mark.parametrize("kind", ["top1", "cosine"])
def test_agreement_equals_parity_check_on_the_same_inputs(kind: str) -> None:
    rng = np.random.default_rng(1)
    served_w = [rng.normal(size=(4, 5)), rng.normal(size=(4, 2))]
    shadow_w = [w + rng.normal(scale=0.6, size=w.shape) for w in served_w]  # a different, related model
    served, shadow = LinearSession(served_w), LinearSession(shadow_w)
    runner = _runner(shadow, kind)
    try:
        xs = _requests(40)
        for x in xs:
            outs = served.run({"x": x})
            assert runner.offer({"x": x}, {"y0": outs[0], "y1": outs[1]})
            assert runner.flush(10)
        snap = runner.snapshot()
    finally:
        runner.close()
    # offline: the same requests' outputs of both models, stacked, judged as STAGE judges parity
    stacked = np.concatenate(xs)
    per_request = [(served.run({"x": x}), shadow.run({"x": x})) for x in xs]
    expected = [np.concatenate([s[i] for s, _ in per_request]) for i in range(2)]
    got = [np.concatenate([o[i] for _, o in per_request]) for i in range(2)]
    spec = {"kind": "top1", "min_agreement": 0.0} if kind == "top1" else {"kind": "cosine", "min": 0.0}
    offline = parity_check(spec, expected, got).value
    assert 0.0 < offline < 1.0  # the test means something: some rows agree, some do not
    assert snap["shadow_agreement"] == pytest.approx(offline, rel=1e-9)
    assert snap["shadow_agreement_kind"] == kind
    assert snap["shadow_samples"] == 40 and snap["shadow_rows"] == len(stacked)
    assert snap["shadow_skipped_total"] == 0 and snap["shadow_errors_total"] == 0
    assert (snap["shadow_name"], snap["shadow_version"]) == ("digits", 2)


def test_outputs_pair_by_name_whatever_order_the_answer_lists_them() -> None:
    w = [np.eye(4, 3), np.eye(4, 2)]
    runner = _runner(LinearSession(w), "cosine")
    try:
        x = _requests(1)[0]
        outs = LinearSession(w).run({"x": x})
        runner.offer({"x": x}, {"y1": outs[1], "y0": outs[0]})
        runner.flush(10)
        assert runner.snapshot()["shadow_agreement"] == pytest.approx(1.0)
    finally:
        runner.close()


def test_no_samples_is_no_agreement_not_perfect_agreement() -> None:
    runner = _runner(LinearSession([np.eye(4)]))
    try:
        snap = runner.snapshot()
    finally:
        runner.close()
    assert snap["shadow_agreement"] is None and snap["shadow_latency_ms_p95"] is None and snap["shadow_samples"] == 0


@pytest.mark.parametrize(("parity", "task", "kind"), [
    ({"kind": "top1", "min_agreement": 0.9}, "regression", "top1"),
    ({"kind": "cosine", "min": 0.99}, "classification", "cosine"),
    ({"kind": "tolerance", "atol": 0.1, "rtol": 0.0}, "regression", "cosine"),
    (None, "classification", "top1"),
    ({}, "embedding", "cosine"),
])
def test_agreement_kind_follows_the_manifests_parity_kind(parity: dict[str, object] | None, task: str,
                                                          kind: str) -> None:
    assert agreement_kind(parity, task) == kind


def test_latency_is_the_shadow_sessions_own() -> None:
    clock = FakeClock()

    def slow() -> None:
        clock.t += 0.030  # 30 ms of the shadow's run

    runner = _runner(LinearSession([np.eye(4)], on_run=slow), clock=clock)
    try:
        for x in _requests(5):
            runner.offer({"x": x}, [x])
            runner.flush(10)
        p95 = runner.snapshot()["shadow_latency_ms_p95"]
    finally:
        runner.close()
    assert p95 == pytest.approx(30.0)


# --- the CPU budget ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.1, 0.25])
def test_the_cpu_share_stays_within_the_budget(budget: float) -> None:
    clock = FakeClock()
    cpu = FakeClock()  # the shadow thread's CPU seconds
    SAMPLE_CPU = 0.05

    def busy() -> None:  # every shadow run takes 50 ms of CPU and of wall time
        clock.t += SAMPLE_CPU
        cpu.t += SAMPLE_CPU

    runner = _runner(LinearSession([np.eye(4)], on_run=busy), budget=budget, clock=clock, cpu=cpu)
    x = np.ones((1, 4), np.float32)
    offers = 0
    try:
        for _ in range(2000):  # one request every 10 ms for 20+ s, all sampled
            runner.offer({"x": x}, [x])
            offers += 1
            assert runner.flush(10)
            clock.t += 0.010
            # at every point: CPU used <= budget x elapsed + one sample's CPU
            assert cpu.t <= budget * clock.t + SAMPLE_CPU + 1e-9
        snap = runner.snapshot()
    finally:
        runner.close()
    # and the budget is used, not starved: a sample runs at the first request after each rest
    rest = SAMPLE_CPU / budget
    assert snap["shadow_samples"] >= clock.t / (rest + 0.010) - 1
    assert snap["shadow_cpu_seconds_total"] == pytest.approx(cpu.t)
    assert snap["shadow_samples"] + snap["shadow_skipped_total"] == offers


def test_only_the_sampled_share_of_requests_is_offered() -> None:
    runner = _runner(LinearSession([np.eye(4)]), sample=0.25, rng=random.Random(7))
    x = np.ones((1, 4), np.float32)
    try:
        taken = [runner.offer({"x": x}, [x]) for _ in range(400) if runner.flush(10)]
        runner.flush(10)
        snap = runner.snapshot()
    finally:
        runner.close()
    draws = random.Random(7)
    expected = sum(draws.random() < 0.25 for _ in range(400))
    assert sum(taken) == expected == snap["shadow_samples"]
    assert snap["shadow_skipped_total"] == 0  # not sampled is not skipped


# --- never in the way of a request ------------------------------------------------------------------------------


def test_offer_never_waits_for_a_busy_shadow_and_drops_what_does_not_fit() -> None:
    entered, release = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        assert release.wait(30)

    runner = _runner(LinearSession([np.eye(4)], on_run=block), queue_size=2)
    x = np.ones((1, 4), np.float32)
    try:
        assert runner.offer({"x": x}, [x])
        assert entered.wait(10)  # the thread is inside the shadow session, which does not return
        # the queue takes two more; the next ones return at once, dropped, while the session still blocks
        results = [runner.offer({"x": x}, [x]) for _ in range(5)]
        assert not release.is_set()
        assert results == [True, True, False, False, False]
        assert runner.snapshot()["shadow_skipped_total"] == 3
        release.set()
        assert runner.flush(10)
        snap = runner.snapshot()
    finally:
        release.set()
        runner.close()
    assert snap["shadow_samples"] == 3 and snap["shadow_skipped_total"] == 3


def test_a_failing_shadow_is_counted_and_never_raises_into_the_request() -> None:
    session = LinearSession([np.eye(4)], fail=True)
    runner = _runner(session)
    x = np.ones((1, 4), np.float32)
    try:
        for _ in range(3):
            assert runner.offer({"x": x}, [x])
            assert runner.flush(10)
        runner.offer({"wrong": x}, [x])  # inputs it cannot take
        runner.flush(10)
        session.fail = False
        runner.offer({"x": x}, [np.ones((1, 7), np.float32)])  # outputs that cannot be compared
        runner.flush(10)
        runner.offer({"x": x}, [x])  # and it still works afterwards
        runner.flush(10)
        snap = runner.snapshot()
    finally:
        runner.close()
    assert snap["shadow_errors_total"] == 5 and snap["shadow_samples"] == 1 and snap["shadow_agreement"] == 1.0


def test_offer_swallows_whatever_goes_wrong_on_the_request_thread() -> None:
    def broken_clock() -> float:
        raise OSError("clock gone")

    runner = ShadowRunner(_model(LinearSession([np.eye(4)])), "top1", 1.0, 1.0, broken_clock,
                          cpu_clock=lambda: 0.0)
    try:
        assert runner.offer({"x": np.ones((1, 4), np.float32)}, []) is False
    finally:
        runner.close()


def test_the_serve_observer_hook_offers_answers_and_ignores_failures() -> None:
    runner = _runner(LinearSession([np.eye(4)]))
    x = np.ones((2, 4), np.float32)
    try:
        runner.answered("req-1", _model(LinearSession([np.eye(4)]), version=1), {"x": x}, {"y0": x}, 1.0)
        runner.failed(None, "error", None)
        runner.flush(10)
        assert runner.snapshot()["shadow_rows"] == 2
    finally:
        runner.close()


def test_close_ends_the_thread_and_later_offers_are_refused() -> None:
    runner = _runner(LinearSession([np.eye(4)]))
    runner.close()
    assert not runner._thread.is_alive()
    assert runner.offer({"x": np.ones((1, 4), np.float32)}, []) is False


@pytest.mark.parametrize(("budget", "sample", "size"), [(0.0, 0.1, 2), (1.5, 0.1, 2), (0.1, -0.1, 2),
                                                        (0.1, 1.1, 2), (0.1, 0.1, 0), (0.1, 0.1, 5)])
def test_bad_settings_are_refused(budget: float, sample: float, size: int) -> None:
    with pytest.raises(ValueError):
        ShadowRunner(_model(LinearSession([np.eye(4)])), "top1", budget, sample, queue_size=size)


# --- the signed deployment document -------------------------------------------------------------------------------


def _doc(shadow: object = None, **extra: object) -> bytes:
    doc: dict[str, object] = {"group": "lab", "bundle": "bundles/digits-1.bundle", "name": "digits", "version": 1,
                              "sha256": "a" * 64, **extra}
    if shadow is not None:
        doc["shadow"] = shadow
    return json.dumps(doc).encode()


def test_an_agent_that_knows_no_shadow_reads_the_deployment_the_same() -> None:
    shadow = {"bundle": "bundles/digits-2.bundle", "name": "digits", "version": 2, "sha256": "b" * 64}
    assert parse_deployment(_doc(shadow, future={"x": 1}), "lab") == parse_deployment(_doc(), "lab")
    assert parse_shadow(_doc(shadow), "lab") == ShadowEntry("bundles/digits-2.bundle", "digits", 2, "b" * 64)
    assert parse_shadow(_doc(), "lab") is None


@pytest.mark.parametrize("shadow", ["digits-2", {"bundle": "../x", "name": "d", "version": 2, "sha256": "b"},
                                    {"bundle": "bundles/d-2.bundle", "name": "d", "version": True, "sha256": "b"},
                                    {"bundle": "bundles/d-2.bundle", "name": "d", "version": 2}])
def test_a_malformed_shadow_entry_is_rejected_but_not_the_deployment(shadow: object) -> None:
    with pytest.raises(BundleRejected) as e:
        parse_shadow(_doc(shadow), "lab")
    assert e.value.reason == "malformed"
    assert parse_deployment(_doc(shadow), "lab")[1:] == ("digits", 1)


def _bundle(directory: Path, name: str, version: int, inputs: tuple[TensorSpec, ...] = (X,),
            task: str = "classification") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    out_spec = TensorSpec("logits", (-1, 3), "float32")
    art = Artifact("onnx", "model.int8.onnx", inputs, (out_spec,), {"name": "static"}, 97.5, 0.3, 0.1, 0.2)
    manifest = Manifest(name=name, version=version, task=task, created="2026-11-29T00:00:00+00:00",
                        inputs=inputs, outputs=(out_spec,), artifacts=(art,), metric="top1",
                        fp32_metric_value=97.8, max_drop=1.0, parity={"kind": "top1", "min_agreement": 0.97},
                        latency_budget_ms=5.0, target={"arch": ["x86_64"]}, preprocessing={},
                        provenance={"source_sha256": "0" * 64})
    member = directory / f"{name}-{version}.onnx"
    member.write_bytes(f"{name}-{version}".encode() * 100)
    out = directory / f"{name}-{version}.bundle"
    write_bundle(out, manifest, {"model.int8.onnx": member})
    member.unlink()
    return out


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    tuf_repo.init_repo(tmp_path / "repo")
    return tmp_path / "repo"


def _deployment(repo: Path, group: str = "lab") -> dict[str, object]:
    tf = tuf_repo.referenced_targets(repo)[f"deployments/{group}.json"]
    doc: dict[str, object] = json.loads(tuf_repo.target_file_path(repo, tf).read_bytes())
    return doc


def test_publish_with_a_shadow_signs_both_bundles_and_names_the_shadow(repo: Path, tmp_path: Path) -> None:
    v1, v2 = _bundle(tmp_path / "b", "digits", 1), _bundle(tmp_path / "b", "digits", 2)
    targets, added, _ = pub.sign_bundle(repo, v1, "lab", shadow=v2)
    assert [t.path for t in targets] == ["bundles/digits-1.bundle", "deployments/lab.json",
                                         "bundles/digits-2.bundle"]
    assert set(added) == {t.path for t in targets}
    doc = _deployment(repo)
    assert doc["shadow"] == {"bundle": "bundles/digits-2.bundle", "name": "digits", "version": 2,
                             "sha256": targets[2].hashes["sha256"]}
    assert parse_deployment(json.dumps(doc).encode(), "lab")[1:] == ("digits", 1)
    # publishing without --shadow rewrites the document whole: the shadow ends
    pub.sign_bundle(repo, v1, "lab")
    assert "shadow" not in _deployment(repo)


def test_unpublish_refuses_a_bundle_a_group_still_shadows(repo: Path, tmp_path: Path) -> None:
    v1, v2 = _bundle(tmp_path / "b", "digits", 1), _bundle(tmp_path / "b", "digits", 2)
    pub.sign_bundle(repo, v1, "lab", shadow=v2)
    with pytest.raises(InputError, match="in shadow"):
        pub.unpublish(repo, ["digits-2"], None, pub.topics_for("f"), None)
    pub.sign_bundle(repo, v1, "lab")
    assert pub.unpublish(repo, ["digits-2"], None, pub.topics_for("f"), None)[0] == ["bundles/digits-2.bundle"]


@pytest.mark.parametrize("why", ["itself", "inputs", "task"])
def test_a_shadow_that_could_not_run_beside_the_bundle_is_refused(repo: Path, tmp_path: Path, why: str) -> None:
    v1 = _bundle(tmp_path / "b", "digits", 1)
    other = {"itself": v1,
             "inputs": _bundle(tmp_path / "b", "digits", 2, inputs=(TensorSpec("image", (-1, 4), "float32"),)),
             "task": _bundle(tmp_path / "b", "digits", 3, task="regression")}[why]
    with pytest.raises(InputError, match="--shadow"):
        pub.sign_bundle(repo, v1, "lab", shadow=other)
    assert "deployments/lab.json" not in tuf_repo.referenced_targets(repo)  # nothing was signed


# --- the fetch client's view of a CHECK answer ----------------------------------------------------------------------


CHECK = {"name": "digits", "version": 1, "sha256": "a" * 64, "length": 10, "chunks": 1}


def test_a_check_answer_carries_the_shadow() -> None:
    shadow = {"name": "digits", "version": 2, "sha256": "b" * 64, "length": 10, "chunks": 4}
    assert candidate_from({**CHECK, "shadow": shadow}) == Candidate("digits", 1, "a" * 64, 1,
                                                                    ShadowCandidate("digits", 2, "b" * 64, 4))


@pytest.mark.parametrize("shadow", [None, "x", {"name": "digits"}, {"name": "d", "version": "two", "sha256": "b"}])
def test_no_or_a_malformed_shadow_leaves_the_candidate_alone(shadow: object) -> None:
    out = dict(CHECK) if shadow is None else {**CHECK, "shadow": shadow}
    assert candidate_from(out) == Candidate("digits", 1, "a" * 64, 1, None)
