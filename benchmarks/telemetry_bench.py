"""Measure telemetry (issue 9) against its targets on this machine and write one JSON file.

    python benchmarks/telemetry_bench.py [--out benchmarks/results/telemetry.json] [--idle S] [--requests N]
    python benchmarks/telemetry_bench.py --only queue   # re-measure the queue rows of an existing --out file

Everything runs against a throwaway mosquitto on a free port (`examples/local_broker.py`), all on 127.0.0.1:

- setup: the examples/digits CNN is trained and built once with `packager.build.build` (v1, int8 QDQ ONNX only,
  with its signed reference.json drift edges), published with `packager publish`, and two real `edge-agent run`
  processes deploy it side by side: A with `[telemetry] interval_s = 1`, B with `interval_s = 3600` (the baseline:
  one message at start, then none), both with `/metrics` on.
- idle CPU: /metrics is scraped 3 times on both (prometheus_client is imported on the first scrape), then both idle
  for S seconds (60 by default) in the same window, so load from other work on the machine hits both alike. Each
  agent's CPU time is psutil `cpu_times()` (user + system, the process's threads included) at the start and end of
  the window; the cost of telemetry every second is A's share of one core minus B's.
- idle RSS: A's RSS (psutil, median of 5 readings 0.4 s apart) right after the idle window, /metrics scraped.
- drift, through A's HTTP API (one keep-alive connection, one row per request, sequentially): N in-distribution
  requests (10,000 by default: rows drawn at random, with replacement, from the digits EVAL split, the split the
  packager took the reference bins from), PSI read from /metrics every 100 requests once the monitor has its
  minimum sample count; then shifted requests (the same EVAL rows with sensor noise: + N(0, SHIFT_NOISE_SIGMA)
  per pixel, clipped to [0, 1]) with PSI read every 10 requests until it passes 0.25 (at most 1,000). The sliding
  window (`drift_window`, 1000) is full of in-distribution rows when the shift starts, as on a device.
- queue: real telemetry messages of agent A (taken from MQTT after the drift run: latency buckets, drift counts and
  resources filled in) are put through the real `Publisher.telemetry_now` (envelope, seq, queue counters) into a
  `DiskQueue` with the default bounds (100,000 messages, 50 MB) until it holds 100,000; disk use is the size of
  telemetry.db plus its -wal and -shm files. Then the same Publisher flushes it (`Publisher.flush`: batches of
  QoS 1 publishes, PUBACKs awaited, acknowledged prefix removed) through a real MqttClient to the local mosquitto.

`--only queue` skips the agents: it takes the real telemetry message stored in the existing --out file
(`telemetry_sample`, from the last full run), runs the queue measurement QUEUE_RUNS times on a fresh mosquitto
(each run a fresh queue), and replaces only the `queue` object and the two queue targets in that file (flush rate:
the median run; disk: the largest run), with the load average of each run.

Progress goes to stderr, figures and one PASS/MISS line per target to stdout. The exit status is 0 even when a
target is missed: this is a measurement, not a test (1 when mosquitto is missing or the agent does not deploy,
2 for bad arguments).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/telemetry_bench.py` from anywhere
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
from benchmarks.agent_bench import (  # noqa: E402
    AGENT_DISTS,
    FLEET,
    GROUP,
    MODEL,
    PROBATION_S,
    Agent,
    Setup,
    broker_in,
    finish,
    idle_memory,
    packager_publish,
)

log = logging.getLogger("telemetry_bench")

# targets (issue 9)
CPU_COST_MAX_PCT = 1.0  # % of one core: telemetry every second vs the baseline agent
RSS_MAX_MB = 80.0  # MiB, idle, telemetry and /metrics on
QUEUE_MESSAGES = 100_000
QUEUE_DISK_MAX_MB = 50.0  # MB (10^6 bytes), database + WAL + shm
FLUSH_MIN_RATE = 5000.0  # messages per second to the local broker
PSI_ALARM = 0.25
SHIFT_WITHIN = 500  # requests after the shift
PSI_QUIET_MAX = 0.1

QUEUE_RUNS = 3  # --only queue: runs, the median flush rate reported (the machine may be shared)
DEFAULT_IDLE_S = 60.0
DEFAULT_REQUESTS = 10_000
SHIFT_MAX = 1000
SHIFT_NOISE_SIGMA = 0.3  # per pixel, pixels in [0, 1]: a noisy or badly lit sensor
SCRAPES_BEFORE = 3
DEVICES = {"A": ("tele-1s", 1.0), "B": ("tele-3600s", 3600.0)}
REQUEST_TIMEOUT_S = 10.0
DEPLOY_TIMEOUT_S = 180.0


# --------------------------------------------------------------------------------------------- helpers


def write_config(path: Path, state: Path, broker_url: str, root: Path, port: int, device: str,
                 interval_s: float) -> None:
    path.write_text(
        f'[agent]\ndevice_id = "{device}"\nstate_dir = "{state}"\nfleet = "{FLEET}"\ngroup = "{GROUP}"\n'
        f'[mqtt]\nurl = "{broker_url}"\n'
        f'[trust]\nroot = "{root}"\n'
        f'[serve]\nhttp = "127.0.0.1:{port}"\n'
        f"[deploy]\nprobation_s = {PROBATION_S}\nprobation_requests = 0\npoll_interval_s = 3600\nthreads = 1\n"
        f"[telemetry]\ninterval_s = {interval_s}\nmetrics = true\n"
    )


def wait_all_committed(agents: Sequence[Agent], version: int, since: float) -> None:
    pending = list(agents)
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        pending = [a for a in pending if a.check_committed(version, since) is None]
        if pending:
            time.sleep(0.5)
    if pending:
        raise RuntimeError(f"v{version} not committed within {DEPLOY_TIMEOUT_S:g}s:\n{pending[0].log_tail()}")


class Http:
    """One keep-alive connection to an agent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.conn.close()
                return resp.status, data
            except (OSError, http.client.HTTPException):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def metrics(self) -> str:
        status, data = self.request("GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}: {data[:200]!r}")
        return data.decode()

    def psi(self) -> tuple[float | None, str | None]:
        text = self.metrics()
        m = re.search(r"^edgeship_drift_psi\{[^}]*\} (\S+)$", text, re.M)
        s = re.search(r'^edgeship_drift_status\{[^}]*status="([a-z]+)"[^}]*\} 1\.0$', text, re.M)
        return (float(m.group(1)) if m else None), (s.group(1) if s else None)

    def close(self) -> None:
        self.conn.close()


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def infer_bodies(rows: np.ndarray, input_name: str) -> list[bytes]:
    shape = [1, *[int(d) for d in rows.shape[1:]]]
    return [json.dumps({"inputs": [{"name": input_name, "shape": shape, "datatype": "FP32",
                                    "data": r.ravel().tolist()}]}, separators=(",", ":")).encode() for r in rows]


# --------------------------------------------------------------------------------------------- measurements


def idle_cpu(agents: dict[str, Agent], idle_s: float) -> dict[str, Any]:
    start = {k: cpu_seconds(a.pid) for k, a in agents.items()}
    t0 = time.monotonic()
    load0 = load_average()
    time.sleep(idle_s)
    elapsed = time.monotonic() - t0
    out: dict[str, Any] = {"window_s": round(elapsed, 2), "load_average_start": load0,
                           "load_average_end": load_average()}
    for k, a in agents.items():
        used = cpu_seconds(a.pid) - start[k]
        out[k] = {"device": DEVICES[k][0], "interval_s": DEVICES[k][1], "cpu_seconds": round(used, 4),
                  "pct_of_one_core": round(100.0 * used / elapsed, 4)}
    out["cost_pct_of_one_core"] = round(out["A"]["pct_of_one_core"] - out["B"]["pct_of_one_core"], 4)
    return out


def drift_run(port: int, model: str, in_dist: list[bytes], shifted: list[bytes], requests: int,
              rng: np.random.Generator) -> dict[str, Any]:
    path = f"/v2/models/{model}/infer"
    h = Http(port)
    failed = 0
    quiet: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    for i in range(1, requests + 1):
        status, _ = h.request("POST", path, in_dist[int(rng.integers(len(in_dist)))])
        failed += status != 200
        if i % 100 == 0:
            psi, _ = h.psi()
            if psi is not None:
                quiet.append((i, psi))
    in_s = time.perf_counter() - t0
    psi_before, status_before = h.psi()
    passed_at: int | None = None
    trace: list[tuple[int, float | None]] = []
    for i in range(1, SHIFT_MAX + 1):
        status, _ = h.request("POST", path, shifted[int(rng.integers(len(shifted)))])
        failed += status != 200
        if i % 10 == 0:
            psi, _ = h.psi()
            trace.append((i, psi))
            if psi is not None and psi >= PSI_ALARM:
                passed_at = i
                break
    psi_after, status_after = h.psi()
    h.close()
    return {"path": "real agent over HTTP (POST /v2/models/<name>/infer, PSI from /metrics)",
            "in_distribution_requests": requests, "in_distribution_seconds": round(in_s, 2),
            "requests_per_s": round(requests / in_s, 1), "failed_requests": failed,
            "psi_in_distribution_max": max((p for _, p in quiet), default=None),
            "psi_in_distribution_mean": round(float(np.mean([p for _, p in quiet])), 5) if quiet else None,
            "psi_readings_in_distribution": len(quiet), "psi_before_shift": psi_before,
            "status_before_shift": status_before, "shift": f"EVAL rows + N(0, {SHIFT_NOISE_SIGMA}) per pixel, "
            "clipped to [0, 1]", "shifted_requests_to_alarm": passed_at, "psi_after_shift": psi_after,
            "status_after_shift": status_after, "shift_trace": trace}


def capture_telemetry(broker_url: str, device: str, n: int, timeout: float) -> list[dict[str, Any]]:
    from agent.transport.mqtt import MqttClient
    from packager.publish import topics_for

    topics = topics_for(FLEET)
    client = MqttClient(broker_url, "telemetry-bench-capture", prefix=topics)
    client.connect(timeout=10)
    out: list[dict[str, Any]] = []
    try:
        sub = client.subscribe_stream([topics.device(device, "telemetry")])
        deadline = time.monotonic() + timeout
        while len(out) < n and (left := deadline - time.monotonic()) > 0:
            msg = sub.get(timeout=left)
            if msg is not None:
                out.append(json.loads(msg.payload))
        sub.close()
    finally:
        client.close()
    return out


def disk_bytes(db: Path) -> dict[str, int]:
    files = {s: db.with_name(db.name + s) for s in ("", "-wal", "-shm")}
    sizes = {f"db{s}": p.stat().st_size if p.exists() else 0 for s, p in files.items()}
    sizes["total"] = sum(sizes.values())
    return sizes


def queue_run(work: Path, broker_url: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    from agent.config import TelemetrySection
    from agent.telemetry.publisher import Publisher
    from agent.telemetry.queue import DiskQueue
    from agent.transport.mqtt import MqttClient
    from packager.publish import topics_for

    defaults = TelemetrySection()
    db = work / "queue" / "telemetry.db"
    q = DiskQueue(db, max_messages=defaults.queue_max_messages, max_bytes=defaults.queue_max_bytes)
    envelope = ("schema", "device", "ts", "seq", "telemetry_dropped_total", "events_dropped_total", "queue_messages",
                "queue_bytes")
    bodies = [{k: v for k, v in m.items() if k not in envelope} for m in samples]
    i = 0

    def build(now: float) -> dict[str, Any]:
        nonlocal i
        i += 1
        return dict(bodies[i % len(bodies)])

    pub = Publisher(q, samples[0]["device"], build=build, interval_s=1.0)
    t0 = time.perf_counter()
    while len(q) < QUEUE_MESSAGES and i < 2 * QUEUE_MESSAGES:
        pub.telemetry_now()
    fill_s = time.perf_counter() - t0
    held = len(q)
    sizes = disk_bytes(db)
    one = q.peek(1)[0].payload
    out: dict[str, Any] = {
        "bounds": {"max_messages": q.max_messages, "max_bytes": q.max_bytes},
        "puts": i, "held": held, "telemetry_dropped_total": q.telemetry_dropped_total,
        "fill_seconds": round(fill_s, 2), "puts_per_s": round(i / fill_s, 1),
        "queue_accounted_bytes": q.bytes, "disk_bytes": sizes, "message_json_bytes": len(one),
        "distinct_message_bodies": len(bodies)}
    log.info("queue: %d messages held after %d puts in %.1f s; %.2f MB on disk", held, i, fill_s,
             sizes["total"] / 1e6)

    client = MqttClient(broker_url, "telemetry-bench-flush", prefix=topics_for(FLEET))
    client.connect(timeout=10)
    try:
        pub.attach(client)
        t1 = time.perf_counter()
        sent = pub.flush()
        flush_s = time.perf_counter() - t1
    finally:
        client.close()
    out.update(flushed=sent, flush_seconds=round(flush_s, 3), flush_per_s=round(sent / flush_s, 1),
               left_after_flush=len(q), disk_bytes_after_flush=disk_bytes(db), mqtt_protocol=client.protocol)
    q.close()
    return out


def queue_targets(queue: dict[str, Any], busy: str) -> list[Target]:
    return [
        Target("queue_disk_100k", f"disk of a DiskQueue holding {queue['held']:,} real telemetry messages "
               "(telemetry.db + -wal + -shm)", queue["disk_bytes"]["total"] / 1e6, QUEUE_DISK_MAX_MB, "<=", "MB",
               f"held {queue['held']} of {QUEUE_MESSAGES}"),
        Target("queue_flush_rate", "Publisher.flush of the full queue to local mosquitto (QoS 1, PUBACKed, removed)",
               queue["flush_per_s"], FLUSH_MIN_RATE, ">=", "msg/s", busy),
    ]


def queue_only(out: Path, argv: Sequence[str] | None) -> int:
    """--only queue: QUEUE_RUNS queue measurements with the stored real message; only the queue rows change."""
    import statistics

    try:
        result = json.loads(out.read_text())
        sample = result["telemetry_sample"]
    except (OSError, ValueError, KeyError) as e:
        print(f"telemetry_bench: --only queue needs a result file with telemetry_sample ({out}): {e}",
              file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    for n in range(1, QUEUE_RUNS + 1):
        with tempfile.TemporaryDirectory(prefix="edgeship-telemetry-bench-") as td:
            work = Path(td)
            load0 = load_average()
            with broker_in(work) as broker:
                run = queue_run(work, broker.url, [sample])
            run["load_average_start"], run["load_average_end"] = load0, load_average()
        log.info("queue run %d/%d: %.2f MB on disk, flush %.0f msg/s, load %s -> %s", n, QUEUE_RUNS,
                 run["disk_bytes"]["total"] / 1e6, run["flush_per_s"], load0, run["load_average_end"])
        runs.append(run)
    rates = [r["flush_per_s"] for r in runs]
    median_run = sorted(runs, key=lambda r: r["flush_per_s"])[len(runs) // 2]
    queue = {**median_run, "disk_bytes": max((r["disk_bytes"] for r in runs), key=lambda d: d["total"]),
             "held": min(r["held"] for r in runs), "flush_per_s": statistics.median(rates),
             "flush_per_s_runs": rates, "runs": runs,
             "measured": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "code": code_state(),
             "command": "python benchmarks/telemetry_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
             "message_source": "telemetry_sample of the last full run (one real message of agent A)"}
    loads = [(r["load_average_start"], r["load_average_end"]) for r in runs]
    busy = f"load average per run {loads}"
    new = {t.id: t for t in queue_targets(queue, busy)}
    result["targets"] = [new.pop(t["id"]).to_json() if t["id"] in new else t for t in result["targets"]]
    result["targets"] += [t.to_json() for t in new.values()]
    result["queue"] = queue
    write_json(out, result)
    print(f"queue: {queue['held']:,} messages ({queue['message_json_bytes']} B of JSON each); disk (largest of "
          f"{QUEUE_RUNS}) {queue['disk_bytes']['total'] / 1e6:.2f} MB (db {queue['disk_bytes']['db'] / 1e6:.2f}, "
          f"wal {queue['disk_bytes']['db-wal'] / 1e6:.2f}); flush {rates} msg/s, median {queue['flush_per_s']:,.0f}")
    for t in queue_targets(queue, busy):
        print(t.line())
    print(f"{busy}; wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "telemetry.json",
                        help="JSON result file (default benchmarks/results/telemetry.json)")
    parser.add_argument("--idle", type=float, default=DEFAULT_IDLE_S,
                        help=f"seconds of the idle CPU window (default {DEFAULT_IDLE_S:g})")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS,
                        help=f"in-distribution requests for the drift run (default {DEFAULT_REQUESTS})")
    parser.add_argument("--only", choices=("queue",),
                        help="re-measure only this part and update its rows of an existing --out file")
    args = parser.parse_args(argv)
    if not 10 <= args.idle <= 3600 or not 1000 <= args.requests <= 1_000_000:
        parser.error("--idle must be in 10..3600 and --requests in 1000..1000000")

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    log.setLevel(logging.INFO)
    from examples.local_broker import MosquittoMissing, find_mosquitto, free_port

    try:
        binary = find_mosquitto()
    except MosquittoMissing as e:
        print(f"telemetry_bench: {e}", file=sys.stderr)
        return 1
    if args.only == "queue":
        return queue_only(args.out, argv)
    started = dt.datetime.now(dt.UTC)
    t_start = time.perf_counter()
    load_start = load_average()
    machine = machine_info(dists=(*AGENT_DISTS, "prometheus-client"))
    machine["versions"]["mosquitto"] = mosquitto_version(binary)
    code = code_state()
    log.info("machine: %s, %s cores; load average %s; commit %s", machine["cpu"], machine["cores"], load_start,
             code["commit"])

    from agent.bundle import verify_bundle
    from examples.digits.train import train_digits
    from packager.build import BuildOptions, Progress, build

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="edgeship-telemetry-bench-") as td:
        work = Path(td)
        log.info("setup: training examples/digits and building v1 (int8 ONNX) in %s", work)
        paths = train_digits(work / "digits")
        bundle = build(BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                                    out_dir=work / "bundles", name=MODEL, version=1, formats=("onnx",), threads=1),
                       Progress(0, stream=sys.stderr, enabled=False)).bundle
        manifest = verify_bundle(bundle, dest=work / "extracted-v1").manifest
        art = next(a for a in manifest.artifacts if a.format == "onnx")
        with np.load(paths["eval"]) as ev:
            x_eval = np.ascontiguousarray(ev["x"], dtype=np.float32)
        x_shift = np.clip(x_eval + rng.normal(0.0, SHIFT_NOISE_SIGMA, x_eval.shape), 0.0, 1.0).astype(np.float32)
        in_dist, shifted = infer_bodies(x_eval, art.inputs[0].name), infer_bodies(x_shift, art.inputs[0].name)
        repo = work / "repo"
        root = work / "provisioned-root.json"
        init_fleet_repo(repo, root)
        with broker_in(work) as broker:
            s = Setup(work, repo, broker.url, {1: bundle}, work / "unused.toml", 0, art.inputs[0].name,
                      [1, *[int(d) for d in art.inputs[0].shape[1:]]], x_eval[:1], work / "extracted-v1",
                      [t.name for t in art.inputs], [t.name for t in art.outputs])
            agents: dict[str, Agent] = {}
            try:
                for k, (device, interval) in DEVICES.items():
                    port = free_port()
                    config = work / device / "agent.toml"
                    config.parent.mkdir()
                    write_config(config, config.parent / "state", broker.url, root, port, device, interval)
                    agents[k] = Agent(s, config, port, name=device)
                for a in agents.values():
                    a.wait_http()
                since = time.time()
                finish(packager_publish(s, 1), "packager publish v1")
                wait_all_committed(list(agents.values()), 1, since)
                for a in agents.values():
                    h = Http(a.port)
                    for _ in range(SCRAPES_BEFORE):
                        h.metrics()
                    h.close()
                time.sleep(3.0)
                log.info("idle CPU: both agents idle for %g s (A telemetry every 1 s, B every 3600 s)", args.idle)
                cpu = idle_cpu(agents, args.idle)
                log.info("idle CPU: A %.3f%%, B %.3f%% of one core", cpu["A"]["pct_of_one_core"],
                         cpu["B"]["pct_of_one_core"])
                rss = idle_memory(agents["A"].pid)
                rss["smaps"]["top"] = rss["smaps"]["top"][:6]
                rss_b = idle_memory(agents["B"].pid)
                log.info("idle RSS: A %.1f MiB, B %.1f MiB", rss["rss_mb"], rss_b["rss_mb"])
                log.info("drift: %d in-distribution requests, then shifted ones, through A's HTTP API", args.requests)
                drift = drift_run(agents["A"].port, MODEL, in_dist, shifted, args.requests, rng)
                log.info("drift: max in-distribution PSI %s; alarm after %s shifted requests",
                         drift["psi_in_distribution_max"], drift["shifted_requests_to_alarm"])
                samples = capture_telemetry(broker.url, DEVICES["A"][0], 5, 15.0)
                if not samples:
                    raise RuntimeError("no telemetry message from agent A within 15 s")
            finally:
                for a in agents.values():
                    a.stop()
            problems = {k: a.log_problems() for k, a in agents.items()}
            log.info("queue: filling a DiskQueue with %d real telemetry messages, then flushing it", QUEUE_MESSAGES)
            queue = queue_run(work, broker.url, samples)

    load_end = load_average()
    busy = f"load average {cpu['load_average_start']} -> {cpu['load_average_end']} on {machine['cores']} cores"
    alarm_at = drift["shifted_requests_to_alarm"]
    targets = [
        Target("telemetry_cpu_cost", "agent CPU, idle with telemetry every 1 s minus the same with every 3600 s "
               f"(psutil cpu_times over {cpu['window_s']:g} s, % of one core)", cpu["cost_pct_of_one_core"],
               CPU_COST_MAX_PCT, "<=", "%", busy),
        Target("idle_rss_telemetry", "agent RSS, idle, digits int8 ONNX loaded, telemetry every 1 s, /metrics "
               f"scraped {SCRAPES_BEFORE}x (psutil, median of 5)", rss["rss_mb"], RSS_MAX_MB, "<=", "MiB", busy),
        *queue_targets(queue, busy),
        Target("drift_alarm_within", "shifted requests until PSI >= 0.25 (real agent, HTTP, window full of "
               "in-distribution rows)", float(alarm_at) if alarm_at is not None else float("nan"),
               float(SHIFT_WITHIN), "<=", "requests", f"no alarm within {SHIFT_MAX}" if alarm_at is None else ""),
        Target("drift_quiet", f"max PSI over {drift['in_distribution_requests']:,} in-distribution requests (real "
               "agent, HTTP, read every 100)", drift["psi_in_distribution_max"] if
               drift["psi_in_distribution_max"] is not None else float("nan"), PSI_QUIET_MAX, "<=", ""),
    ]
    result = {
        "benchmark": "telemetry", "created": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/telemetry_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "duration_seconds": round(time.perf_counter() - t_start, 1),
        "code": code, "machine": machine, "load_average": {"start": load_start, "end": load_end},
        "settings": {"idle_s": args.idle, "in_distribution_requests": args.requests, "scrapes_before": SCRAPES_BEFORE,
                     "shift_noise_sigma": SHIFT_NOISE_SIGMA, "queue_messages": QUEUE_MESSAGES,
                     "model": "examples/digits, int8 QDQ ONNX only", "memory_units": "MiB (2^20 bytes)",
                     "disk_units": "MB (10^6 bytes)", "broker": "mosquitto on 127.0.0.1, default limits"},
        "targets": [t.to_json() for t in targets],
        "idle_cpu": cpu, "idle_memory": {"A": rss, "B": rss_b}, "drift": drift, "queue": queue,
        "telemetry_sample": samples[-1], "agent_log_warnings": problems,
    }
    write_json(args.out, result)
    print(f"idle CPU over {cpu['window_s']:g} s (psutil cpu_times, user+system): telemetry every 1 s "
          f"{cpu['A']['pct_of_one_core']:.3f}% of one core, every 3600 s {cpu['B']['pct_of_one_core']:.3f}%; "
          f"{busy}")
    print(f"idle RSS (psutil, median of 5, after {SCRAPES_BEFORE} /metrics scrapes): every 1 s {rss['rss_mb']:.1f} "
          f"MiB, every 3600 s {rss_b['rss_mb']:.1f} MiB")
    print(f"queue: {queue['held']:,} messages ({queue['message_json_bytes']} B of JSON each) put at "
          f"{queue['puts_per_s']:,.0f}/s; disk {queue['disk_bytes']['total'] / 1e6:.2f} MB "
          f"(db {queue['disk_bytes']['db'] / 1e6:.2f}, wal {queue['disk_bytes']['db-wal'] / 1e6:.2f}); flushed "
          f"{queue['flushed']:,} in {queue['flush_seconds']:.2f} s = {queue['flush_per_s']:,.0f} msg/s")
    print(f"drift ({drift['path']}): {drift['in_distribution_requests']:,} in-distribution requests at "
          f"{drift['requests_per_s']:.0f}/s, PSI max {drift['psi_in_distribution_max']} mean "
          f"{drift['psi_in_distribution_mean']}; shift ({drift['shift']}): PSI >= 0.25 after {alarm_at} requests "
          f"(PSI {drift['psi_after_shift']}, {drift['status_after_shift']}); {drift['failed_requests']} failed")
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
    except (RuntimeError, subprocess.SubprocessError) as e:  # the agents did not start, deploy or answer
        print(f"telemetry_bench: {e}", file=sys.stderr)
        sys.exit(1)
