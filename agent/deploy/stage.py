"""STAGE: load a verified bundle's model(s) in fresh runtime sessions, warm them, check parity, pick the fastest.

Before this process imports a runtime for the first time (a format at a runtime version), the device's
`RuntimeProbe` (agent/runtime/probe.py) imports it and runs the artifact on the golden rows once in a child
process: a runtime that fails to import there, or dies of a CPU fault (SIGILL, SIGSEGV, SIGBUS) at any point, is
marked unusable (persisted) and its artifacts are skipped; a bundle left with none is rejected with reason
`no_usable_runtime`. Any other death or a timeout after the import blames that artifact only, for this STAGE.

Staging only ever creates new sessions and returns them; it touches nothing the currently serving model uses and
keeps no global state besides the (read-only) cache of which runtimes import on this device. So a bundle that
fails here costs only the time it took: the running model never notices.

The pieces are separable for testing: `runnable_artifacts` (which artifacts this device can run) and
`parity_check` (do the outputs match the packager's golden outputs) are pure; `stage_bundle` does the I/O.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import platform
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import GOLDEN_FILE, Artifact, Manifest, golden_input_key, golden_output_key
from agent.errors import BundleRejected, RejectReason, RuntimeUnavailable
from agent.runtime import ModelSession, open_session
from agent.runtime.probe import PROBE_START_S, ProbeTarget, RuntimeProbe, Verdict

log = logging.getLogger(__name__)

# format -> candidate (import name, distribution name), best first
_RUNTIME_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "onnx": (("onnxruntime", "onnxruntime"),),
    "tflite": (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime")),
}
# what to install, for messages
_RUNTIME_PACKAGE = {"onnx": "onnxruntime", "tflite": "ai-edge-litert"}
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}
# Stop timing a slow model after this long (with at least MIN_TIMING_RUNS samples), so STAGE stays bounded.
DEFAULT_MAX_TIMING_S = 10.0
MIN_TIMING_RUNS = 20


# --- the device -----------------------------------------------------------------------------------------------


def _installed_version(module: str, dist: str) -> str | None:
    """The runtime's version if its module can be found, without importing it: an imported runtime stays in
    memory for good (LiteRT alone is ~8 MiB of RSS on a device that only ever runs ONNX). A broken install is
    caught later, when STAGE opens a session, as a load failure of that artifact."""
    top, _, sub = module.partition(".")
    try:
        # find_spec on "pkg.sub" would execute pkg/__init__.py (ai_edge_litert's loads libLiteRt.so): look only
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as e:
        log.debug("runtime module %s is not importable: %s", module, e)
        return None
    if spec is None:
        return None
    if sub:
        places = [Path(p) for p in (spec.submodule_search_locations or [])]
        leaf = sub.replace(".", "/")
        if not any((p / f"{leaf}.py").exists() or (p / leaf).is_dir() or any(p.glob(f"{leaf}.*.so"))
                   for p in places):
            return None
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


@functools.cache
def _probe_runtimes() -> tuple[tuple[str, str], ...]:
    found: list[tuple[str, str]] = []
    for fmt, candidates in _RUNTIME_MODULES.items():
        for module, dist in candidates:
            v = _installed_version(module, dist)
            if v is not None:
                found.append((fmt, v))
                break
    return tuple(found)


def installed_runtimes() -> dict[str, str]:
    """Model format -> version of the runtime that runs it, for the runtimes installed here.

    Looks them up once (without importing them) and caches the answer for the process; callers get a fresh
    dict, so mutating it does not change the cache.
    """
    return dict(_probe_runtimes())


def normalize_arch(arch: str) -> str:
    """`x86_64`/`amd64` and `aarch64`/`arm64` are the same machine under different names."""
    a = arch.strip().lower()
    return _ARCH_ALIASES.get(a, a)


@dataclass(frozen=True)
class DeviceProfile:
    """What a bundle's target constraints are checked against."""

    arch: str
    total_ram_mb: int
    runtimes: Mapping[str, str] = field(default_factory=dict)  # format -> runtime version
    # the runtime probe and its persisted verdicts; None: runtimes are imported in this process without one
    probe: RuntimeProbe | None = field(default=None, compare=False, repr=False)

    @classmethod
    def detect(cls, probe_dir: Path | None = None, stage_timeout_s: float | None = None) -> DeviceProfile:
        """This device. With `probe_dir` (the agent's state directory) runtimes are probed before they are
        imported here, each probe bounded by `stage_timeout_s` (the agent's [deploy] stage_timeout_s: a model
        load) plus PROBE_START_S for the child's start and imports."""
        import psutil

        probe = None
        if probe_dir is not None:
            probe = (RuntimeProbe(probe_dir) if stage_timeout_s is None
                     else RuntimeProbe(probe_dir, stage_timeout_s + PROBE_START_S))
        return cls(
            arch=platform.machine(),
            total_ram_mb=int(psutil.virtual_memory().total // (1 << 20)),
            runtimes=dict(installed_runtimes()),
            probe=probe,
        )

    def probes_due(self, manifest: Manifest) -> int:
        """How many runtime probes staging `manifest` will run (runtimes not yet probed at their version): each
        may take up to the probe's timeout, on top of the staging itself."""
        if self.probe is None:
            return 0
        formats = {a.format for a in manifest.artifacts if why_not_runnable(a, manifest.target, self) is None}
        return sum(1 for f in formats if self.probe.due(f, self.runtimes[f]))

    def probe_budget_s(self, manifest: Manifest) -> float:
        """The longest the runtime probes staging `manifest` will run can take (seconds, 0 when none is due): the
        daemon's bound on STAGE grows by this."""
        return 0.0 if self.probe is None else self.probes_due(manifest) * self.probe.timeout_s


# --- which artifacts can run here (pure) ----------------------------------------------------------------------


def _target_arches(target: Mapping[str, Any]) -> list[str] | None:
    raw = target.get("arch")
    if raw is None:
        return None  # no constraint
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise BundleRejected("manifest target.arch must be a list of architecture names", reason="manifest")
    return raw


def _target_min_ram(target: Mapping[str, Any]) -> float:
    raw = target.get("min_ram_mb", 0)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
        raise BundleRejected("manifest target.min_ram_mb must be a non-negative number", reason="manifest")
    return float(raw)


def why_not_runnable(artifact: Artifact, target: Mapping[str, Any], device: DeviceProfile) -> str | None:
    """None when `device` can run `artifact`, else a short reason (without the format prefix)."""
    reasons = []
    arches = _target_arches(target)
    if arches is not None and normalize_arch(device.arch) not in {normalize_arch(a) for a in arches}:
        reasons.append(f"built for {', '.join(arches) or 'no architecture'}, this device is {device.arch}")
    min_ram = _target_min_ram(target)
    if device.total_ram_mb < min_ram:
        need = str(int(min_ram)) if min_ram.is_integer() else f"{min_ram:g}"
        reasons.append(f"needs {need} MB RAM, device has {device.total_ram_mb}")
    if artifact.format not in device.runtimes:
        reasons.append(f"{_RUNTIME_PACKAGE.get(artifact.format, artifact.runtime)} is not installed")
    return "; ".join(reasons) or None


def runnable_artifacts(manifest: Manifest, device: DeviceProfile) -> list[Artifact]:
    """The manifest's artifacts `device` can run, in manifest order; `BundleRejected("unsupported")` if none."""
    ok: list[Artifact] = []
    why: list[str] = []
    for a in manifest.artifacts:
        reason = why_not_runnable(a, manifest.target, device)
        if reason is None:
            ok.append(a)
        else:
            why.append(f"{a.format}: {reason}")
    if not ok:
        raise BundleRejected(f"{manifest.name} v{manifest.version}: no artifact runs on this device: "
                             + "; ".join(why), reason="unsupported")
    for line in why:
        log.info("%s v%s: skipping %s", manifest.name, manifest.version, line)
    return ok


# --- parity (pure) --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityResult:
    passed: bool
    value: float  # top1: agreement fraction; cosine: mean cosine; tolerance: max abs error
    detail: str


def _number(spec: Mapping[str, Any], key: str) -> float:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BundleRejected(f"parity {spec.get('kind')!r}: {key!r} must be a finite number, got {v!r}",
                             reason="manifest")
    return float(v)


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).astype(np.float64) if a.ndim > 0 else a.reshape(1, 1).astype(np.float64)


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity; rows that are both all-zero count as identical."""
    a2, b2 = _rows(a), _rows(b)
    na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
    dot = np.sum(a2 * b2, axis=1)
    cos = np.where((na == 0) & (nb == 0), 1.0, dot / np.maximum(na * nb, 1e-12))
    return float(np.mean(cos))


def parity_check(kind_spec: Mapping[str, Any], expected: Sequence[np.ndarray],
                 got: Sequence[np.ndarray]) -> ParityResult:
    """Do `got` (this device's outputs on the golden inputs) match `expected` (the packager's) per the manifest?

    - `{"kind": "top1", "min_agreement": f}`: fraction of rows whose arg-max agrees, on the first output;
    - `{"kind": "cosine", "min": f}`: mean row-wise cosine similarity (the worst output's, if several);
    - `{"kind": "tolerance", "atol": a, "rtol": r}`: `np.allclose` on every output; value = max abs error.

    A different number of outputs, a shape mismatch or non-finite values fail (value NaN). An unknown kind or
    bad threshold is a bad manifest: `BundleRejected(reason="manifest")`.
    """
    kind = kind_spec.get("kind")
    if kind == "top1":
        threshold = _number(kind_spec, "min_agreement")
    elif kind == "cosine":
        threshold = _number(kind_spec, "min")
    elif kind == "tolerance":
        atol, rtol = _number(kind_spec, "atol"), _number(kind_spec, "rtol")
    else:
        raise BundleRejected(f"unknown parity kind {kind!r} (expected top1, cosine or tolerance)", reason="manifest")

    exp = [np.asarray(e) for e in expected]
    out = [np.asarray(g) for g in got]
    if not exp:
        return ParityResult(False, math.nan, "no expected outputs to compare against")
    if len(out) != len(exp):
        return ParityResult(False, math.nan, f"model gave {len(out)} outputs, golden has {len(exp)}")
    for i, (e, g) in enumerate(zip(exp, out, strict=True)):
        if e.shape != g.shape:
            return ParityResult(False, math.nan, f"output {i}: shape {g.shape}, golden has {e.shape}")
        if g.dtype.kind in "fc" and not np.all(np.isfinite(g)):
            return ParityResult(False, math.nan, f"output {i}: non-finite values (NaN or inf)")

    if kind == "top1":
        e0, g0 = _rows(exp[0]), _rows(out[0])
        same = int(np.sum(np.argmax(e0, axis=1) == np.argmax(g0, axis=1)))
        value = same / len(e0) if len(e0) else math.nan
        ok = value >= threshold
        return ParityResult(ok, value, f"top1 agreement {value:.4f} ({same}/{len(e0)} rows) "
                                       f"{'>=' if ok else '<'} {threshold:g}")
    if kind == "cosine":
        per_output = [_mean_cosine(e, g) for e, g in zip(exp, out, strict=True)]
        value = min(per_output)
        ok = value >= threshold
        return ParityResult(ok, value, f"mean cosine {value:.6f} {'>=' if ok else '<'} {threshold:g}")
    # tolerance
    close = [bool(np.allclose(g, e, atol=atol, rtol=rtol)) for e, g in zip(exp, out, strict=True)]
    value = max(float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)), initial=0.0))
                for e, g in zip(exp, out, strict=True))
    ok = all(close)
    bad = [str(i) for i, c in enumerate(close) if not c]
    where = "" if ok else f" (output {', '.join(bad)} outside)"
    return ParityResult(ok, value, f"max abs error {value:.6g}; atol {atol:g} rtol {rtol:g}{where}")


# --- staging (I/O) --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedModel:
    """The staged winner, ready for ACTIVATE to swap in, plus what the daemon reports in its `staged` event."""

    fmt: str
    session: ModelSession
    artifact: Artifact
    parity: ParityResult
    timings: dict[str, dict[str, float]]  # format -> {"p50_ms", "p95_ms", "parity"} for every passing candidate
    choice_reason: str
    failures: dict[str, str] = field(default_factory=dict)  # format -> why it was not a candidate
    unusable: tuple[Verdict, ...] = ()  # the runtimes skipped because the probe marked them unusable

    def to_event(self) -> dict[str, Any]:
        """JSON-ready summary: the choice, why, every candidate's timings, every failure and unusable runtime."""
        return {"format": self.fmt, "choice_reason": self.choice_reason,
                "parity": {"passed": self.parity.passed, "value": self.parity.value, "detail": self.parity.detail},
                "timings": {f: dict(t) for f, t in self.timings.items()}, "failures": dict(self.failures),
                "unusable_runtimes": [v.to_json() for v in self.unusable]}


@dataclass(frozen=True)
class _Failure:
    stage: str  # "runtime" (the probe marked it unusable) | "load" | "run" | "parity"
    message: str
    verdict: Verdict | None = None  # stage "runtime": the probe's verdict


def _load_golden(bundle_dir: Path) -> dict[str, np.ndarray]:
    path = bundle_dir / GOLDEN_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # missing, not an npz, pickled objects
        raise BundleRejected(f"cannot read {GOLDEN_FILE} for the parity check: {e}", reason="parity") from e


def _golden_for(artifact: Artifact, golden: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                                list[np.ndarray]]:
    """The golden inputs (by the artifact's input names) and this format's expected outputs; KeyError if absent."""
    inputs = {}
    for spec in artifact.inputs:
        key = golden_input_key(spec.name)
        if key not in golden:
            raise KeyError(f"{GOLDEN_FILE} has no {key!r}")
        inputs[spec.name] = golden[key]
    expected = []
    for i in range(len(artifact.outputs)):
        key = golden_output_key(artifact.format, i)
        if key not in golden:
            raise KeyError(f"{GOLDEN_FILE} has no {key!r}")
        expected.append(golden[key])
    rows = {len(a) for a in inputs.values()}
    if len(rows) != 1 or 0 in rows:
        raise KeyError(f"{GOLDEN_FILE} inputs must have the same, non-zero number of rows, got {sorted(rows)}")
    return inputs, expected


def _time_batch1(session: ModelSession, row_feeds: Sequence[dict[str, np.ndarray]], runs: int,
                 max_seconds: float) -> tuple[float, float, int]:
    """Median and p95 (ms) of batch-1 runs cycling through `row_feeds`; bounded by `max_seconds`."""
    seconds: list[float] = []
    floor = min(runs, MIN_TIMING_RUNS)
    deadline = time.monotonic() + max_seconds
    while len(seconds) < runs and (len(seconds) < floor or time.monotonic() < deadline):
        feed = row_feeds[len(seconds) % len(row_feeds)]
        t0 = time.perf_counter()
        session.run(feed)
        seconds.append(time.perf_counter() - t0)
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), len(ms)


def _probe(bundle_dir: Path, artifact: Artifact, label: str, device: DeviceProfile) -> _Failure | None:
    """None when this process may import `artifact`'s runtime (it passed the probe, now or before), else why not."""
    if device.probe is None:
        return None
    target = ProbeTarget(artifact.format, bundle_dir / artifact.file, bundle_dir / GOLDEN_FILE,
                         [s.name for s in artifact.inputs], [s.name for s in artifact.outputs], label)
    verdict = device.probe.check(target, device.runtimes[artifact.format])
    if verdict.usable:
        return None
    if verdict.blame == "runtime":
        return _Failure("runtime", f"{verdict.runtime} {verdict.version} is unusable on this device: {verdict.why}",
                        verdict)
    return _Failure("run" if verdict.phase == "run" else "load", f"runtime probe: {verdict.why}")


def _try_artifact(bundle_dir: Path, artifact: Artifact, parity_spec: Mapping[str, Any],
                  golden: Mapping[str, np.ndarray], threads: int, warmup: int, timing_runs: int,
                  max_timing_s: float, device: DeviceProfile,
                  label: str) -> tuple[ModelSession, ParityResult, dict[str, float]] | _Failure:
    fmt = artifact.format
    try:
        inputs, expected = _golden_for(artifact, golden)
    except KeyError as e:
        return _Failure("parity", f"no golden data to check it against: {e.args[0]}")
    refused = _probe(bundle_dir, artifact, label, device)
    if refused is not None:
        return refused
    try:
        session = open_session(bundle_dir / artifact.file, fmt, threads=threads,
                               input_names=[s.name for s in artifact.inputs],
                               output_names=[s.name for s in artifact.outputs])
    except (RuntimeUnavailable, ValueError, OSError) as e:
        return _Failure("load", f"failed to load {artifact.file}: {e}")

    n = len(next(iter(inputs.values())))
    row_feeds = [{k: v[i:i + 1] for k, v in inputs.items()} for i in range(n)]
    try:
        for i in range(warmup):
            session.run(row_feeds[i % n])
        got = session.run(inputs)
    except Exception as e:  # the runtimes raise their own types (onnxruntime's pybind errors); this is the boundary
        return _Failure("run", f"failed to run the golden inputs: {type(e).__name__}: {e}")

    parity = parity_check(parity_spec, expected, got)
    if not parity.passed:
        return _Failure("parity", f"parity check failed: {parity.detail}")
    try:
        p50, p95, runs = _time_batch1(session, row_feeds, timing_runs, max_timing_s)
    except Exception as e:  # as above
        return _Failure("run", f"failed while timing: {type(e).__name__}: {e}")
    log.info("staged %s: %s; batch-1 p50 %.4f ms p95 %.4f ms over %d runs", fmt, parity.detail, p50, p95, runs)
    return session, parity, {"p50_ms": round(p50, 4), "p95_ms": round(p95, 4), "parity": parity.value}


def stage_bundle(bundle_dir: Path, manifest: Manifest, device: DeviceProfile, threads: int = 1, warmup: int = 20,
                 timing_runs: int = 100, max_timing_s: float = DEFAULT_MAX_TIMING_S) -> StagedModel:
    """Open every artifact `device` can run from the extracted, verified bundle in `bundle_dir`, each in a new
    session; warm it up, run the golden inputs and check parity, then time batch-1 runs. The fastest (median)
    artifact that passes parity wins.

    With `device.probe`, each artifact's runtime is probed in a child process before this process imports it
    (agent/runtime/probe.py); an artifact whose runtime the probe marked unusable is skipped.

    Raises `BundleRejected`: "unsupported" (nothing runs on this device), "no_usable_runtime" (every artifact's
    runtime is marked unusable by the probe), "parity" (some artifact ran but none matched its golden outputs, or
    golden.npz is unreadable), "load_failed" (no artifact could be loaded or run).
    """
    if warmup < 0 or timing_runs < 1:
        raise ValueError("warmup must be >= 0 and timing_runs >= 1")
    candidates = runnable_artifacts(manifest, device)
    golden = _load_golden(bundle_dir)
    passed: dict[str, tuple[Artifact, ModelSession, ParityResult]] = {}
    timings: dict[str, dict[str, float]] = {}
    failures: dict[str, _Failure] = {}
    for artifact in candidates:
        result = _try_artifact(bundle_dir, artifact, manifest.parity, golden, threads, warmup, timing_runs,
                               max_timing_s, device, f"{manifest.name} v{manifest.version}")
        if isinstance(result, _Failure):
            log.warning("%s v%s: %s %s", manifest.name, manifest.version, artifact.format, result.message)
            failures[artifact.format] = result
            continue
        session, parity, timing = result
        passed[artifact.format] = (artifact, session, parity)
        timings[artifact.format] = timing

    failure_text = {f: x.message for f, x in failures.items()}
    unusable = tuple(x.verdict for x in failures.values() if x.verdict is not None)
    if not passed:
        reason: RejectReason = ("no_usable_runtime" if all(x.stage == "runtime" for x in failures.values())
                                else "parity" if any(x.stage == "parity" for x in failures.values())
                                else "load_failed")
        raise BundleRejected(f"{manifest.name} v{manifest.version}: no artifact passed staging: "
                             + "; ".join(f"{f}: {m}" for f, m in failure_text.items()), reason=reason)

    fmt = min(timings, key=lambda f: (timings[f]["p50_ms"], timings[f]["p95_ms"]))
    artifact, session, parity = passed[fmt]
    reason_text = _choice_reason(fmt, timings, failure_text, len(manifest.artifacts) - len(candidates))
    if timings[fmt]["p95_ms"] > manifest.latency_budget_ms:
        log.warning("%s v%s: %s p95 %.3f ms is over the latency budget of %g ms", manifest.name, manifest.version,
                    fmt, timings[fmt]["p95_ms"], manifest.latency_budget_ms)
    log.info("%s v%s: chose %s: %s", manifest.name, manifest.version, fmt, reason_text)
    # Losing sessions are dropped here (only the winner is returned) and freed with their last reference.
    return StagedModel(fmt, session, artifact, parity, timings, reason_text, failure_text, unusable)


def _choice_reason(fmt: str, timings: Mapping[str, Mapping[str, float]], failures: Mapping[str, str],
                   unsupported: int) -> str:
    t = timings[fmt]
    if len(timings) > 1:
        others = ", ".join(f"{f} {v['p50_ms']:.4f} ms" for f, v in sorted(timings.items()) if f != fmt)
        text = f"{fmt} is fastest: batch-1 p50 {t['p50_ms']:.4f} ms vs {others}"
    else:
        text = f"{fmt} is the only artifact that passed staging (batch-1 p50 {t['p50_ms']:.4f} ms)"
    if failures:
        text += "; " + "; ".join(f"{f}: {m}" for f, m in sorted(failures.items()))
    if unsupported:
        text += f"; {unsupported} artifact(s) not runnable on this device"
    return text


__all__ = ["DeviceProfile", "ParityResult", "StagedModel", "installed_runtimes", "normalize_arch",
           "parity_check", "runnable_artifacts", "stage_bundle", "why_not_runnable"]
