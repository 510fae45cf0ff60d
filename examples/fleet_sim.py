"""A simulated fleet: many devices in one process, each with its own real MQTT connection, following signed
deployment documents (rollouts included) the way agents do. Every figure it prints says "simulation".

What is real and what is shared (per process):
- MQTT: every simulated device has its own `agent.transport.mqtt.MqttClient` (its own TCP connection and client
  id). It downloads each bundle over that connection, chunk by chunk through an `MqttFetcher` that checks every
  chunk against the signed chunk plan, and checks the whole file's sha256 and length against the signed target.
  It publishes its retained `devices/<id>/state`, its `events` and periodic `telemetry` itself.
- TUF: ONE `TrustedClient` per process (one metadata directory, refreshed over the process's leader connection
  every poll) verifies the metadata and the group's deployment document for all of its devices. A real agent
  refreshes its own copy; here the signature checks are done once per process, not once per device.
- Membership: every device runs `agent.deploy.rollout.target_for` on the verified document with its own id.
- The model: ONE onnxruntime session per bundle per process, shared by its devices; each device runs the golden
  parity rows through it before it commits (a real, if shared, check) and one real inference per telemetry tick
  (its latency is what the device reports).
- Not simulated: staging in a fresh session per device, probation windows, crash recovery, resources (those
  telemetry fields are null, which docs/telemetry.md defines as "not known").

    python -m examples.fleet_sim --broker mqtt://127.0.0.1:1883 --fleet F --group lab --root root.json \\
        --devices 250 --id-prefix sim-0- [--current-sha256 HEX --current-name digits --current-version 1]

Runs until SIGTERM/SIGINT. Downloads run at most `--concurrency` at a time per process (this machine has 2 cores
for the whole fleet; real devices download in parallel).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.bundle import read_golden_rows, verify_bundle
from agent.deploy.rollout import Membership, membership, rollout_fields, target_for
from agent.errors import EdgeshipError
from agent.transport.mqtt import MqttClient
from agent.transport.topics import Topics
from agent.trust.client import TrustedClient, chunk_plan, target_url
from agent.trust.fetch import METADATA_URL, TARGETS_URL, parse_deployment
from agent.trust.mqtt_fetcher import MqttFetcher

log = logging.getLogger("fleet_sim")
SCHEMA = 1


@dataclass
class Model:
    """A bundle verified and loaded once per process."""

    name: str
    version: int
    session: ort.InferenceSession
    golden_in: dict[str, np.ndarray]
    golden_out: np.ndarray


@dataclass
class SimDevice:
    id: str
    mqtt: MqttClient
    fetcher: MqttFetcher
    current: tuple[str, int, str] | None = None  # name, version, sha256
    busy: bool = False
    rollout: Membership | None = None
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    tel_seq: int = 0
    ev_seq: int = 0


class SimFleet:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.topics = Topics(f"edgeship/{args.fleet}/")
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.models: dict[str, Model] = {}
        self.leader = MqttClient(args.broker, f"sim-leader-{args.id_prefix}".rstrip("-"), prefix=self.topics)
        self.leader.connect(timeout=30)
        self.leader_fetcher = MqttFetcher(self.leader, work / "leader-chunks", timeout=30)
        self.trust = TrustedClient(work / "tuf", Path(args.root), self.leader_fetcher, METADATA_URL, TARGETS_URL)
        self.devices: list[SimDevice] = []
        for i in range(args.devices):
            did = f"{args.id_prefix}{i:05d}"
            client = MqttClient(args.broker, did, prefix=self.topics, keepalive=60)
            client.connect(timeout=60)
            dev = SimDevice(did, client, MqttFetcher(client, work / "chunks" / did, timeout=60))
            if args.current_sha256:
                dev.current = (args.current_name, args.current_version, args.current_sha256)
            self.devices.append(dev)
        self.pool = ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="sim-deploy")
        self.last_doc: bytes | None = None
        for dev in self.devices:
            self.announce(dev, "idle")

    # --- messages in the agents' schema (agent/deploy/driver.py, docs/telemetry.md) ---------------------------

    def announce(self, dev: SimDevice, state: str, candidate: tuple[str, int, str] | None = None) -> None:
        cur = dev.current
        bundle = None if cur is None else {"name": cur[0], "version": cur[1], "format": "onnx"}
        payload = {"status": "online", "device": dev.id, "group": self.args.group, "agent_version": "simulation",
                   "state": state, "bundle": bundle,
                   "candidate": None if candidate is None else {"name": candidate[0], "version": candidate[1],
                                                                "format": None},
                   "serving": bundle, "no_deployment": False, **rollout_fields(dev.rollout),
                   "since": time.time(), "at": time.time(), "simulation": True}
        self._publish(dev, "state", payload, retain=True)

    def event(self, dev: SimDevice, frm: str, to: str, event: str, reason: str,
              ref: tuple[str, int, str] | None) -> None:
        dev.ev_seq += 1
        payload = {"schema": SCHEMA, "device": dev.id, "name": None if ref is None else ref[0],
                   "version": None if ref is None else ref[1], "ts": time.time(), "seq": dev.ev_seq,
                   "from": frm, "to": to, "event": event, "reason": reason, "at": time.time(),
                   "bundle": None if ref is None else {"name": ref[0], "version": ref[1], "sha256": ref[2],
                                                       "format": "onnx"},
                   **rollout_fields(dev.rollout), "simulation": True}
        self._publish(dev, "events", payload, retain=False)

    def telemetry(self, dev: SimDevice) -> None:
        cur = dev.current
        model = self.models.get(cur[2]) if cur else None
        if model is not None:  # one real inference through the shared session: the latency this device reports
            row = {k: v[:1] for k, v in model.golden_in.items()}
            t0 = time.perf_counter()
            model.session.run(None, row)
            dev.latencies.append((time.perf_counter() - t0) * 1000)
            dev.latencies = dev.latencies[-200:]
            dev.requests += 1
        lat = sorted(dev.latencies)
        q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None)  # noqa: E731
        dev.tel_seq += 1
        payload = {"schema": SCHEMA, "device": dev.id, "name": cur[0] if cur else None,
                   "version": cur[1] if cur else None, "ts": time.time(), "seq": dev.tel_seq,
                   **rollout_fields(dev.rollout),
                   "requests_total": dev.requests, "errors_total": 0, "rejected_total": 0,
                   "error_rate": 0.0 if dev.requests else None, "latency_ms_p50": q(0.5), "latency_ms_p95": q(0.95),
                   "latency_ms_p99": q(0.99), "latency_ms_count": len(lat), "parity_ok": True if model else None,
                   "drift_psi": None, "drift_status": "unknown", "accuracy": None, "cpu_percent": None,
                   "rollbacks_total": 0, "simulation": True}
        self._publish(dev, "telemetry", payload, retain=False)

    def _publish(self, dev: SimDevice, leaf: str, payload: dict[str, Any], *, retain: bool) -> None:
        try:
            dev.mqtt.publish(self.topics.device(dev.id, leaf), json.dumps(payload).encode(), retain=retain, qos=1,
                             wait=False)
        except EdgeshipError as e:
            log.warning("simulation: %s could not publish %s: %s", dev.id, leaf, e)

    # --- following the signed deployment ------------------------------------------------------------------------

    def poll(self) -> None:
        """Refresh TUF (shared), read the group's verified document, start a deployment where a device's target
        differs from what it runs."""
        self.trust.refresh()
        dep_tf = self.trust.target_info(f"deployments/{self.args.group}.json")
        if dep_tf is None:
            return
        plan = self.trust.chunk_plan(dep_tf)
        self.leader_fetcher.expect(plan.sha256, plan.length, plan.chunk_size, list(plan.chunk_hashes))
        path = self.trust.download(dep_tf, self.work / "incoming")
        self.leader_fetcher.discard(plan.sha256)
        data = path.read_bytes()
        parse_deployment(data, self.args.group)
        doc = json.loads(data)
        for dev in self.devices:
            if dev.busy:
                continue
            member = membership(doc, dev.id, self.args.group)
            target = target_for(doc, dev.id, self.args.group)
            changed = member != dev.rollout
            dev.rollout = member
            if target is None:
                if changed:
                    self.announce(dev, "idle")
                continue
            tf = self.trust.require_target(target.bundle)
            if dict(tf.custom).get("version") != target.version or dict(tf.custom).get("name") != target.name:
                log.error("simulation: %s is not signed as the document says", target.bundle)
                continue
            sha = tf.hashes["sha256"]
            if dev.current is not None and dev.current[2] == sha:
                if changed:
                    self.announce(dev, "idle")
                continue
            dev.busy = True
            self.pool.submit(self.deploy, dev, (target.name, target.version, sha), tf)

    def deploy(self, dev: SimDevice, ref: tuple[str, int, str], tf: Any) -> None:
        try:
            self.event(dev, "check", "download", "update_available", "", ref)
            self.announce(dev, "download", ref)
            plan = chunk_plan(tf)  # pure: the TrustedClient is the poll thread's alone
            dev.fetcher.expect(plan.sha256, plan.length, plan.chunk_size, list(plan.chunk_hashes))
            parts = []
            for chunk in dev.fetcher.fetch(target_url(TARGETS_URL, tf)):  # each chunk checked on arrival
                parts.append(chunk)
            dev.fetcher.discard(plan.sha256)
            data = b"".join(parts)
            if hashlib.sha256(data).hexdigest() != ref[2] or len(data) != tf.length:
                raise EdgeshipError(f"{tf.path}: downloaded bytes do not match the signed target")
            model = self.model(ref, data)
            rows = {k: v for k, v in model.golden_in.items()}
            out = model.session.run(None, rows)[0]
            if not np.array_equal(out.argmax(1), model.golden_out.argmax(1)):
                raise EdgeshipError("golden parity failed")
            prev = dev.current
            dev.current = ref
            self.event(dev, "commit", "idle", "ok", "", ref)
            self.announce(dev, "idle")
            log.debug("simulation: %s committed %s v%s (was %s)", dev.id, ref[0], ref[1], prev)
        except Exception as e:
            log.warning("simulation: %s failed to deploy %s v%s: %s", dev.id, ref[0], ref[1], e)
            self.event(dev, "rollback", "idle", "failed", type(e).__name__, ref)
        finally:
            dev.busy = False

    def model(self, ref: tuple[str, int, str], data: bytes) -> Model:
        """The bundle (`data`, as the first device of this process downloaded and checked it) verified, unpacked
        and loaded once per process: the shared session."""
        with self.lock:
            m = self.models.get(ref[2])
            if m is None:
                blob = self.work / "bundles" / f"{ref[0]}-{ref[1]}.bundle"
                blob.parent.mkdir(parents=True, exist_ok=True)
                blob.write_bytes(data)
                release = self.work / "releases" / ref[2][:16]
                manifest = verify_bundle(blob, dest=release).manifest
                gin, gout = read_golden_rows(release, manifest, "onnx", 16)
                onnx = next(f for f in manifest.files if f.endswith(".onnx"))
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                m = Model(ref[0], ref[1], ort.InferenceSession(str(release / onnx), opts), gin, gout[0])
                self.models[ref[2]] = m
            return m

    def run(self) -> None:
        next_tel = time.monotonic()
        next_poll = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_poll:
                try:
                    self.poll()
                except EdgeshipError as e:
                    log.warning("simulation: check failed: %s", e)
                next_poll = time.monotonic() + self.args.poll_s
            if self.args.telemetry_s > 0 and now >= next_tel:
                for dev in self.devices:
                    self.telemetry(dev)
                next_tel += self.args.telemetry_s
            self.stop.wait(0.05)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for dev in self.devices:
            dev.mqtt.close()
        self.leader.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--root", required=True, help="the provisioned TUF root.json")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--id-prefix", default="sim-")
    p.add_argument("--concurrency", type=int, default=8, help="downloads in flight at once in this process")
    p.add_argument("--poll-s", type=float, default=1.0)
    p.add_argument("--telemetry-s", type=float, default=5.0, help="per device; 0: none")
    p.add_argument("--current-sha256", default="")
    p.add_argument("--current-name", default="")
    p.add_argument("--current-version", type=int, default=0)
    p.add_argument("--ready-file", type=Path, help="touched once every device is connected")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
        fleet = SimFleet(args, Path(tmp))
        signal.signal(signal.SIGTERM, lambda *_: fleet.stop.set())
        signal.signal(signal.SIGINT, lambda *_: fleet.stop.set())
        print(f"simulation: {len(fleet.devices)} simulated devices connected", flush=True)
        if args.ready_file:
            args.ready_file.touch()
        try:
            fleet.run()
        finally:
            fleet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
