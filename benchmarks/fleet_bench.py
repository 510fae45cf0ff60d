"""Fleet scale (issue 11), SIMULATION: a four-wave rollout of a ~1 MB signed bundle to 100, 300 and 1,000 simulated
devices (examples/fleet_sim.py: a real MQTT connection per device, TUF verification shared per process, one shared
onnxruntime session per process) on one local mosquitto started on a free port with `max_connections -1`.

    .venv/bin/python -m benchmarks.fleet_bench [--sizes 100,300,1000] [--out benchmarks/results/fleet.json]

The waves are driven by signing deployment documents with a rollout entry directly (the packager's TUF repository
and publish internals), not by the rollout controller, and advance as soon as every device of the reached wave
reports the new version committed in its retained state (no soak, no gates). Every figure printed says "simulation".
"""

from __future__ import annotations

import argparse
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
from benchmarks._common import code_state, machine_info, mosquitto_version, write_json
from examples.digits.train import train_digits
from examples.local_broker import Mosquitto
from packager import publish as pub
from packager import tuf_repo
from packager.build import BuildOptions, Progress, build

ROOT = Path(__file__).resolve().parents[1]
GROUP = "sim"
WAVES = [1.0, 10.0, 50.0, 100.0]
PER_PROCESS = 250
TARGET_S = 120.0


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


def sign_rollout(repo: Path, bundle_target: str, rollout: dict[str, Any], client: MqttClient, topics: Any) -> None:
    """Sign and push deployments/<GROUP>.json naming `bundle_target` with `rollout` (the agreed format)."""
    tf = tuf_repo.referenced_targets(repo)[bundle_target]
    name, version = str(tf.custom["name"]), int(tf.custom["version"])
    doc = {"group": GROUP, "bundle": bundle_target, "name": name, "version": version, "sha256": tf.hashes["sha256"],
           "rollout": rollout}
    dep = pub.deployment_target_path(GROUP)
    with tempfile.TemporaryDirectory() as t:
        f = Path(t) / f"{GROUP}.json"
        f.write_bytes(json.dumps(doc, sort_keys=True).encode() + b"\n")
        tuf_repo.add_targets(repo, [(dep, f, {"group": GROUP, "name": name, "version": version})],
                             chunk_size=pub.CHUNK_SIZE)
    signed = tuf_repo.referenced_targets(repo)
    pub.push(repo, client, topics, [signed[bundle_target], signed[dep]], None)


class Observer:
    """Counts what the broker carries: every device's retained state, and telemetry messages."""

    def __init__(self, client: MqttClient, prefix: str) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.telemetry = 0
        self.lock = threading.Lock()
        self.sub = client.subscribe_stream([f"{prefix}devices/+/state", f"{prefix}devices/+/telemetry"], timeout=30)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for msg in self.sub:
            if msg.topic.endswith("/telemetry"):
                with self.lock:
                    self.telemetry += 1
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


def run_size(n: int, broker: Mosquitto, v1: Path, v2: Path, tmp: Path, telemetry_s: float) -> dict[str, Any]:
    fleet = f"sim{uuid.uuid4().hex[:8]}"
    topics = pub.topics_for(fleet)
    repo = tmp / f"repo-{n}"
    tuf_repo.init_repo(repo)
    root = tmp / f"root-{n}.json"
    root.write_bytes(tuf_repo.provisioning_root(repo).read_bytes())
    client = MqttClient(broker.url, f"bench-{fleet}", prefix=topics)
    client.connect(timeout=10)
    t1 = pub.publish(repo, v1, GROUP, client, topics, None).bundle_target
    t2 = pub.publish(repo, v2, "staging-nobody", client, topics, None).bundle_target  # signed, deployed to nobody
    v1_sha = sha256_file(v1)
    obs = Observer(client, str(topics.prefix))
    procs: list[subprocess.Popen[bytes]] = []
    nproc = math.ceil(n / PER_PROCESS)
    started = time.monotonic()
    for k in range(nproc):
        count = n // nproc + (1 if k < n % nproc else 0)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "examples.fleet_sim", "--broker", broker.url, "--fleet", fleet, "--group", GROUP,
             "--root", str(root), "--devices", str(count), "--id-prefix", f"sim-{k}-", "--telemetry-s",
             str(telemetry_s), "--current-sha256", v1_sha, "--current-name", "digits", "--current-version", "1"],
            cwd=ROOT, stdout=subprocess.DEVNULL))
    try:
        ids: list[str] = []
        deadline = time.monotonic() + 300
        while obs.count(lambda s: True) < n:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"simulation: only {obs.count(lambda s: True)} of {n} devices came online")
            time.sleep(0.2)
        connect_s = time.monotonic() - started
        with obs.lock:
            ids = list(obs.states)
        previous = {"bundle": t1, "name": "digits", "version": 1}
        waves = []
        t_start = time.monotonic()
        tel_start = obs.telemetry
        for i, pct in enumerate(WAVES, 1):
            members = {d for d in ids if bucket(d, GROUP) < pct}
            rollout = {"id": f"bench-{fleet}", "wave": i, "waves": WAVES, "percent": pct, "previous": previous,
                       "state": "done" if pct >= 100 else "rolling", "reverted_by_controller": False}
            t0 = time.monotonic()
            sign_rollout(repo, t2, rollout, client, topics)
            deadline = t0 + 600
            while True:
                done = obs.count(lambda s, m=members: s["device"] in m and (s.get("bundle") or {}).get("version") == 2
                                 and s["state"] == "idle")
                if done >= len(members):
                    break
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"simulation: wave {i} stalled at {done}/{len(members)}")
                time.sleep(0.1)
            others = obs.count(lambda s, m=members: s["device"] not in m
                               and (s.get("bundle") or {}).get("version") == 2)
            waves.append({"wave": i, "percent": pct, "devices": len(members),
                          "seconds": round(time.monotonic() - t0, 2), "outside_wave_on_new_version": others})
            print(f"simulation: {n} devices, wave {i} ({pct:g}%): {len(members)} devices committed in "
                  f"{waves[-1]['seconds']:.1f} s", flush=True)
        total = time.monotonic() - t_start
        tel_rate = (obs.telemetry - tel_start) / total
        broker_stats = proc_stats(broker.proc.pid) if broker.proc else {}
        print(f"simulation: {n} devices: four waves to 100% committed in {total:.1f} s; broker carried "
              f"{tel_rate:.0f} telemetry msg/s; mosquitto {broker_stats}", flush=True)
        return {"devices": n, "processes": nproc, "connect_s": round(connect_s, 2), "waves": waves,
                "total_s": round(total, 2), "target_s": TARGET_S if n >= 1000 else None,
                "passed": total <= TARGET_S if n >= 1000 else None,
                "telemetry_msgs_per_s": round(tel_rate, 1), "telemetry_interval_s": telemetry_s,
                "bundle_bytes": v2.stat().st_size, "mosquitto": broker_stats}
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,300,1000")
    ap.add_argument("--telemetry-s", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fleet.json")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # mosquitto and the simulators inherit it
    print(f"simulation: ulimit -n was {soft} (hard {hard}); raised to {hard} for the broker and the simulators")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as t:
        tmp = Path(t)
        v1, v2 = make_bundles(tmp)
        (tmp / "broker").mkdir()
        broker = Mosquitto(tmp / "broker", extra_conf="max_connections -1\nmax_queued_messages 100000")
        broker.start()
        try:
            for n in (int(s) for s in args.sizes.split(",")):
                results.append(run_size(n, broker, v1, v2, tmp, args.telemetry_s))
                write_json(args.out, {"simulation": True, "machine": machine_info(), "code": code_state(),
                                      "mosquitto_version": mosquitto_version(broker.binary),
                                      "nofile_limit": {"soft_before": soft, "hard": hard},
                                      "waves": WAVES, "per_process": PER_PROCESS, "results": results})
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
