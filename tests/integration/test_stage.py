"""STAGE on a real digits bundle: real onnxruntime and LiteRT sessions, real golden files, real corruption."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import Manifest, verify_bundle
from agent.deploy.stage import (
    DeviceProfile,
    installed_runtimes,
    normalize_arch,
    parity_check,
    runnable_artifacts,
    stage_bundle,
)
from agent.errors import BundleRejected
from examples.digits.train import train_digits
from packager.build import BuildOptions, Progress, build

pytestmark = pytest.mark.slow

FAST = {"warmup": 5, "timing_runs": 50}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real two-format bundle, built once for the module (~30 s: 2 epochs, short latency runs)."""
    tmp = tmp_path_factory.mktemp("stage-build")
    paths = train_digits(tmp / "digits", epochs=2)
    result = build(BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                                out_dir=tmp / "out", formats=("onnx", "tflite"), latency_runs=20),
                   Progress(0, enabled=False))
    return result.bundle


@pytest.fixture
def extracted(bundle: Path, tmp_path: Path) -> tuple[Path, Manifest]:
    """A fresh verified extraction per test, so tests may tamper with their own copy."""
    dest = tmp_path / "bundle"
    return dest, verify_bundle(bundle, dest=dest).manifest


@pytest.fixture(scope="module")
def device() -> DeviceProfile:
    return DeviceProfile.detect()


def _golden(bundle_dir: Path) -> dict[str, np.ndarray]:
    with np.load(bundle_dir / "golden.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a half-written file, as after a bad flash write


# --- the device and what it can run ----------------------------------------------------------------------------


def test_both_artifacts_are_runnable_here(extracted: tuple[Path, Manifest], device: DeviceProfile) -> None:
    _, manifest = extracted
    assert {"onnx", "tflite"} <= set(installed_runtimes())
    assert installed_runtimes() is not installed_runtimes()  # callers get copies of the cached answer
    assert device.total_ram_mb > 0 and device.arch
    assert [a.format for a in runnable_artifacts(manifest, device)] == ["onnx", "tflite"]


@pytest.mark.parametrize(("target", "needle"), [
    ({"arch": ["riscv64"], "min_ram_mb": 65}, "built for riscv64"),
    ({"arch": ["x86_64", "aarch64"], "min_ram_mb": 10**9}, "needs 1000000000 MB RAM"),
])
def test_a_target_this_device_does_not_meet_is_unsupported(extracted: tuple[Path, Manifest], device: DeviceProfile,
                                                            target: dict[str, object], needle: str) -> None:
    bundle_dir, manifest = extracted
    if normalize_arch(device.arch) not in ("x86_64", "aarch64"):
        pytest.skip("the default target lists x86_64 and aarch64 only")
    bad = replace(manifest, target=target)
    with pytest.raises(BundleRejected) as exc:
        stage_bundle(bundle_dir, bad, device, **FAST)
    assert exc.value.reason == "unsupported"
    msg = str(exc.value)
    assert f"onnx: {needle}" in msg and f"tflite: {needle}" in msg, msg


def test_unsupported_message_says_why_for_each_artifact(extracted: tuple[Path, Manifest]) -> None:
    _, manifest = extracted
    small = DeviceProfile(arch="aarch64", total_ram_mb=256, runtimes={"onnx": "1.32.0"})
    demanding = replace(manifest, target={**manifest.target, "min_ram_mb": 512})
    with pytest.raises(BundleRejected) as exc:
        runnable_artifacts(demanding, small)
    assert exc.value.reason == "unsupported"
    assert "onnx: needs 512 MB RAM, device has 256" in str(exc.value)
    assert "tflite: needs 512 MB RAM, device has 256; ai-edge-litert is not installed" in str(exc.value)


@pytest.mark.parametrize(("device_arch", "target_arch", "ok"), [
    ("x86_64", ["amd64"], True), ("AMD64", ["x86_64"], True), ("arm64", ["aarch64"], True),
    ("aarch64", ["arm64"], True), ("aarch64", ["x86_64"], False), ("armv7l", ["aarch64"], False),
])
def test_arch_aliases(extracted: tuple[Path, Manifest], device_arch: str, target_arch: list[str], ok: bool) -> None:
    _, manifest = extracted
    dev = DeviceProfile(arch=device_arch, total_ram_mb=4096, runtimes={"onnx": "1", "tflite": "1"})
    m = replace(manifest, target={**manifest.target, "arch": target_arch})
    if ok:
        assert len(runnable_artifacts(m, dev)) == 2
    else:
        with pytest.raises(BundleRejected) as exc:
            runnable_artifacts(m, dev)
        assert exc.value.reason == "unsupported" and f"this device is {device_arch}" in str(exc.value)


def test_a_missing_runtime_leaves_the_other_artifact(extracted: tuple[Path, Manifest], device: DeviceProfile) -> None:
    bundle_dir, manifest = extracted
    onnx_only = replace(device, runtimes={"onnx": device.runtimes["onnx"]})
    staged = stage_bundle(bundle_dir, manifest, onnx_only, **FAST)
    assert staged.fmt == "onnx" and set(staged.timings) == {"onnx"}
    assert "not runnable" in staged.choice_reason


# --- staging ---------------------------------------------------------------------------------------------------


def test_stage_picks_the_fastest_and_reports_both_timings(extracted: tuple[Path, Manifest],
                                                          device: DeviceProfile) -> None:
    bundle_dir, manifest = extracted
    staged = stage_bundle(bundle_dir, manifest, device, **FAST)
    assert set(staged.timings) == {"onnx", "tflite"}
    for t in staged.timings.values():
        assert set(t) == {"p50_ms", "p95_ms", "parity"}
        assert 0 < t["p50_ms"] <= t["p95_ms"]
        assert t["parity"] >= manifest.parity["min_agreement"]
    assert staged.fmt == min(staged.timings, key=lambda f: staged.timings[f]["p50_ms"])
    assert staged.artifact.format == staged.fmt and staged.session.format == staged.fmt
    assert staged.parity.passed and staged.parity.value >= 0.97
    assert "onnx" in staged.choice_reason and "tflite" in staged.choice_reason
    assert staged.failures == {}
    event = json.loads(json.dumps(staged.to_event()))  # the daemon puts this in its event as is
    assert event["format"] == staged.fmt and set(event["timings"]) == {"onnx", "tflite"}
    # The staged session is ready to serve, with the manifest's tensor names.
    golden = _golden(bundle_dir)
    x = golden[f"input.{manifest.inputs[0].name}"][:3]
    out = staged.session.run({manifest.inputs[0].name: x})
    assert out[0].shape == (3, 10)
    print(f"\nstage on {device.arch}: chose {staged.fmt}; {staged.timings}")


def test_tampered_golden_outputs_are_rejected_for_parity(extracted: tuple[Path, Manifest],
                                                         device: DeviceProfile) -> None:
    bundle_dir, manifest = extracted
    golden = _golden(bundle_dir)
    rng = np.random.default_rng(0)
    for key in [k for k in golden if ".output." in k]:
        golden[key] = golden[key][rng.permutation(len(golden[key]))]
    np.savez(bundle_dir / "golden.npz", allow_pickle=False, **golden)
    with pytest.raises(BundleRejected) as exc:
        stage_bundle(bundle_dir, manifest, device, **FAST)
    assert exc.value.reason == "parity"
    msg = str(exc.value)
    assert "onnx: parity check failed: top1 agreement" in msg and "tflite: parity check failed" in msg, msg


@pytest.mark.parametrize("broken", ["onnx", "tflite"])
def test_a_corrupt_artifact_fails_to_load_and_the_other_is_chosen(extracted: tuple[Path, Manifest],
                                                                  device: DeviceProfile, broken: str) -> None:
    bundle_dir, manifest = extracted
    _truncate(bundle_dir / manifest.artifact(broken).file)
    staged = stage_bundle(bundle_dir, manifest, device, **FAST)
    other = {"onnx": "tflite", "tflite": "onnx"}[broken]
    assert staged.fmt == other and set(staged.timings) == {other}
    assert set(staged.failures) == {broken} and "failed to load" in staged.failures[broken]
    assert broken in staged.choice_reason


def test_both_artifacts_corrupt_is_load_failed(extracted: tuple[Path, Manifest], device: DeviceProfile) -> None:
    bundle_dir, manifest = extracted
    for a in manifest.artifacts:
        _truncate(bundle_dir / a.file)
    with pytest.raises(BundleRejected) as exc:
        stage_bundle(bundle_dir, manifest, device, **FAST)
    assert exc.value.reason == "load_failed"
    assert "onnx: failed to load" in str(exc.value) and "tflite: failed to load" in str(exc.value)


def test_a_failed_stage_leaves_the_serving_session_alone(bundle: Path, tmp_path: Path,
                                                         device: DeviceProfile) -> None:
    good = tmp_path / "good"
    manifest = verify_bundle(bundle, dest=good).manifest
    serving = stage_bundle(good, manifest, device, **FAST)
    golden = _golden(good)
    feeds = {s.name: golden[f"input.{s.name}"] for s in serving.artifact.inputs}
    before = serving.session.run(feeds)

    bad = tmp_path / "bad"
    verify_bundle(bundle, dest=bad)
    for a in manifest.artifacts:
        _truncate(bad / a.file)
    with pytest.raises(BundleRejected):
        stage_bundle(bad, manifest, device, **FAST)
    after = serving.session.run(feeds)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


def test_unreadable_golden_is_rejected_for_parity(extracted: tuple[Path, Manifest], device: DeviceProfile) -> None:
    bundle_dir, manifest = extracted
    (bundle_dir / "golden.npz").write_bytes(b"not an npz")
    with pytest.raises(BundleRejected) as exc:
        stage_bundle(bundle_dir, manifest, device, **FAST)
    assert exc.value.reason == "parity"


# --- parity_check (pure) ---------------------------------------------------------------------------------------


def _logits(labels: list[int], classes: int = 4) -> np.ndarray:
    out = np.zeros((len(labels), classes), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 5.0
    return out


def test_parity_top1() -> None:
    expected = [_logits([0, 1, 2, 3] * 25)]
    same = parity_check({"kind": "top1", "min_agreement": 0.97}, expected, [expected[0] + 0.1])
    assert same.passed and same.value == 1.0 and "100/100" in same.detail
    off = expected[0].copy()
    off[:4] = _logits([1, 2, 3, 0])  # 4 of 100 rows disagree: 0.96 < 0.97
    r = parity_check({"kind": "top1", "min_agreement": 0.97}, expected, [off])
    assert not r.passed and r.value == pytest.approx(0.96)
    assert parity_check({"kind": "top1", "min_agreement": 0.96}, expected, [off]).passed


def test_parity_top1_uses_the_first_output_only() -> None:
    expected = [_logits([0, 1, 2]), np.ones((3, 2), dtype=np.float32)]
    got = [_logits([0, 1, 2]), np.zeros((3, 2), dtype=np.float32)]
    assert parity_check({"kind": "top1", "min_agreement": 1.0}, expected, got).passed


def test_parity_cosine() -> None:
    rng = np.random.default_rng(1)
    e = rng.normal(size=(16, 32)).astype(np.float32)
    near = e + rng.normal(scale=0.01, size=e.shape).astype(np.float32)
    ok = parity_check({"kind": "cosine", "min": 0.99}, [e], [near])
    assert ok.passed and 0.99 <= ok.value <= 1.0
    r = parity_check({"kind": "cosine", "min": 0.99}, [e], [rng.normal(size=e.shape).astype(np.float32)])
    assert not r.passed and r.value < 0.5
    zeros = np.zeros((2, 4), dtype=np.float32)
    assert parity_check({"kind": "cosine", "min": 0.99}, [zeros], [zeros]).value == 1.0
    # several outputs: the worst one decides
    worst = parity_check({"kind": "cosine", "min": 0.99}, [e, e], [near, -e])
    assert not worst.passed and worst.value == pytest.approx(-1.0, abs=1e-6)


def test_parity_tolerance() -> None:
    e = [np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), np.array([[10.0]], dtype=np.float32)]
    g = [e[0] + 0.01, e[1] + 0.3]
    ok = parity_check({"kind": "tolerance", "atol": 0.05, "rtol": 0.05}, e, g)
    assert ok.passed and ok.value == pytest.approx(0.3, abs=1e-5)  # |0.3| <= 0.05 + 0.05 * 10
    r = parity_check({"kind": "tolerance", "atol": 0.05, "rtol": 0.0}, e, g)
    assert not r.passed and r.value == pytest.approx(0.3, abs=1e-5) and "output 1" in r.detail


@pytest.mark.parametrize("got", [
    [np.zeros((3, 4), dtype=np.float32)],  # wrong shape
    [np.zeros((2, 4), dtype=np.float32)] * 2,  # wrong number of outputs
    [np.full((2, 4), np.nan, dtype=np.float32)],  # NaN
])
@pytest.mark.parametrize("spec", [{"kind": "top1", "min_agreement": 0.0}, {"kind": "cosine", "min": -1.0},
                                  {"kind": "tolerance", "atol": 1e9, "rtol": 1.0}])
def test_parity_fails_on_malformed_outputs(spec: dict[str, object], got: list[np.ndarray]) -> None:
    r = parity_check(spec, [np.zeros((2, 4), dtype=np.float32)], got)
    assert not r.passed and math.isnan(r.value)


@pytest.mark.parametrize("spec", [{"kind": "l2"}, {"kind": "top1"}, {"kind": "cosine", "min": "high"},
                                  {"kind": "tolerance", "atol": 0.1}, {}])
def test_parity_bad_spec_is_a_manifest_error(spec: dict[str, object]) -> None:
    x = [np.zeros((2, 4), dtype=np.float32)]
    with pytest.raises(BundleRejected) as exc:
        parity_check(spec, x, x)
    assert exc.value.reason == "manifest"
