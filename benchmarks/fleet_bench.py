"""Fleet scale (issue 11), SIMULATION: the real rollout controller (`packager rollout start`, a subprocess) runs a
four-wave rollout (1, 10, 50, 100 %) of a ~1 MB signed bundle over 100, 300 and 1,000 simulated devices
(examples/fleet_sim.py: a real MQTT connection per device, TUF verification shared per process, one shared
onnxruntime session per process) on one local mosquitto started on a free port with `max_connections -1`; and the
controller's ingestion (FleetView + window figures + the gate evaluation each tick), run in-process in a child
process against a real subscription while every simulated device sends telemetry, to show whether it keeps up.

    .venv/bin/python -m benchmarks.fleet_bench [--sizes 100,300,1000,1000] [--soak 3s] [--telemetry-s 1]
        [--probe-s 20] [--out benchmarks/results/fleet.json]

Per size: the devices connect and report v1; the ingestion probe runs for --probe-s seconds (every device sends
telemetry every --telemetry-s: 1,000 msg/s at 1,000 devices and 1 s); then `packager rollout start` moves the group
to v2 with --soak per wave and gates the simulator can feed (parity, error rate, rollbacks, offline). The time to
100 % committed runs from starting the controller process (its own start-up, signing and soaks included) until
every device reports v2 committed in its retained state. Every figure printed says "simulation".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.bundle import sha256_file, verify_bundle, write_bundle
from agent.deploy.rollout import bucket
from agent.transport.mqtt import MqttClient
from benchmarks._common import code_state, init_fleet_repo, load_average, machine_info, mosquitto_version, write_json
from examples.digits.train import train_digits
from examples.local_broker import Mosquitto
from packager import publish as pub
from packager.build import BuildOptions, Progress, build
from packager.rollout import state as st
from packager.rollout.controller import Controller

ROOT = Path(__file__).resolve().parents[1]
GROUP = "sim"
WAVES = [1.0, 10.0, 50.0, 100.0]
PER_PROCESS = 250
TARGET_S = 120.0
# gates the simulator feeds (it sends no latency histogram, drift or resources: those would pause, as no data must)
GATES = "parity>=0.99,error_rate<=0.01,rollbacks==0,offline<=0.05"


def make_bundles(tmp: Path) -> tuple[Path, Path]:
    """digits v1 (real, ~tens of KB) and v2: v1's model with a padding member, ~1 MB in all."""
    paths = train_digits(tmp / "digits", epochs=1)
    opts = BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                        out_dir=tmp / "out", name="digits", version=1, formats=("onnx",), latency_runs=5)
    v1 = build(opts, Progress(0, enabled=False)).bundle
    work = tmp / "v2.members"
    manifest = verify_bundle(v1, dest=work).manifest
    members = {name: work / name for name in manifest.files}
    pad = 1_000_000 - v1.stat().st_size
    if pad > 0:
        (work / "padding.bin").write_bytes(os.urandom(pad))
        members["padding.bin"] = work / "padding.bin"
    (tmp / "v2").mkdir()
    v2 = tmp / "v2" / "digits-2.bundle"
    write_bundle(v2, replace(manifest, version=2), members)
    return v1, v2


class Observer:
    """Counts what the broker carries: every device's retained state, and telemetry messages (and how late every
    10th arrives here: the lag a subscriber other than the controller sees, for comparison)."""

    def __init__(self, client: MqttClient, prefix: str) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.telemetry = 0
        self.lags: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.sub = client.subscribe_stream([f"{prefix}devices/+/state", f"{prefix}devices/+/telemetry"], timeout=30)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for msg in self.sub:
            if msg.topic.endswith("/telemetry"):
                with self.lock:
                    self.telemetry += 1
                    if self.telemetry % 10 == 0:
                        now = time.time()
                        self.lags.append((now, now - float(json.loads(msg.payload)["ts"])))
                continue
            doc = json.loads(msg.payload)
            with self.lock:
                self.states[doc["device"]] = doc

    def count(self, pred: Any) -> int:
        with self.lock:
            return sum(1 for s in self.states.values() if pred(s))


def proc_stats(pid: int) -> dict[str, Any]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_mib": round(rss / 1024, 1), "cpu_s": round((int(stat[11]) + int(stat[12])) / tick, 2), "fds": fds}


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- the ingestion probe: the controller's own loop, in-process, in a child process ------------------------------

class ProbeController(Controller):
    """The real Controller (subscription, FleetView, windows, evaluate every tick, status publishing) that counts
    what it folds and how late it folds it, and signs nothing (the probe judges a wave nobody was sent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fed: list[float] = []  # arrival time of every message folded
        self.lags: list[tuple[float, float]] = []  # (now, now - telemetry ts) of every telemetry message
        self.eval_ms: list[float] = []
        self.backlog: list[int] = []  # messages waiting in the subscription's queue at each tick

    def _sign(self) -> None:
        pass

    def _feed(self, topic: str, payload: bytes) -> None:
        super()._feed(topic, payload)
        now = time.time()
        self.fed.append(now)
        if topic.endswith("/telemetry"):
            ts = json.loads(payload).get("ts")
            if isinstance(ts, float):
                self.lags.append((now, now - ts))

    def evaluate(self) -> Any:
        # the subscription queue's length: private to the MQTT client, read here for the backlog only
        self.backlog.append(sum(r.queue.qsize() for r in self.client._routes))
        t0 = time.perf_counter()
        decision = super().evaluate()
        self.eval_ms.append((time.perf_counter() - t0) * 1000)
        return decision


def probe_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fleet_bench probe")
    ap.add_argument("--broker", required=True)
    ap.add_argument("--fleet", required=True)
    ap.add_argument("--previous", required=True, help="the signed v1 target the group runs")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--warmup", type=float, default=3.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleet-probe-") as t:
        state = st.RolloutState(name="probe", group=GROUP, fleet=args.fleet, bundle="bundles/digits-2.bundle",
                                bundle_name="digits", version=2, sha256="0" * 64,
                                previous={"bundle": args.previous, "name": "digits", "version": 1},
                                waves=[1.0, 100.0], soak_s=3600.0, gate=GATES, min_devices=1, min_requests=0)
        state.note("rolling", "probe")
        client = MqttClient(args.broker, f"probe-{args.fleet}", prefix=pub.topics_for(args.fleet))
        client.connect(timeout=30)
        ctl = ProbeController(Path(t), state, client)
        r0, t_start = resource.getrusage(resource.RUSAGE_SELF), time.time()
        end = t_start + args.warmup + args.seconds
        try:
            ctl.run(until=lambda: time.time() >= end)
        finally:
            client.close()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    w0, w1 = t_start + args.warmup, end  # the measured window: after the retained states and a first tick
    fed = [x for x in ctl.fed if w0 <= x < w1]
    lags = [lag for at, lag in ctl.lags if w0 <= at < w1]
    half = w0 + (w1 - w0) / 2
    first = [lag * 1000 for at, lag in ctl.lags if w0 <= at < half]
    second = [lag * 1000 for at, lag in ctl.lags if half <= at < w1]
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    out = {"seconds": args.seconds, "messages": len(fed), "msgs_per_s": round(len(fed) / args.seconds, 1),
           "telemetry_per_s": round(len(lags) / args.seconds, 1),
           "lag_ms_p50_first_half": _r(_pct(first, 0.5)), "lag_ms_p50_second_half": _r(_pct(second, 0.5)),
           "lag_ms_p95": _r(_pct([x * 1000 for x in lags], 0.95)), "lag_ms_max": _r(max(lags) * 1000 if lags else None),
           "backlog_max": max(ctl.backlog, default=None), "backlog_last": ctl.backlog[-1] if ctl.backlog else None,
           "evaluate_ms_p50": _r(_pct(ctl.eval_ms, 0.5)), "evaluate_ms_max": _r(max(ctl.eval_ms, default=0.0)),
           "devices_seen": len(ctl.view.rows), "skipped": dict(ctl.view.skipped),
           "cpu_s": round(cpu, 2), "cpu_percent_of_one_core": round(100 * cpu / (time.time() - t_start), 1)}
    print(json.dumps(out), flush=True)
    return 0


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def ingest_capacity(n: int = 1000, per_device: int = 10) -> dict[str, Any]:
    """The controller's fold (Controller._feed) fed pre-built messages as fast as it takes them, no broker: a
    ceiling for one core, with evaluate() timed over the resulting 1,000 windows."""
    state = st.RolloutState(name="cap", group=GROUP, fleet="cap", bundle="bundles/digits-2.bundle",
                            bundle_name="digits", version=2, sha256="0" * 64,
                            previous={"bundle": "bundles/digits-1.bundle", "name": "digits", "version": 1},
                            waves=[1.0, 100.0], soak_s=3600.0, gate=GATES, min_devices=1, min_requests=0)
    state.note("rolling", "capacity")
    with tempfile.TemporaryDirectory() as t:
        ctl = Controller(Path(t), state, None)  # type: ignore[arg-type]  # never connects: _feed and evaluate only
        pre = ctl.topics.prefix
        msgs = []
        for i in range(n):
            d = f"sim-{i:05d}"
            msgs.append((f"{pre}devices/{d}/state", json.dumps(
                {"status": "online", "device": d, "group": GROUP, "state": "idle",
                 "bundle": {"name": "digits", "version": 1}, "serving": {"name": "digits", "version": 1},
                 "at": time.time()}).encode()))
        for s in range(1, per_device + 1):
            for i in range(n):
                d = f"sim-{i:05d}"
                msgs.append((f"{pre}devices/{d}/telemetry", json.dumps(
                    {"schema": 1, "device": d, "name": "digits", "version": 1, "ts": time.time(), "seq": s,
                     "requests_total": s, "errors_total": 0, "rejected_total": 0, "error_rate": 0.0,
                     "latency_ms_p50": 0.1, "latency_ms_p95": 0.2, "latency_ms_p99": 0.3, "latency_ms_count": s,
                     "parity_ok": True, "drift_psi": None, "drift_status": "unknown", "accuracy": None,
                     "cpu_percent": None, "rollbacks_total": 0, "simulation": True}).encode()))
        t0 = time.perf_counter()
        for topic, payload in msgs:
            ctl._feed(topic, payload)
        fold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(10):
            ctl.evaluate()
        eval_ms = (time.perf_counter() - t0) / 10 * 1000
    return {"devices": n, "messages": len(msgs), "fold_msgs_per_s": round(len(msgs) / fold_s),
            "evaluate_ms": round(eval_ms, 1)}


# --- one fleet size ------------------------------------------------------------------------------------------------

def start_sims(n: int, broker: Mosquitto, fleet: str, root: Path, v1_sha: str, telemetry_s: float
               ) -> list[subprocess.Popen[bytes]]:
    procs: list[subprocess.Popen[bytes]] = []
    nproc = math.ceil(n / PER_PROCESS)
    for k in range(nproc):
        count = n // nproc + (1 if k < n % nproc else 0)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "examples.fleet_sim", "--broker", broker.url, "--fleet", fleet, "--group", GROUP,
             "--root", str(root), "--devices", str(count), "--id-prefix", f"sim-{k}-", "--telemetry-s",
             str(telemetry_s), "--current-sha256", v1_sha, "--current-name", "digits", "--current-version", "1"],
            cwd=ROOT, stdout=subprocess.DEVNULL))
    return procs


def run_probe(broker: Mosquitto, fleet: str, previous: str, seconds: float, obs: Observer) -> dict[str, Any]:
    tel0, t0, w0 = obs.telemetry, time.monotonic(), time.time()
    out = subprocess.run([sys.executable, "-m", "benchmarks.fleet_bench", "probe", "--broker", broker.url,
                          "--fleet", fleet, "--previous", previous, "--seconds", str(seconds)],
                         cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"simulation: the ingestion probe failed: {out.stderr.strip()[-2000:]}")
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    doc["offered_telemetry_per_s"] = round((obs.telemetry - tel0) / (time.monotonic() - t0), 1)
    with obs.lock:
        lags = [lag * 1000 for at, lag in obs.lags if at >= w0 + 5]  # the probe's window, about
    doc["observer_lag_ms_p50"], doc["observer_lag_ms_p95"] = _r(_pct(lags, 0.5)), _r(_pct(lags, 0.95))
    return doc


def run_rollout(n: int, broker: Mosquitto, fleet: str, repo: Path, obs: Observer, ids: list[str], soak: str,
                procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """`packager rollout start` as a subprocess; the time to every device committed, per wave, pauses, its CPU."""
    cmd = [str(Path(sys.executable).parent / "packager"), "rollout", "start", f"bench-{fleet}", "--version", "2",
           "--group", GROUP, "--waves", ",".join(f"{w:g}" for w in WAVES), "--soak", soak, "--gate", GATES,
           "--repo", str(repo), "--broker", broker.url, "--fleet", fleet, "--json"]
    statuses: list[tuple[float, dict[str, Any]]] = []
    t_start = time.monotonic()
    ctl = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read() -> None:
        assert ctl.stdout is not None
        for line in ctl.stdout:
            with contextlib.suppress(json.JSONDecodeError):  # the status lines are JSON; anything else is not one
                statuses.append((time.monotonic() - t_start, json.loads(line)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    cpu = 0.0
    wave_members = [{d for d in ids if bucket(d, GROUP) < pct} for pct in WAVES]
    committed_at: list[float | None] = [None] * len(WAVES)
    paused: list[str] = []
    outside = 0  # most devices seen on v2 outside the waves the controller had reached (must stay 0)
    deadline = t_start + 600
    try:
        while True:
            cpu = cpu_seconds(ctl.pid) or cpu
            now = time.monotonic() - t_start
            for i, members in enumerate(wave_members):
                if committed_at[i] is None and obs.count(
                        lambda s, m=members: s["device"] in m and (s.get("bundle") or {}).get("version") == 2
                        and s["state"] == "idle") >= len(members):
                    committed_at[i] = now
            reached = max((int(s.get("wave") or 1) for _, s in statuses), default=1)
            outside = max(outside, obs.count(lambda s, m=wave_members[reached - 1]: s["device"] not in m
                                             and (s.get("bundle") or {}).get("version") == 2))
            paused = [f"wave {s.get('wave')}: {s.get('reason')}" for _, s in statuses if s.get("status") == "paused"]
            if paused or (ctl.poll() is not None and committed_at[-1] is not None):
                break
            if ctl.poll() is not None and ctl.returncode != 0:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"simulation: rollout over {n} devices stalled: {statuses[-1:]}")
            time.sleep(0.1)
    finally:
        if ctl.poll() is None:
            ctl.terminate()
        try:
            ctl.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ctl.kill()
        reader.join(timeout=5)
    wall = time.monotonic() - t_start
    stderr = ctl.stderr.read() if ctl.stderr else ""
    final = statuses[-1][1] if statuses else {}
    signed_at: dict[int, float] = {}  # the first time the controller reported each wave
    for at, s in statuses:
        signed_at.setdefault(int(s.get("wave") or 0), at)
    waves = [{"wave": i + 1, "percent": pct, "devices": len(wave_members[i]),
              "controller_reached_s": _r(signed_at.get(i + 1)), "all_committed_s": _r(committed_at[i])}
             for i, pct in enumerate(WAVES)]
    total = committed_at[-1]
    print(f"simulation: {n} devices: controller {final.get('status')} (exit {ctl.returncode}); 100% committed "
          f"{f'in {total:.1f} s' if total is not None else 'NOT reached'}; controller CPU {cpu:.1f} s over "
          f"{wall:.1f} s; paused: {paused or 'no'}", flush=True)
    return {"controller": "subprocess: packager rollout start ... --json", "soak": soak, "gates": GATES,
            "exit_code": ctl.returncode, "final_status": final.get("status"), "final_reason": final.get("reason"),
            "paused": paused, "waves": waves,
            "timeline": [{"s": _r(at), "status": d.get("status"), "wave": d.get("wave"), "reason": d.get("reason")}
                         for at, d in statuses], "all_committed_s": _r(total), "controller_exit_s": _r(wall),
            "target_s": TARGET_S if n >= 1000 else None,
            "passed": (total is not None and total <= TARGET_S) if n >= 1000 else None,
            "controller_cpu_s": round(cpu, 2), "controller_cpu_percent_of_one_core": round(100 * cpu / wall, 1),
            "outside_reached_waves_on_v2_max": outside, "controller_stderr_tail": stderr.strip()[-500:] or None}


def run_size(n: int, broker: Mosquitto, v1: Path, v2: Path, tmp: Path, telemetry_s: float, soak: str,
             probe_s: float) -> dict[str, Any]:
    fleet = f"sim{uuid.uuid4().hex[:8]}"
    topics = pub.topics_for(fleet)
    repo = tmp / f"repo-{fleet}"
    root = tmp / f"root-{fleet}.json"
    init_fleet_repo(repo, root)
    client = MqttClient(broker.url, f"bench-{fleet}", prefix=topics)
    client.connect(timeout=10)
    t1 = pub.publish(repo, v1, GROUP, client, topics, None).bundle_target
    pub.publish(repo, v2, None, client, topics, None)  # signed, deployed to nobody: the rollout deploys it
    obs = Observer(client, str(topics.prefix))
    load_before = load_average()
    started = time.monotonic()
    procs = start_sims(n, broker, fleet, root, sha256_file(v1), telemetry_s)
    try:
        deadline = time.monotonic() + 300
        while obs.count(lambda s: True) < n:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"simulation: only {obs.count(lambda s: True)} of {n} devices came online")
            time.sleep(0.2)
        connect_s = time.monotonic() - started
        with obs.lock:
            ids = list(obs.states)
        print(f"simulation: {n} devices online in {connect_s:.1f} s", flush=True)
        probe = run_probe(broker, fleet, t1, probe_s, obs) if probe_s > 0 else None
        if probe:
            print(f"simulation: {n} devices: the controller folded {probe['msgs_per_s']:.0f} msg/s "
                  f"(broker offered {probe['offered_telemetry_per_s']:.0f} telemetry msg/s), lag p50 "
                  f"{probe['lag_ms_p50_first_half']} -> {probe['lag_ms_p50_second_half']} ms (another subscriber: "
                  f"{probe['observer_lag_ms_p50']} ms), backlog max "
                  f"{probe['backlog_max']}, CPU {probe['cpu_percent_of_one_core']}% of a core", flush=True)
        tel0, t0 = obs.telemetry, time.monotonic()
        rollout = run_rollout(n, broker, fleet, repo, obs, ids, soak, procs)
        tel_rate = (obs.telemetry - tel0) / (time.monotonic() - t0)
        return {"devices": n, "processes": len(procs), "connect_s": round(connect_s, 2),
                "telemetry_interval_s": telemetry_s, "telemetry_msgs_per_s_during_rollout": round(tel_rate, 1),
                "ingestion": probe, "rollout": rollout, "bundle_bytes": v2.stat().st_size,
                "load_average_before": load_before, "load_average_after": load_average(),
                "mosquitto": proc_stats(broker.proc.pid) if broker.proc else {}}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        client.close()


def main() -> int:
    if sys.argv[1:2] == ["probe"]:
        return probe_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,300,1000,1000")
    ap.add_argument("--telemetry-s", type=float, default=1.0, help="per simulated device")
    ap.add_argument("--soak", default="3s", help="the controller's --soak per wave (counts in the time)")
    ap.add_argument("--probe-s", type=float, default=20.0, help="ingestion probe length per size; 0: none")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fleet.json")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # mosquitto and the simulators inherit it
    print(f"simulation: ulimit -n was {soft} (hard {hard}); raised to {hard} for the broker and the simulators")
    capacity = ingest_capacity()
    print(f"simulation: the controller's fold alone takes {capacity['fold_msgs_per_s']} msg/s on one core; "
          f"evaluate over 1,000 devices {capacity['evaluate_ms']} ms", flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as t:
        tmp = Path(t)
        v1, v2 = make_bundles(tmp)
        (tmp / "broker").mkdir()
        broker = Mosquitto(tmp / "broker", extra_conf="max_connections -1\nmax_queued_messages 100000")
        broker.start()
        try:
            for n in (int(s) for s in args.sizes.split(",")):
                results.append(run_size(n, broker, v1, v2, tmp, args.telemetry_s, args.soak, args.probe_s))
                write_json(args.out, {"simulation": True, "machine": machine_info(), "code": code_state(),
                                      "mosquitto_version": mosquitto_version(broker.binary),
                                      "nofile_limit": {"soft_before": soft, "hard": hard}, "waves": WAVES,
                                      "per_process": PER_PROCESS, "ingest_capacity": capacity,
                                      "results": results})
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
