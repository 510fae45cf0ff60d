"""Measure the device agent (`edge-agent run`) against its targets on this machine and write one JSON file.

    python benchmarks/agent_bench.py [--out benchmarks/results/agent.json] [--steady S] [--rate R] [--no-variants]
    python benchmarks/agent_bench.py --scenario large-batch [--out benchmarks/results/agent.json]

Everything runs through the real daemon process, against a throwaway mosquitto on a free port
(`examples/local_broker.py`, never a system broker on 1883), all on 127.0.0.1:

- setup: the examples/digits CNN is trained and built twice with `packager.build.build` (formats ("onnx",),
  versions 1 and 2: the int8 QDQ ONNX artifact only), a fresh TUF repository is initialised, and a real
  `edge-agent run` process is started with probation_s = 5 (and no request cap, so probation lasts 5 s).
- memory: RSS of the agent before any model, then v1 is published with `packager publish` and the agent is waited
  on until `edge-agent status --json` says v1 is committed; after a few idle seconds its RSS, USS and PSS are read
  (psutil), with the mappings that hold most of it (/proc/<pid>/smaps). Where that memory comes from: a fresh
  interpreter imports what the daemon imports, in the daemon's order, and prints the RSS after each step; and three
  more real daemons (fresh state, deploying v2, idling) are measured side by side: as is, with the LiteRT runtime
  made unimportable (what a lazy runtime probe would save), and that with MALLOC_ARENA_MAX=2 (`--no-variants` skips
  them).
- load and swap: an open-loop load generator sends a request every 1/R s (200/s by default) from a few threads over
  keep-alive `http.client` connections to the agent's OIP v2 API; each request's latency counts from the time it
  was scheduled to be sent (so a stall is charged to every request it delays: no coordinated omission). After a
  warm-up and S seconds of steady load, v2 is published (`packager publish`, a separate process) while the load
  continues through download, staging, the swap (ACTIVATE) and probation until the agent reports COMMIT. The swap
  window is [ACTIVATE event, +3 s] (the event's timestamp is taken just before the serving reference is swapped).
- HTTP overhead: median latency of a keep-alive HTTP infer (one connection, closed loop) minus the median of
  `agent.runtime.open_session(...).run` on the same artifact at batch 1 in this process, in interleaved rounds; the
  JSON codec alone (`agent.serve.oip.run_infer` in-process) is timed too, to split the overhead.

- large batches (`--scenario large-batch` runs only this, and merges its figures and targets into the existing
  result file): a fresh agent with v1 idles and its RSS is read; then 1,000 requests at the largest batch the
  manifest allows (`max_batch`, 64 rows) and 100 oversize ones (shape [131070, 1, 8, 8] of zeros, just under the
  16 MiB body limit: what took the agent to 1.73 GiB before the batch limit), each refused 413; after a few idle
  seconds the RSS is read again, and the peak (VmHWM).

Progress goes to stderr, a table and one PASS/MISS line per target to stdout. The exit status is 0 even when a
target is missed: this is a measurement, not a test (1 when mosquitto is missing or the agent does not deploy,
2 for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/agent_bench.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks._common import (  # noqa: E402 - needs REPO on sys.path
    Target,
    code_state,
    init_fleet_repo,
    load_average,
    machine_info,
    mosquitto_version,
    write_json,
)

log = logging.getLogger("agent_bench")

BIN = Path(sys.executable).parent  # the venv's console scripts: edge-agent, packager
FLEET = "agentbench"
GROUP = "bench"
DEVICE = "bench-agent"
MODEL = "digits"

RSS_MAX_MB = 80.0  # idle agent with one onnxruntime int8 model loaded
SWAP_P99_RATIO_MAX = 2.0  # p99 in the swap window / steady p99
FAILED_MAX = 0  # failed requests over the whole load run
HTTP_OVERHEAD_MAX_MS = 1.0  # median HTTP infer - median direct session.run
LARGE_RSS_GROWTH_MAX_MB = 20.0  # RSS after the large-batch scenario - idle RSS before it
LARGE_REQUESTS = 1000  # at the largest allowed batch
OVERSIZE_REQUESTS = 100  # refused 413
OVERSIZE_ROWS = 131070  # [131070, 1, 8, 8] zeros: 15.99 MiB of JSON

DEFAULT_RATE = 200.0  # requests per second
DEFAULT_STEADY_S = 10.0
WARMUP_S = 2.0
LOAD_THREADS = 4
SWAP_WINDOW_S = 3.0
AFTER_COMMIT_S = 2.0
PROBATION_S = 5.0
IDLE_S = 5.0
DEPLOY_TIMEOUT_S = 120.0
MAX_LOAD_S = 120.0  # hard bound on the load run, whatever the agent does
REQUEST_TIMEOUT_S = 5.0
OVERHEAD_ROUNDS = 5
OVERHEAD_RUNS = 300  # per kind per round
OVERHEAD_WARMUP = 100
AGENT_DISTS = ("onnxruntime", "ai-edge-litert", "numpy", "paho-mqtt", "tuf", "cryptography", "psutil")
MB = float(1 << 20)  # memory figures are MiB (what `ps`/psutil users read as MB)


# --------------------------------------------------------------------------------------------- targets


# --------------------------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_")}  # only the config file counts


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Count and latency percentiles (ms) of `values` (ms)."""
    if not len(values):
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99, p999 = (float(x) for x in np.percentile(a, [50, 90, 99, 99.9]))
    return {"n": int(a.size), "p50_ms": round(p50, 4), "p90_ms": round(p90, 4), "p99_ms": round(p99, 4),
            "p99_9_ms": round(p999, 4), "max_ms": round(float(a.max()), 4), "mean_ms": round(float(a.mean()), 4)}


# --------------------------------------------------------------------------------------------- memory


def memory_of(pid: int) -> dict[str, Any]:
    """RSS, USS, PSS (MiB, psutil) and the peak RSS (VmHWM) of `pid`, plus its thread count."""
    import psutil

    p = psutil.Process(pid)
    out: dict[str, Any] = {}
    try:
        full = p.memory_full_info()
        out.update(rss_mb=full.rss / MB, uss_mb=full.uss / MB, pss_mb=getattr(full, "pss", 0) / MB or None)
    except psutil.AccessDenied:
        out.update(rss_mb=p.memory_info().rss / MB, uss_mb=None, pss_mb=None)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    out["threads"] = p.num_threads()
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


def _mapping_label(path: str) -> str:
    if not path:
        return "[anonymous]"
    if path.startswith("["):
        return path
    name = Path(path).name
    if "site-packages/" in path:
        pkg = path.split("site-packages/", 1)[1].split("/", 1)[0]
        return f"{pkg}/…/{name}"
    return name


def smaps_breakdown(pid: int, top: int = 12) -> dict[str, Any]:
    """Where the RSS of `pid` lives: totals for anonymous memory and file-backed mappings (shared libraries), and
    the `top` mappings by RSS, from /proc/<pid>/smaps."""
    by_label: Counter[str] = Counter()
    anon_total = file_total = 0
    label = "[anonymous]"
    file_backed = False
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError as e:
        return {"error": str(e)}
    for line in text.splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            path = head[5].strip() if len(head) > 5 else ""
            label = _mapping_label(path)
            file_backed = bool(path) and not path.startswith("[")
        elif line.startswith("Rss:"):
            kb = int(line.split()[1])
            by_label[label] += kb
            if file_backed:
                file_total += kb
            else:
                anon_total += kb
    return {"anonymous_mb": round(anon_total / 1024, 2), "file_backed_mb": round(file_total / 1024, 2),
            "top": [{"mapping": k, "rss_mb": round(v / 1024, 2)} for k, v in by_label.most_common(top)]}


# Imported in the order the daemon imports them: `agent.cli` -> `agent.daemon` (numpy; agent.bundle, which pulls in
# hashlib's OpenSSL; agent.trust.fetch, which pulls in tuf, securesystemslib, cryptography and urllib3), then
# `Daemon.__init__` (psutil), the runtimes (imported by STAGE once the runtime probe passed them), `start()` (http_api,
# mqtt_client with paho), the first CHECK (mqtt_fetcher), and the staged model's session (open, then what STAGE runs),
# then a second session of the same model (what each further model costs).
IMPORT_STEPS = ("numpy", "hashlib", "agent.bundle", "tuf.api.metadata", "tuf.ngclient", "agent.daemon", "psutil",
                "onnxruntime", "ai_edge_litert.interpreter", "agent.serve.http", "agent.transport.mqtt",
                "agent.trust.mqtt_fetcher", "session", "session_runs", "second_session")

# Run with `python -c CHILD_CODE SPEC_JSON` in a fresh interpreter (nothing else imported first): does the steps in
# order and prints the RSS (MiB; anonymous and file-backed) after each as one JSON line.
CHILD_CODE = r"""
import importlib, json, sys, time
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["repo"])
def memory():
    kb = {}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Rss:", "Anonymous:"):
            kb[parts[0]] = int(parts[1])
    return {"rss_mb": round(kb["Rss:"] / 1024, 2), "anonymous_mb": round(kb["Anonymous:"] / 1024, 2),
            "file_backed_mb": round((kb["Rss:"] - kb["Anonymous:"]) / 1024, 2)}
rows = [{"step": "python", **memory()}]
session = feeds = None
for step in spec["steps"]:
    t0 = time.perf_counter()
    if step in ("session", "second_session"):  # a second session of the same model: the per-model part
        import numpy as np
        from pathlib import Path
        from agent.runtime import open_session
        opened = open_session(Path(spec["artifact"]), "onnx", threads=1, input_names=spec["input_names"],
                              output_names=spec["output_names"])
        session = session or opened
        with np.load(spec["golden"]) as g:
            feeds = {n: g["input." + n] for n in spec["input_names"]}
    elif step == "session_runs":  # what STAGE runs: 20 warm-up rows, the golden batch, 100 timed rows
        n = len(next(iter(feeds.values())))
        for i in range(120):
            session.run({k: v[i % n:i % n + 1] for k, v in feeds.items()})
        session.run(feeds)
    else:
        importlib.import_module(step)
    rows.append({"step": step, **memory(), "seconds": round(time.perf_counter() - t0, 3)})
print(json.dumps(rows))
"""


def import_breakdown(spec: dict[str, Any]) -> dict[str, Any]:
    """RSS after each step in fresh interpreters: the daemon's order, that order without the LiteRT probe, and a
    few modules imported alone."""
    def run(steps: Sequence[str]) -> list[dict[str, Any]]:
        arg = json.dumps({**spec, "repo": str(REPO), "steps": list(steps)})
        r = subprocess.run([sys.executable, "-c", CHILD_CODE, arg], capture_output=True, text=True, timeout=120,
                           env=_env(), cwd=REPO)
        if r.returncode != 0:
            raise RuntimeError(f"import breakdown failed ({r.returncode}): {r.stderr[-2000:]}")
        rows: list[dict[str, Any]] = json.loads(r.stdout.strip().splitlines()[-1])
        prev = rows[0]
        for row in rows:
            row["delta_mb"] = round(row["rss_mb"] - prev["rss_mb"], 2)
            row["delta_anonymous_mb"] = round(row["anonymous_mb"] - prev["anonymous_mb"], 2)
            prev = row
        return rows

    alone = {}
    for module in ("numpy", "onnxruntime", "ai_edge_litert.interpreter", "tuf.ngclient", "paho.mqtt.client"):
        rows = run([module])
        alone[module] = {"python_mb": rows[0]["rss_mb"], "after_mb": rows[-1]["rss_mb"],
                         "delta_mb": rows[-1]["delta_mb"]}
    return {"daemon_order": run(IMPORT_STEPS),
            "without_litert": run([st for st in IMPORT_STEPS if st != "ai_edge_litert.interpreter"]),
            "alone": alone}


# --------------------------------------------------------------------------------------------- the agent


@dataclass
class Setup:
    work: Path
    repo: Path
    broker_url: str
    bundles: dict[int, Path]
    config: Path
    port: int
    input_name: str
    input_shape: list[int]
    row: np.ndarray  # one digit, batch 1
    extracted: Path  # v2, verified and extracted, for the direct session
    input_names: list[str]
    output_names: list[str]


def build_bundles(work: Path) -> tuple[dict[int, Path], dict[str, Any]]:
    """Train examples/digits and build it twice (versions 1 and 2), int8 ONNX only, with `packager.build.build`."""
    from examples.digits.train import train_digits
    from packager.build import BuildOptions, Progress, build

    t0 = time.perf_counter()
    paths = train_digits(work / "digits")
    train_s = time.perf_counter() - t0
    bundles: dict[int, Path] = {}
    info: dict[str, Any] = {"train_seconds": round(train_s, 2)}
    for version in (1, 2):
        t1 = time.perf_counter()
        result = build(BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                                    out_dir=work / "bundles", name=MODEL, version=version, formats=("onnx",),
                                    threads=1), Progress(0, stream=sys.stderr, enabled=False))
        bundles[version] = result.bundle
        info[f"v{version}"] = {"bundle_bytes": result.bundle.stat().st_size,
                               "build_seconds": round(time.perf_counter() - t1, 2)}
    info["eval"] = str(paths["eval"])
    return bundles, info


def write_config(path: Path, state: Path, broker_url: str, root: Path, port: int, device: str = DEVICE) -> None:
    path.write_text(
        f'[agent]\ndevice_id = "{device}"\nstate_dir = "{state}"\nfleet = "{FLEET}"\ngroup = "{GROUP}"\n'
        f'[mqtt]\nurl = "{broker_url}"\n'
        f'[trust]\nroot = "{root}"\n'
        f'[serve]\nhttp = "127.0.0.1:{port}"\n'
        # probation: time only (probation_requests = 0), so it lasts PROBATION_S under any load; CHECK on notify
        f"[deploy]\nprobation_s = {PROBATION_S}\nprobation_requests = 0\npoll_interval_s = 3600\nthreads = 1\n"
    )


def packager_publish(s: Setup, version: int) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "packager"), "publish", str(s.bundles[version]), "--repo", str(s.repo),
                             "--broker", s.broker_url, "--fleet", FLEET, "--group", GROUP],
                            cwd=s.work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], what: str, timeout: float = 60.0) -> None:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{out}\n{err}")


def agent_status(cwd: Path, config: Path) -> dict[str, Any]:
    r = subprocess.run([str(BIN / "edge-agent"), "status", "--config", str(config), "--json"], cwd=cwd,
                       env=_env(), capture_output=True, text=True, timeout=30)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"edge-agent status failed ({r.returncode}): {r.stderr}")
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def committed(status: dict[str, Any], version: int, since: float) -> bool | None:
    """True once `version` is committed and the agent rests; False if a rollback happened after `since` (wall
    clock) and left another version serving; None while deploying."""
    le = status.get("last_event") or {}
    if status.get("state") != "idle":
        return None
    if status.get("version") == version:  # current and resting: committed (a later no_update check may follow)
        return True
    if le.get("state") == "rollback" and float(le.get("at") or 0) >= since:
        return False
    return None


# `edge-agent run` with some modules made unimportable first (a diagnostic variant: what the daemon would use
# without them). `sys.modules[name] = None` makes `import name` raise ImportError, which the runtime probe treats
# as "not installed".
AGENT_WRAPPER = r"""
import json, sys
for name in json.loads(sys.argv.pop(1)):
    sys.modules[name] = None
sys.argv[0] = "edge-agent"
from agent.cli import main
sys.exit(main())
"""


class Agent:
    """One `edge-agent run` process (or the same through AGENT_WRAPPER with `block`); its log goes to a file."""

    def __init__(self, s: Setup, config: Path, port: int, name: str = "agent", block: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.s = s
        self.config = config
        self.port = port
        self.log_path = s.work / f"{name}.log"
        self._log = self.log_path.open("w")
        run = ["run", "--config", str(config)]
        cmd = ([sys.executable, "-c", AGENT_WRAPPER, json.dumps(list(block)), *run] if block or env
               else [str(BIN / "edge-agent"), *run])
        self.proc = subprocess.Popen(cmd, cwd=s.work, env={**_env(), **(env or {})}, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.started = time.perf_counter()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_http(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"edge-agent exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/v2/health/live")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    return time.perf_counter() - self.started
            time.sleep(0.05)
        raise RuntimeError(f"edge-agent did not answer on port {self.port} within {timeout:g}s")

    def status(self) -> dict[str, Any]:
        return agent_status(self.s.work, self.config)

    def check_committed(self, version: int, since: float) -> dict[str, Any] | None:
        """The status once `version` is committed, None while deploying; raises if rolled back or exited."""
        if not self.alive():
            raise RuntimeError(f"edge-agent exited ({self.proc.returncode}):\n{self.log_tail()}")
        st = self.status()
        verdict = committed(st, version, since)
        if verdict is False:
            raise RuntimeError(f"v{version} was rolled back: {st}\n{self.log_tail()}")
        return st if verdict else None

    def wait_committed(self, version: int, since: float, timeout: float = DEPLOY_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.check_committed(version, since)
            if st is not None:
                return st
            time.sleep(0.5)
        raise RuntimeError(f"v{version} not committed within {timeout:g}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def log_problems(self) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if line.startswith(("WARNING", "ERROR", "CRITICAL"))][:50]

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def idle_memory(pid: int, samples: int = 5) -> dict[str, Any]:
    """The median-RSS one of `samples` readings 0.4 s apart, with all RSS readings and the smaps breakdown."""
    readings = []
    for i in range(samples):
        if i:
            time.sleep(0.4)
        readings.append(memory_of(pid))
    med = float(np.median([m["rss_mb"] for m in readings]))
    out = dict(min(readings, key=lambda m: abs(m["rss_mb"] - med)))
    out["rss_samples_mb"] = [m["rss_mb"] for m in readings]
    out["smaps"] = smaps_breakdown(pid)
    return out


# Diagnostic variants of the real daemon, each a fresh agent deploying the current deployment (v2, the same model
# as v1) and idling: the same program; without the LiteRT probe (what a lazy probe would save); and additionally with
# glibc's malloc limited to 2 arenas.
VARIANTS: dict[str, dict[str, Any]] = {
    "as_is": {"block": (), "env": {}},
    "no_litert_probe": {"block": ("ai_edge_litert", "tflite_runtime"), "env": {}},
    "no_litert_probe_malloc_arena_max_2": {"block": ("ai_edge_litert", "tflite_runtime"),
                                           "env": {"MALLOC_ARENA_MAX": "2"}},
}


def run_variants(s: Setup, root: Path) -> dict[str, Any]:
    from examples.local_broker import free_port

    agents: dict[str, Agent] = {}
    out: dict[str, Any] = {}
    since = time.time()
    try:
        for i, (name, v) in enumerate(VARIANTS.items()):
            port = free_port()
            config = s.work / f"variant-{i}" / "agent.toml"
            config.parent.mkdir()
            write_config(config, config.parent / "state", s.broker_url, root, port, device=f"{DEVICE}-v{i}")
            agents[name] = Agent(s, config, port, name=f"variant-{i}", block=v["block"], env=v["env"] or None)
        pending = set(agents)
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                if agents[name].check_committed(2, since) is not None:
                    pending.discard(name)
            time.sleep(0.5)
        if pending:
            raise RuntimeError(f"variants {sorted(pending)} did not commit v2 within {DEPLOY_TIMEOUT_S:g}s")
        time.sleep(IDLE_S)
        for name, a in agents.items():
            m = idle_memory(a.pid)
            m["smaps"]["top"] = m["smaps"]["top"][:6]
            out[name] = {**m, "blocked_imports": list(VARIANTS[name]["block"]), "env": VARIANTS[name]["env"]}
    finally:
        for a in agents.values():
            a.stop()
    return out


class EventWatcher:
    """Collects the agent's `devices/<id>/events` messages with the (perf_counter) time each arrived."""

    def __init__(self, broker_url: str) -> None:
        from agent.transport.mqtt import MqttClient
        from packager.publish import topics_for

        topics = topics_for(FLEET)
        self.client = MqttClient(broker_url, "agent-bench-events", prefix=topics)
        self.client.connect(timeout=10)
        self.sub = self.client.subscribe_stream([topics.prefix + f"devices/{DEVICE}/events"])
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True, name="events")
        self.thread.start()

    def _run(self) -> None:
        for msg in self.sub:
            try:
                event = json.loads(msg.payload)
            except ValueError:
                continue
            with self.cond:
                self.events.append((time.perf_counter(), event))
                self.cond.notify_all()

    def find(self, version: int, **match: str) -> tuple[float, dict[str, Any]] | None:
        with self.cond:
            for t, e in self.events:
                if (e.get("bundle") or {}).get("version") == version and all(e.get(k) == v for k, v in match.items()):
                    return t, e
        return None

    def wait(self, version: int, timeout: float, **match: str) -> tuple[float, dict[str, Any]] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while (found := self.find(version, **match)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
        return found

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sub.close()
        with contextlib.suppress(Exception):
            self.client.close()


# --------------------------------------------------------------------------------------------- load


@dataclass
class Record:
    index: int
    scheduled: float  # perf_counter
    sent: float
    done: float
    status: int  # HTTP status; -1 for an exception
    version: str | None
    error: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.done - self.scheduled) * 1000.0


@dataclass
class OpenLoop:
    """Open-loop load: request i is due at t0 + i/rate; `threads` workers take the next due request, sleep until it
    is due, and send it on their own keep-alive connection. Latency counts from the due time."""

    port: int
    path: str
    body: bytes
    rate: float
    threads: int
    t0: float = 0.0
    records: list[Record] = field(default_factory=list)
    _next: int = 0
    _stop_at: float = float("inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        conns = []
        for _ in range(self.threads):
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
            c.connect()
            conns.append(c)
        self.t0 = time.perf_counter() + 0.05
        for i, c in enumerate(conns):
            t = threading.Thread(target=self._work, args=(c,), daemon=True, name=f"load-{i}")
            self._workers.append(t)
            t.start()

    def stop(self, at: float | None = None) -> None:
        self._stop_at = time.perf_counter() if at is None else at
        for t in self._workers:
            t.join(REQUEST_TIMEOUT_S + 5)

    def _work(self, conn: http.client.HTTPConnection) -> None:
        headers = {"Content-Type": "application/json"}
        interval = 1.0 / self.rate
        while True:
            with self._lock:
                i = self._next
                self._next += 1
            due = self.t0 + i * interval
            if due >= self._stop_at:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            version = error = None
            try:
                conn.request("POST", self.path, self.body, headers)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                m = re.search(rb'"model_version":"([^"]*)"', data[:200])
                version = m.group(1).decode() if m else None
                if status != 200:
                    error = data[:200].decode(errors="replace")
                if resp.will_close:
                    conn.close()  # reconnects on the next request
            except (OSError, http.client.HTTPException) as e:
                status, error = -1, repr(e)
                conn.close()
            self.records.append(Record(i, due, sent, time.perf_counter(), status, version, error))
        conn.close()


class Sampler:
    """The agent's CPU (% of one core) and RSS every `interval` s while the load runs."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.me = psutil.Process()
        self.interval = interval
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self.proc.cpu_percent(None)
        self.me.cpu_percent(None)
        self.thread = threading.Thread(target=self._run, daemon=True, name="sampler")
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.samples.append({"t": time.perf_counter(), "agent_cpu_pct": self.proc.cpu_percent(None),
                                     "bench_cpu_pct": self.me.cpu_percent(None),
                                     "agent_rss_mb": self.proc.memory_info().rss / MB})

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


def infer_body(s: Setup) -> bytes:
    return json.dumps({"inputs": [{"name": s.input_name, "shape": s.input_shape, "datatype": "FP32",
                                   "data": s.row.ravel().tolist()}]}, separators=(",", ":")).encode()


def window(records: Sequence[Record], start: float, end: float) -> list[Record]:
    return [r for r in records if start <= r.scheduled < end]


def run_swap(s: Setup, agent: Agent, events: EventWatcher, rate: float, steady_s: float) -> dict[str, Any]:
    """Steady open-loop load, then publish v2 and keep the load until COMMIT (+2 s). Windows by due time."""
    load = OpenLoop(s.port, f"/v2/models/{MODEL}/infer", infer_body(s), rate, LOAD_THREADS)
    wall_minus_perf = time.time() - time.perf_counter()
    sampler = Sampler(agent.pid)
    load.start()
    log.info("load: %.0f requests/s from %d threads; %.0f s warm-up, %.0f s steady", rate, LOAD_THREADS, WARMUP_S,
             steady_s)
    t_publish = load.t0 + WARMUP_S + steady_s
    time.sleep(max(0.0, t_publish - time.perf_counter()))
    t_publish = time.perf_counter()
    log.info("publishing v2 under load")
    pub = packager_publish(s, 2)
    outcome = "timeout"
    t_published = t_commit = t_activate = t_activate_recv = None
    activate_event = None
    try:
        finish(pub, "packager publish v2")
        t_published = time.perf_counter()
        deadline = t_publish + MAX_LOAD_S - WARMUP_S - steady_s
        while time.perf_counter() < deadline:
            if events.find(2, **{"from": "commit"}) is not None:
                outcome = "committed"
                break
            if events.find(2, **{"to": "rollback"}) is not None:
                outcome = "rolled_back"
                break
            if not agent.alive():
                outcome = "agent_exited"
                break
            events.wait(2, 0.2, **{"from": "commit"})
        found = events.find(2, **{"from": "activate"})
        if found is not None:
            t_activate_recv, activate_event = found
            t_activate = float(activate_event["at"]) - wall_minus_perf
        done = events.find(2, **{"from": "commit"}) or events.find(2, **{"to": "rollback"})
        if done is not None:
            t_commit = float(done[1]["at"]) - wall_minus_perf
        time.sleep(AFTER_COMMIT_S)
    finally:
        load.stop()
        sampler.stop()
        if pub.poll() is None:
            pub.kill()
    recs = sorted(load.records, key=lambda r: r.index)
    t_end = recs[-1].scheduled if recs else load.t0
    steady = window(recs, load.t0 + WARMUP_S, t_publish)
    failed = [r for r in recs if r.status != 200]
    v2 = [r for r in recs if r.version == "2"]
    first_v2 = min((r.scheduled for r in v2), default=None)
    last_v1_after = max((r.scheduled for r in recs if r.version == "1"), default=None)

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - load.t0, 3)

    windows: dict[str, dict[str, Any]] = {"steady": summary([r.latency_ms for r in steady])}
    windows["steady"]["span_s"] = [rel(load.t0 + WARMUP_S), rel(t_publish)]
    windows["steady"]["failed"] = sum(1 for r in steady if r.status != 200)
    if t_activate is not None:
        spans = {"publish_to_activate": (t_publish, t_activate),
                 "swap": (t_activate, t_activate + SWAP_WINDOW_S),
                 "probation": (t_activate, t_commit if t_commit is not None else t_end),
                 "deployment": (t_publish, t_commit if t_commit is not None else t_end),
                 "after_commit": (t_commit if t_commit is not None else t_end, t_end + 1)}
        for name, (a, b) in spans.items():
            inside = window(recs, a, b)
            windows[name] = summary([r.latency_ms for r in inside])
            windows[name]["span_s"] = [rel(a), rel(b)]
            windows[name]["failed"] = sum(1 for r in inside if r.status != 200)
    with events.cond:
        deploy_events = [{"from": e.get("from"), "to": e.get("to"), "event": e.get("event"), "reason": e.get("reason"),
                          "version": (e.get("bundle") or {}).get("version"),
                          "at_s": rel(float(e["at"]) - wall_minus_perf), "received_s": rel(t)}
                         for t, e in events.events if t >= t_publish]
    lag = [max(0.0, r.sent - r.scheduled) * 1000 for r in recs]
    agent_cpu = [x["agent_cpu_pct"] for x in sampler.samples]
    return {
        "rate_per_s": rate, "threads": LOAD_THREADS, "warmup_s": WARMUP_S, "steady_s": steady_s,
        "swap_window_s": SWAP_WINDOW_S, "outcome": outcome,
        "requests": len(recs), "failed": len(failed),
        "failures": [{"t": rel(r.scheduled), "status": r.status, "error": r.error} for r in failed[:20]],
        "achieved_rate_per_s": round(len(recs) / max(1e-9, (t_end - load.t0)), 1) if recs else 0.0,
        "answered_by": dict(Counter(r.version for r in recs)),
        "timeline_s": {"publish": rel(t_publish), "published": rel(t_published),
                       "activate": rel(t_activate), "activate_event_received": rel(t_activate_recv),
                       "first_v2_answer_due": rel(first_v2), "last_v1_answer_due": rel(last_v1_after),
                       "commit": rel(t_commit), "end": rel(t_end)},
        "windows": windows,
        "deploy_events": deploy_events,
        "send_lag_ms": summary(lag),
        "activate_event": activate_event,
        "agent_cpu_pct": {"mean": round(float(np.mean(agent_cpu)), 1) if agent_cpu else None,
                          "max": round(float(np.max(agent_cpu)), 1) if agent_cpu else None},
        "agent_rss_mb_max_under_load": round(max((x["agent_rss_mb"] for x in sampler.samples), default=0.0), 2),
        "samples": [{k: (round(v - load.t0, 2) if k == "t" else round(v, 1)) for k, v in x.items()}
                    for x in sampler.samples],
        "slowest": [{"t": rel(r.scheduled), "latency_ms": round(r.latency_ms, 2), "version": r.version}
                    for r in sorted(recs, key=lambda r: -r.latency_ms)[:10]],
    }


# --------------------------------------------------------------------------------------------- HTTP overhead


def http_overhead(s: Setup) -> dict[str, Any]:
    """Closed loop, one request at a time: HTTP infer (keep-alive) vs the runtime session vs in-process run_infer."""
    from agent.runtime import open_session
    from agent.serve.holder import LoadedModel, ModelHolder, RequestStats
    from agent.serve.oip import run_infer

    session = open_session(s.extracted / "model.int8.onnx", "onnx", threads=1, input_names=s.input_names,
                           output_names=s.output_names)
    feeds = {s.input_name: s.row}
    body = infer_body(s)
    holder = ModelHolder(LoadedModel(MODEL, 2, "onnx", session))
    stats = RequestStats()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=REQUEST_TIMEOUT_S)
    conn.connect()
    headers = {"Content-Type": "application/json"}
    path = f"/v2/models/{MODEL}/infer"

    def http_once() -> None:
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP infer answered {resp.status}")

    kinds = {"http": http_once, "direct": lambda: session.run(feeds),
             "run_infer": lambda: run_infer(holder, stats, body, MODEL, None)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for fn in kinds.values():
        for _ in range(OVERHEAD_WARMUP):
            fn()
    order = list(kinds)
    for rnd in range(OVERHEAD_ROUNDS):
        for k in order[rnd % len(order):] + order[:rnd % len(order)]:  # rotate who goes first
            fn = kinds[k]
            for _ in range(OVERHEAD_RUNS):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1000)
    conn.close()
    out: dict[str, Any] = {k: summary(v) for k, v in times.items()}
    out["rounds"] = OVERHEAD_ROUNDS
    out["runs_per_round"] = OVERHEAD_RUNS
    out["overhead_ms"] = round(out["http"]["p50_ms"] - out["direct"]["p50_ms"], 4)
    out["codec_ms"] = round(out["run_infer"]["p50_ms"] - out["direct"]["p50_ms"], 4)
    out["transport_ms"] = round(out["http"]["p50_ms"] - out["run_infer"]["p50_ms"], 4)
    out["request_bytes"] = len(body)
    return out


# --------------------------------------------------------------------------------------------- report


def table(mem: dict[str, Any], breakdown: dict[str, Any] | None, swap: dict[str, Any],
          overhead: dict[str, Any]) -> str:
    lines = ["== memory of the agent process (MiB; psutil)",
             "| agent | RSS | USS | PSS | peak RSS | threads |",
             "|---|---|---|---|---|---|"]
    rows = [("running, no model yet", mem.get("no_model")), ("idle, v1 committed (the target)", mem.get("idle_v1")),
            ("after the load run (serving v2, v1 kept)", mem.get("after_run"))]
    rows += [(f"variant {k}, idle with v2", v) for k, v in mem.get("variants", {}).items()]
    for label, m in rows:
        if m:
            lines.append(f"| {label} | {m['rss_mb']:.1f} | {m['uss_mb'] or 0:.1f} | {m['pss_mb'] or 0:.1f} | "
                         f"{m.get('peak_rss_mb', 0):.1f} | {m['threads']} |")
    sm = mem["idle_v1"]["smaps"]
    lines.append(f"idle v1 RSS by kind: anonymous {sm['anonymous_mb']:.1f}, file-backed {sm['file_backed_mb']:.1f}; "
                 "largest: " + ", ".join(f"{t['mapping']} {t['rss_mb']:.1f}" for t in sm["top"][:8]))
    lines.append(f"max RSS sampled under load {swap['agent_rss_mb_max_under_load']:.1f}")
    if breakdown:
        lines.append("fresh interpreter, the daemon's import order (RSS after each step, +delta): " + ", ".join(
            f"{r['step']} {r['rss_mb']:.1f} (+{r['delta_mb']:.1f})" for r in breakdown["daemon_order"]))
        lines.append("imported alone in a fresh interpreter: " + ", ".join(
            f"{k} +{v['delta_mb']:.1f}" for k, v in breakdown["alone"].items())
            + "; the daemon's sequence up to the warmed session without ai_edge_litert: "
            + f"{_step(breakdown['without_litert'], 'session_runs')['rss_mb']:.1f}")
    lines += ["", f"== open-loop load at {swap['rate_per_s']:.0f} requests/s ({swap['threads']} threads, keep-alive); "
              "latency from the due time, ms",
              "| window | span (s from load start) | n | p50 | p90 | p99 | p99.9 | max | failed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, w in swap["windows"].items():
        a, b = w["span_s"]
        if not w.get("n"):
            lines.append(f"| {name} | {a}–{b} | 0 | | | | | | |")
            continue
        lines.append(f"| {name} | {a:.2f}–{b:.2f} | {w['n']} | {w['p50_ms']:.3f} | {w['p90_ms']:.3f} | "
                     f"{w['p99_ms']:.3f} | {w['p99_9_ms']:.3f} | {w['max_ms']:.2f} | {w['failed']} |")
    lines.append(f"outcome {swap['outcome']}; {swap['requests']} requests ({swap['achieved_rate_per_s']}/s), "
                 f"{swap['failed']} failed; answered by version {swap['answered_by']}")
    lines.append("timeline (s from load start): " + ", ".join(f"{k} {v}" for k, v in swap["timeline_s"].items()))
    lines.append("agent events after publishing v2 (s): " + ", ".join(
        f"{e['from']}->{e['to']} {e['at_s']}" for e in swap["deploy_events"]))
    lines.append(f"send lag (due -> sent) p99 {swap['send_lag_ms'].get('p99_ms')} ms; agent CPU mean "
                 f"{swap['agent_cpu_pct']['mean']} %, max {swap['agent_cpu_pct']['max']} % of one core")
    lines += ["", "== HTTP path overhead, digits, batch 1, closed loop, interleaved rounds (ms)",
              "| path | n | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for k, label in (("direct", "session.run (agent.runtime.open_session, this process)"),
                     ("run_infer", "run_infer in-process (JSON parse + checks + run + JSON encode)"),
                     ("http", "HTTP infer to the agent, keep-alive http.client")):
        o = overhead[k]
        lines.append(f"| {label} | {o['n']} | {o['p50_ms']:.4f} | {o['p90_ms']:.4f} | {o['p99_ms']:.4f} |")
    lines.append(f"overhead = http - direct = {overhead['overhead_ms']:.4f} ms (JSON codec and checks "
                 f"{overhead['codec_ms']:.4f}, HTTP transport {overhead['transport_ms']:.4f})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def broker_in(work: Path) -> Iterator[Any]:
    from examples.local_broker import Mosquitto

    (work / "broker").mkdir()
    broker = Mosquitto(work / "broker")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _step(rows: Sequence[dict[str, Any]], step: str) -> dict[str, Any]:
    return next(r for r in rows if r["step"] == step)


def rss_note(mem: dict[str, Any], breakdown: dict[str, Any] | None) -> str:
    sm = mem["idle_v1"]["smaps"]
    top = ", ".join(f"{t['mapping']} {t['rss_mb']:.1f}" for t in sm["top"][:4])
    note = (f"USS {mem['idle_v1']['uss_mb']:.1f}, PSS {mem['idle_v1']['pss_mb']:.1f}; anonymous "
            f"{sm['anonymous_mb']:.1f} MiB, file-backed {sm['file_backed_mb']:.1f} MiB (largest: {top})")
    if breakdown:
        d = {r["step"]: r["delta_mb"] for r in breakdown["daemon_order"]}
        note += (f"; in a fresh interpreter: numpy +{d['numpy']:.1f}, tuf/cryptography "
                 f"+{d['tuf.api.metadata'] + d['tuf.ngclient']:.1f}, onnxruntime +{d['onnxruntime']:.1f}, "
                 f"ai_edge_litert +{d['ai_edge_litert.interpreter']:.1f} (imported only to probe it), the session "
                 f"+{d['session'] + d['session_runs']:.1f} (a second one +{d['second_session']:.1f})")
    variants = mem.get("variants", {})
    if "as_is" in variants and "no_litert_probe" in variants:
        note += (f"; real daemon without the LiteRT probe {variants['no_litert_probe']['rss_mb']:.1f} vs "
                 f"{variants['as_is']['rss_mb']:.1f} as is")
    return note


def _zeros_request(name: str, shape: Sequence[int]) -> bytes:
    n = int(np.prod(shape))
    return (f'{{"inputs":[{{"name":"{name}","shape":{json.dumps(list(shape))},"datatype":"FP32","data":['
            + ",".join(["0"] * n) + "]}]}").encode()


def large_batch(s: Setup, agent: Agent, max_batch: int) -> dict[str, Any]:
    """RSS before and after LARGE_REQUESTS requests at `max_batch` rows and OVERSIZE_REQUESTS refused ones."""
    shape = [max_batch, *s.input_shape[1:]]
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    body = json.dumps({"inputs": [{"name": s.input_name, "shape": shape, "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    oversize = _zeros_request(s.input_name, [OVERSIZE_ROWS, *s.input_shape[1:]])
    idle = idle_memory(agent.pid)
    path = f"/v2/models/{MODEL}/infer"
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    t0 = time.perf_counter()
    for i in range(LARGE_REQUESTS + OVERSIZE_REQUESTS):
        data = body if i < LARGE_REQUESTS else oversize
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        payload = r.read()
        statuses[r.status] += 1
        if r.status != 200 and len(errors) < 3:
            errors.append(f"{r.status} {payload[:200].decode(errors='replace')}")
        if r.getheader("Connection", "").lower() == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.close()
    seconds = time.perf_counter() - t0
    time.sleep(IDLE_S)
    after = idle_memory(agent.pid)
    return {"max_batch": max_batch, "batch_body_bytes": len(body), "oversize_body_bytes": len(oversize),
            "oversize_shape": [OVERSIZE_ROWS, *s.input_shape[1:]], "requests": LARGE_REQUESTS,
            "oversize_requests": OVERSIZE_REQUESTS, "statuses": dict(statuses), "errors": errors,
            "seconds": round(seconds, 2), "idle": idle, "after": after,
            "growth_mb": round(after["rss_mb"] - idle["rss_mb"], 2)}


def run_large_batch_only(args: argparse.Namespace) -> int:
    """`--scenario large-batch`: build v1, deploy it to a fresh agent, run `large_batch`, merge into args.out."""
    from examples.digits.train import train_digits
    from examples.local_broker import free_port
    from packager.build import BuildOptions, Progress, build

    started = dt.datetime.now(dt.UTC)
    t_start = time.perf_counter()
    load_start = load_average()
    machine = machine_info(dists=AGENT_DISTS)
    with tempfile.TemporaryDirectory(prefix="edgeship-agent-bench-") as td:
        work = Path(td)
        log.info("setup: training examples/digits and building v1 (int8 ONNX) in %s", work)
        paths = train_digits(work / "digits")
        bundle = build(BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                                    out_dir=work / "bundles", name=MODEL, version=1, formats=("onnx",), threads=1),
                       Progress(0, stream=sys.stderr, enabled=False)).bundle
        from agent.bundle import verify_bundle

        manifest = verify_bundle(bundle, dest=work / "extracted-v1").manifest
        art = next(a for a in manifest.artifacts if a.format == "onnx")
        repo = work / "repo"
        root = work / "provisioned-root.json"
        init_fleet_repo(repo, root)
        with broker_in(work) as broker:
            port = free_port()
            config = work / "device" / "agent.toml"
            config.parent.mkdir()
            write_config(config, work / "device" / "state", broker.url, root, port)
            s = Setup(work, repo, broker.url, {1: bundle}, config, port, art.inputs[0].name,
                      [1, *[int(d) for d in art.inputs[0].shape[1:]]], np.zeros(1), work / "extracted-v1",
                      [t.name for t in art.inputs], [t.name for t in art.outputs])
            agent = Agent(s, config, port)
            try:
                agent.wait_http()
                since = time.time()
                finish(packager_publish(s, 1), "packager publish v1")
                agent.wait_committed(1, since)
                time.sleep(IDLE_S)
                log.info("large batches: %d requests of %d rows, %d of %d rows", LARGE_REQUESTS, manifest.max_batch,
                         OVERSIZE_REQUESTS, OVERSIZE_ROWS)
                lb = large_batch(s, agent, manifest.max_batch)
            finally:
                agent.stop()
            lb["log_warnings"] = agent.log_problems()
    idle_rss, growth = lb["idle"]["rss_mb"], lb["growth_mb"]
    ok_count, refused = lb["statuses"].get(200, 0), lb["statuses"].get(413, 0)
    note = (f"idle {idle_rss:.2f} MiB, after {lb['after']['rss_mb']:.2f} MiB, peak {lb['after'].get('peak_rss_mb')} "
            f"MiB; {ok_count} answered, {refused} refused 413")
    targets = [
        Target("large_batch_rss_growth", f"RSS after {LARGE_REQUESTS} requests at max_batch and {OVERSIZE_REQUESTS} "
               "refused oversize ones - idle RSS", growth, LARGE_RSS_GROWTH_MAX_MB, "<=", "MiB", note),
        Target("large_batch_idle_rss", "agent RSS, idle with v1, before the large-batch scenario", idle_rss,
               RSS_MAX_MB, "<=", "MiB", note),
    ]
    if ok_count != LARGE_REQUESTS or refused != OVERSIZE_REQUESTS:
        log.warning("unexpected statuses %s: %s", lb["statuses"], lb["errors"])
    result: dict[str, Any] = {}
    if args.out.exists():
        with contextlib.suppress(ValueError):
            result = json.loads(args.out.read_text())
    ids = {t.id for t in targets}
    kept = [t for t in result.get("targets", []) if t.get("id") not in ids]
    result["targets"] = kept + [t.to_json() for t in targets]
    result["large_batch"] = {
        "created": started.isoformat(timespec="seconds"), "command": "python benchmarks/agent_bench.py --scenario "
        "large-batch", "duration_seconds": round(time.perf_counter() - t_start, 1), "code": code_state(),
        "machine": machine, "load_average": {"start": load_start, "end": load_average()}, **lb}
    write_json(args.out, result)
    print("== targets")
    for t in targets:
        print(t.line())
    print(f"statuses {lb['statuses']}; {lb['seconds']:.1f} s of requests; wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "agent.json",
                        help="JSON result file (default benchmarks/results/agent.json)")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"open-loop requests per second (default {DEFAULT_RATE:g})")
    parser.add_argument("--steady", type=float, default=DEFAULT_STEADY_S,
                        help=f"seconds of steady load before v2 is published (default {DEFAULT_STEADY_S:g})")
    parser.add_argument("--no-variants", action="store_true",
                        help="skip the diagnostic daemon variants (without the LiteRT probe, MALLOC_ARENA_MAX=2)")
    parser.add_argument("--scenario", choices=("all", "large-batch"), default="all",
                        help="large-batch: only the large-batch memory scenario, merged into --out (default: all)")
    args = parser.parse_args(argv)
    if not 1 <= args.rate <= 2000 or not 2 <= args.steady <= 120:
        parser.error("--rate must be in 1..2000 and --steady in 2..120")

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    log.setLevel(logging.INFO)
    from examples.local_broker import MosquittoMissing, find_mosquitto, free_port

    try:
        binary = find_mosquitto()
    except MosquittoMissing as e:
        print(f"agent_bench: {e}", file=sys.stderr)
        return 1
    if args.scenario == "large-batch":
        return run_large_batch_only(args)

    started = dt.datetime.now(dt.UTC)
    t_start = time.perf_counter()
    load_start = load_average()
    machine = machine_info(dists=AGENT_DISTS)
    machine["versions"]["mosquitto"] = mosquitto_version(binary)
    with contextlib.suppress(Exception):
        import psutil

        machine["ram_mb"] = round(psutil.virtual_memory().total / MB)
    log.info("machine: %s, %s cores; load average %s", machine["cpu"], machine["cores"], load_start)

    from agent.bundle import verify_bundle

    with tempfile.TemporaryDirectory(prefix="edgeship-agent-bench-") as td:
        work = Path(td)
        log.info("setup: training examples/digits and building v1 and v2 (int8 ONNX) in %s", work)
        bundles, build_info = build_bundles(work)
        manifest = verify_bundle(bundles[2], dest=work / "extracted-v2").manifest
        art = next(a for a in manifest.artifacts if a.format == "onnx")
        with np.load(build_info.pop("eval")) as ev:
            row = np.ascontiguousarray(ev["x"][:1], dtype=np.float32)
        repo = work / "repo"
        root = work / "provisioned-root.json"
        init_fleet_repo(repo, root)
        with broker_in(work) as broker:
            port = free_port()
            config = work / "device" / "agent.toml"
            config.parent.mkdir()
            write_config(config, work / "device" / "state", broker.url, root, port)
            s = Setup(work, repo, broker.url, bundles, config, port, art.inputs[0].name,
                      [1, *[int(d) for d in art.inputs[0].shape[1:]]], row, work / "extracted-v2",
                      [t.name for t in art.inputs], [t.name for t in art.outputs])
            events = EventWatcher(broker.url)
            agent = Agent(s, config, port)
            mem: dict[str, Any] = {}
            try:
                up_s = agent.wait_http()
                log.info("agent answering on :%d after %.2f s (pid %d)", port, up_s, agent.pid)
                time.sleep(2.0)
                mem["no_model"] = memory_of(agent.pid)
                log.info("RSS without a model: %.1f MiB", mem["no_model"]["rss_mb"])

                t0, since = time.perf_counter(), time.time()
                finish(packager_publish(s, 1), "packager publish v1")
                status_v1 = agent.wait_committed(1, since)
                deploy_v1_s = time.perf_counter() - t0
                log.info("v1 committed %.1f s after publishing (probation %g s); idling %g s", deploy_v1_s,
                         PROBATION_S, IDLE_S)
                time.sleep(IDLE_S)
                mem["idle_v1"] = idle_memory(agent.pid)
                log.info("idle with v1: RSS %.1f MiB, USS %s, PSS %s", mem["idle_v1"]["rss_mb"],
                         mem["idle_v1"]["uss_mb"], mem["idle_v1"]["pss_mb"])
                staged_v1 = (events.find(1, **{"from": "stage"}) or (0.0, {}))[1].get("staging")

                swap = run_swap(s, agent, events, args.rate, args.steady)
                log.info("load run: %s, %d requests, %d failed", swap["outcome"], swap["requests"], swap["failed"])
                status_v2 = agent.status()
                log.info("HTTP overhead: %d rounds of %d runs per path", OVERHEAD_ROUNDS, OVERHEAD_RUNS)
                overhead = http_overhead(s)
                mem["after_run"] = memory_of(agent.pid)
                mem["after_run"]["smaps"] = smaps_breakdown(agent.pid, top=6)
            finally:
                events.close()
                exit_code = agent.stop()
            problems = agent.log_problems()
            if not args.no_variants:
                log.info("variants: %s, each a fresh agent deploying v2 and idling", ", ".join(VARIANTS))
                try:
                    mem["variants"] = run_variants(s, root)
                except RuntimeError as e:
                    log.warning("variants failed: %s", e)
        log.info("RSS breakdown: fresh interpreters importing what the daemon imports")
        try:
            breakdown: dict[str, Any] | None = import_breakdown({
                "artifact": str(s.extracted / art.file), "golden": str(s.extracted / "golden.npz"),
                "input_names": s.input_names, "output_names": s.output_names})
        except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
            log.warning("import breakdown failed: %s", e)
            breakdown = None

    steady_p99 = swap["windows"]["steady"].get("p99_ms", float("nan"))
    swap_p99 = swap["windows"].get("swap", {}).get("p99_ms", float("nan"))
    ratio = swap_p99 / steady_p99 if steady_p99 and steady_p99 == steady_p99 else float("nan")
    swap_note = "" if swap["outcome"] == "committed" else f"v2 deployment outcome: {swap['outcome']}; "
    if ratio == ratio and ratio > SWAP_P99_RATIO_MAX:
        swap_note += (f"swap p99 {swap_p99:.2f} ms vs steady {steady_p99:.2f} ms; slowest requests (s, ms): "
                      + ", ".join(f"{x['t']:.2f}/{x['latency_ms']:.1f}" for x in swap["slowest"][:5]))
    targets = [
        Target("idle_rss", "agent RSS, idle with the digits int8 ONNX model loaded", mem["idle_v1"]["rss_mb"],
               RSS_MAX_MB, "<=", "MiB", rss_note(mem, breakdown)),
        Target("swap_p99_ratio", f"p99 in [ACTIVATE, +{SWAP_WINDOW_S:g} s] / steady p99 at {args.rate:g} req/s",
               ratio, SWAP_P99_RATIO_MAX, "<=", "x", swap_note),
        Target("failed_requests", "failed requests over the whole load run (steady, deploy, swap, probation)",
               float(swap["failed"]), FAILED_MAX, "<=", "",
               "; ".join(f"{f['status']} {f['error']}" for f in swap["failures"][:3])),
        Target("http_overhead", "median HTTP infer - median session.run, digits, batch 1",
               overhead["overhead_ms"], HTTP_OVERHEAD_MAX_MS, "<=", "ms",
               f"JSON codec {overhead['codec_ms']:.3f} ms, HTTP transport {overhead['transport_ms']:.3f} ms"),
    ]
    load_end = load_average()
    result = {
        "benchmark": "agent", "created": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/agent_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "duration_seconds": round(time.perf_counter() - t_start, 1),
        "code": code_state(), "machine": machine, "load_average": {"start": load_start, "end": load_end},
        "settings": {"rate_per_s": args.rate, "steady_s": args.steady, "warmup_s": WARMUP_S,
                     "load_threads": LOAD_THREADS, "swap_window_s": SWAP_WINDOW_S, "probation_s": PROBATION_S,
                     "probation_requests": 0, "runtime_threads": 1, "idle_s": IDLE_S,
                     "memory_units": "MiB (2^20 bytes)", "model": "examples/digits, int8 QDQ ONNX only",
                     "broker": "mosquitto on 127.0.0.1, default limits"},
        "targets": [t.to_json() for t in targets],
        "build": build_info,
        "manifest": {"latency_budget_ms": manifest.latency_budget_ms, "input": s.input_name,
                     "input_shape": s.input_shape, "artifact": art.file},
        "agent": {"http_up_seconds": round(up_s, 2), "deploy_v1_seconds": round(deploy_v1_s, 2),
                  "status_v1": status_v1, "status_v2": status_v2, "staging_v1": staged_v1,
                  "exit_code_after_sigterm": exit_code, "log_warnings": problems},
        "memory": mem,
        "rss_breakdown": breakdown,
        "swap": swap,
        "http_overhead": overhead,
    }
    write_json(args.out, result)
    print(table(mem, breakdown, swap, overhead) + "\n", flush=True)
    print("== targets")
    for t in targets:
        print(t.line())
    missed = [t.id for t in targets if not t.passed]
    print(f"{len(targets) - len(missed)}/{len(targets)} targets met" + (f"; MISSED: {', '.join(missed)}" if missed
                                                                         else ""))
    print(f"load average start {load_start}, end {load_end}; {result['duration_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:  # the agent did not start, deploy or answer: nothing to measure
        print(f"agent_bench: {e}", file=sys.stderr)
        sys.exit(1)
