"""`edge-agent run`: the device daemon. Wiring only: it builds the parts from the configuration, runs the loop and
stops cleanly.

- the deployment: `Deployer` (agent/deploy/driver.py) drives the pure state machine (agent/deploy/machine.py) with
  each state's work from `Steps` (agent/deploy/steps.py), fetching through `FetchClient` (a short-lived worker
  process per step) and judging probation with `watch_probation`; the rule everywhere: persist, then act;
- serving: one `ModelHolder` read by the HTTP server (agent/serve/http.py) and MQTT inference (agent/serve/mqtt.py),
  so inference never waits for a deployment step;
- the broker: one `MqttClient`; transitions reach it through `MqttLink` (agent/telemetry/link.py: events through
  the telemetry queue, the retained state and birth message directly); `notify` pokes wake the loop for a check;
- telemetry: one `Telemetry` hub (agent/telemetry/hub.py) that serving reports into (observer, feedback sink,
  /metrics), and the `Publisher` sending its messages and the events through the disk queue (docs/telemetry.md).

Threads: the main thread drives the state machine (and starts every fetch worker); the HTTP server and paho's
network thread serve requests and only read the one model reference; the publisher's threads build and flush telemetry.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__
from agent.config import AgentConfig, ConfigError
from agent.deploy.driver import Deployer
from agent.deploy.fetch_client import FetchClient
from agent.deploy.machine import BundleRef, DeployState
from agent.deploy.probation import read_manifest, watch_probation
from agent.deploy.stage import DeviceProfile, stage_bundle
from agent.deploy.steps import Staged, Steps, release_dir
from agent.deploy.store import StateStore
from agent.errors import TransportError
from agent.sdnotify import Notifier
from agent.serve.holder import LoadedModel, RequestStats
from agent.telemetry.hub import Telemetry
from agent.telemetry.link import MqttLink
from agent.telemetry.publisher import Publisher
from agent.telemetry.queue import DiskQueue
from agent.telemetry.shadow import load_shadow
from agent.telemetry.shadow_manager import ShadowManager
from agent.watchdog import EXIT_HUNG as EXIT_HUNG  # where tests and docs look for it
from agent.watchdog import PulseEvent, Watchdog, WatchedHolder, bounded

if TYPE_CHECKING:  # paho and the HTTP server are imported when first used
    from agent.serve.http import InferenceServer
    from agent.serve.mqtt import MqttInference
    from agent.transport.mqtt import Message, MqttClient, Subscription

log = logging.getLogger(__name__)

RECONNECT_CAP_S = 120.0  # the first connection's retry backoff: doubling from 1 s up to this, with full jitter


class ThreadStager:
    """Stages a release (and loads a shadow bundle) in a thread bounded by [deploy] stage_timeout_s. A native call
    that never returns cannot be interrupted from Python: the agent exits (EXIT_HUNG), and the restart counter,
    persisted before STAGE, rolls the bundle back after max_restarts (a hung shadow: agent/telemetry/shadow_manager.py
    does not load it again)."""

    def __init__(self, cfg: AgentConfig, device: DeviceProfile) -> None:
        self.threads = cfg.deploy.threads
        self.timeout_s = cfg.deploy.stage_timeout_s
        self.device = device
        self.beat: Callable[[], None] = lambda: None  # the watchdog's (Daemon sets it)

    def stage(self, ref: BundleRef, *, warm_runs: int, timing_runs: int) -> Staged:
        path = Path(ref.path)
        manifest = read_manifest(path)
        staged = bounded(lambda: stage_bundle(path, manifest, self.device, threads=self.threads, warmup=warm_runs,
                                              timing_runs=timing_runs),
                         self.timeout_s + self.device.probe_budget_s(manifest), f"staging {ref.name} v{ref.version}",
                         self.beat)
        model = LoadedModel(ref.name, ref.version, staged.fmt, staged.session, manifest=manifest)
        return Staged(model, staged.to_event())

    def load_shadow(self, release: Path) -> LoadedModel:
        """agent/telemetry/shadow.py's load_shadow, bounded like staging (it stages the shadow bundle)."""
        limit = self.timeout_s + self.device.probe_budget_s(read_manifest(release))  # a format only the shadow has
        return bounded(lambda: load_shadow(release, self.device), limit, f"loading shadow {release.name}", self.beat)


class Daemon:
    def __init__(self, cfg: AgentConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.state_dir = cfg.agent.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore.in_dir(self.state_dir)
        self.stats = RequestStats()
        self.holder = WatchedHolder(stats=self.stats, max_batch=cfg.serve.max_batch)
        self.watchdog = Watchdog(Notifier.from_env(), longest_running_s=self.holder.longest_running_s)
        self.wake = threading.Event()
        self.stopping = PulseEvent(self.watchdog)  # each look from the main thread beats the watchdog
        self.mqtt: MqttClient | None = None
        self.http: InferenceServer | None = None
        tcfg = cfg.telemetry
        self.telemetry = Telemetry(tcfg, self.state_dir, serving=self.holder.get, release_of=self.release_of)
        self.stats.observers.append(self.telemetry)
        self.queue = DiskQueue(self.state_dir / "telemetry.db", max_messages=tcfg.queue_max_messages,
                               max_bytes=tcfg.queue_max_bytes)
        self.publisher = Publisher(self.queue, cfg.agent.device_id, build=self.telemetry.message_body,
                                   interval_s=tcfg.interval_s, clock=clock)
        self.link = MqttLink(cfg.agent.device_id, self.publisher, cfg.telemetry.state_interval_s)
        self._infer_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mqtt-infer")
        self._answerer: MqttInference | None = None

        def watch(model: LoadedModel | None, release: Path, fmt: str) -> None:
            watch_probation(model, self.stats, release, fmt, cfg.deploy, self.stopping)

        fetch = FetchClient(cfg, stopping=self.stopping, connected=lambda: self.mqtt is not None)
        stager = ThreadStager(cfg, DeviceProfile.detect(self.state_dir, cfg.deploy.stage_timeout_s))
        stager.beat = self.watchdog.beat
        self.steps = Steps(fetch=fetch, stager=stager, holder=self.holder, watch=watch, state_dir=self.state_dir,
                           group=cfg.agent.group)
        self.shadows = ShadowManager(fetch, self.state_dir, tcfg, self.stats.observers, load=stager.load_shadow,
                                     in_use=self.bundles_in_use)
        self.telemetry.shadow = self.shadows.snapshot
        self.deployer = Deployer(self.steps, self.store, self.watchdog.link(self.link), device_id=cfg.agent.device_id,
                                 group=cfg.agent.group, agent_version=__version__, stopping=self.stopping,
                                 clock=clock, keep=cfg.deploy.keep, max_restarts=cfg.deploy.max_restarts)

    # --- starting ----------------------------------------------------------------------------------------------

    def start(self) -> DeployState:
        """Refuse a bad listen address, recover from whatever the last run left, start serving, connect."""
        self.check_listen()
        ds = self.deployer.start()
        self._start_http(ds)
        self.publisher.start()
        self._connect()
        return ds

    def release_of(self, model: LoadedModel) -> Path | None:
        """The release directory of a serving model (its reference.json and golden rows), from the saved state."""
        ds = self.store.load()
        for ref in (ds.current, ds.candidate):
            if ref is not None and (ref.name, ref.version) == (model.name, model.version):
                return release_dir(self.state_dir, ref.name, ref.version, ref.sha256)
        return None

    def bundles_in_use(self) -> set[str]:
        """The sha256s of the bundles the saved deployment state refers to (current, candidate, kept)."""
        ds = self.store.load()
        return {ref.sha256 for ref in (ds.current, ds.candidate, *ds.previous) if ref is not None}

    def _listen_address(self) -> tuple[str, int]:
        host, _, port = self.cfg.serve.http.rpartition(":")
        try:
            number = int(port)
            if not 0 <= number <= 65535:
                raise ValueError(port)
        except ValueError:
            raise ConfigError(f"[serve] http {self.cfg.serve.http!r}: expected HOST:PORT") from None
        return host.strip("[]") or "127.0.0.1", number

    def check_listen(self) -> None:
        """Refuse to start (ConfigError) when the [serve] http address cannot be bound, before the persisted state
        is touched: a busy port is a configuration mistake, not a crash to count against a deployment."""
        host, port = self._listen_address()
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise ConfigError(f"[serve] http {host}:{port}: {e.strerror or e}") from e
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is fine
            try:
                probe.bind(address)
            except OSError as e:
                raise ConfigError(f"[serve] http {host}:{port}: cannot listen ({e.strerror or e})") from e

    def _start_http(self, ds: DeployState) -> None:
        from agent.serve.http import InferenceServer, ListenError

        host, port = self._listen_address()
        metrics = self.telemetry.metrics_text if self.cfg.telemetry.metrics else None
        self.http = InferenceServer(self.holder, self.stats, host, port, feedback=self.telemetry, metrics=metrics)
        try:
            self.http.start()
        except ListenError as e:  # taken since check_listen(): not the model's fault, so not counted as a crash
            self.deployer.stop(ds)
            raise ConfigError(f"[serve] http: {e}") from e
        log.info("serving OIP v2 on http://%s:%d", host, self.http.port)

    # --- the broker --------------------------------------------------------------------------------------------

    def _new_client(self) -> MqttClient:
        from agent.transport.mqtt import MqttClient, Will, unique_client_id
        from agent.transport.topics import Topics

        dev = self.cfg.agent.device_id
        topics = Topics(self.cfg.topic_prefix)
        will = Will(topics.device(dev, "state"), self._will_payload(), retain=True, qos=1)
        m = self.cfg.mqtt
        # a client id of its own: any certified client could take a fixed, guessable one and knock the daemon off
        return MqttClient(m.url, unique_client_id(f"edge-agent-{dev}"), prefix=topics, ca_file=m.ca_file or None,
                          cert_file=m.cert_file or None, key_file=m.key_file or None, will=will)

    def _will_payload(self) -> bytes:
        return json.dumps({"status": "offline", "device": self.cfg.agent.device_id}).encode()

    def _connect(self) -> None:
        client = self._new_client()
        try:
            client.connect(timeout=self.cfg.mqtt.connect_timeout_s)
        except TransportError as e:
            # paho reconnects on its own only after a first successful connect: until then, retry here
            log.warning("broker unreachable (%s); serving locally, retrying in the background", e)
            threading.Thread(target=self._connect_later, name="mqtt-connect", daemon=True).start()
            return
        self._attach(client)

    def _connect_later(self) -> None:
        # Exponential backoff with full jitter, so a fleet does not reconnect in step after a broker outage. (paho's
        # own automatic reconnects after a first connection: agent/transport/mqtt.py's reconnect_delay_set.)
        backoff = 1.0
        while not self.stopping.wait(random.uniform(0.5, 1.0) * backoff):
            client = self._new_client()
            try:
                client.connect(timeout=self.cfg.mqtt.connect_timeout_s)
                self._attach(client)
            except TransportError as e:
                client.close()
                log.debug("broker still unreachable: %s", e)
                backoff = min(2 * backoff, RECONNECT_CAP_S)
                continue
            log.info("connected to the broker")
            self.deployer.announce(self.store.load())
            self.wake.set()  # check for a deployment now
            return

    def _attach(self, client: MqttClient) -> None:
        """Use a connected client: subscribe, send what was recorded before, serve MQTT requests."""
        from agent.serve.mqtt import MqttInference

        dev = self.cfg.agent.device_id
        notify = client.subscribe_stream([client.topics.notify])
        # the shared topics and each app's own (agent/serve/mqtt.py: where each is answered)
        requests = client.subscribe_stream([client.topics.device(dev, "infer/request") + s for s in ("", "/+")])
        feedback = client.subscribe_stream([client.topics.device(dev, "feedback") + s for s in ("", "/+")])
        own_state = client.subscribe_stream([client.topics.device(dev, "state")])

        def publish(topic: str, body: bytes, correlation: bytes | None) -> None:
            client.publish(topic, body, retain=False, qos=1, wait=False, correlation_data=correlation)

        # which response topics are answered, and the refusals' log: agent/serve/mqtt.py
        self._answerer = MqttInference(self.holder, self.stats, publish, client.topics.prefix, dev,
                                       feedback=self.telemetry)
        self.mqtt = client
        self.link.attach(client)
        threading.Thread(target=self._notify_loop, args=(notify,), name="notify", daemon=True).start()
        threading.Thread(target=self._infer_loop, args=(requests,), name="mqtt-infer", daemon=True).start()
        threading.Thread(target=self._feedback_loop, args=(feedback,), name="mqtt-feedback", daemon=True).start()
        threading.Thread(target=self._will_loop, args=(own_state,), name="mqtt-will", daemon=True).start()
        if self.cfg.telemetry.home_assistant:
            self._announce_to_home_assistant(client)

    def _announce_to_home_assistant(self, client: MqttClient) -> None:
        """Retained Home Assistant discovery configs, so the device appears there by itself (docs/dashboard.md)."""
        from agent.telemetry.home_assistant import discovery_messages, publish_discovery

        def publish(topic: str, body: bytes, retain: bool) -> None:
            client.publish(topic, body, retain=retain, qos=1, wait=False)

        messages = discovery_messages(client.topics, self.cfg.agent.device_id, fleet=self.cfg.agent.fleet,
                                      agent_version=__version__, interval_s=self.cfg.telemetry.interval_s)
        try:
            publish_discovery(publish, messages)
        except TransportError as e:  # the broker may refuse homeassistant/# to this device: say so, keep serving
            log.warning("could not publish Home Assistant discovery: %s", e)

    def _notify_loop(self, sub: Subscription) -> None:
        for _msg in sub:
            self.wake.set()  # a poke only: what to run is decided from signed metadata

    def _infer_loop(self, sub: Subscription) -> None:
        for msg in sub:
            self._infer_pool.submit(self._answer, msg)

    def _answer(self, msg: Message) -> None:
        if self._answerer is not None:
            self._answerer.answer(msg)  # never raises; logs what went wrong

    def _will_loop(self, sub: Subscription) -> None:
        # An earlier run's connection that died unannounced (power cut) fires its last will when the broker notices
        # (1.5 keepalives), maybe after this run said "online" under its new client id: say it again.
        for msg in sub:
            if msg.payload == self._will_payload() and not self.stopping.is_set():
                log.info("a last will marked this device offline while it runs: announcing its state again")
                self.deployer.announce(self.store.load())

    def _feedback_loop(self, sub: Subscription) -> None:
        for msg in sub:
            if self._answerer is not None:
                self._infer_pool.submit(self._answerer.feedback, msg)  # never raises either

    # --- running -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        ds = self.start()
        self.deployer.announce(ds)  # also the first STATUS= (the watchdog's link)
        self.watchdog.ready()
        ds = self.deployer.drive(ds)
        next_check = time.monotonic()
        while not self.stopping.is_set():
            timeout = min(max(0.0, next_check - time.monotonic()), self.watchdog.interval_s)
            if self.wake.wait(timeout) or time.monotonic() >= next_check:
                self.wake.clear()
                if self.stopping.is_set():
                    break
                ds = self.deployer.check(ds)
                self.shadows.after_check()  # the shadow bundle the check's answer named, if any
                next_check = time.monotonic() + self.cfg.deploy.poll_interval_s
        self.shutdown(ds)
        return 0

    def shutdown(self, ds: DeployState) -> None:
        """The normal stop (SIGTERM, SIGINT): `ds` is the last state the deployer persisted."""
        self.watchdog.stopping()
        self.deployer.announce(ds, status="offline")  # a clean disconnect does not fire the last will
        if self.http is not None:
            self.http.stop()
        self.publisher.stop()  # what the broker takes within 2 s; the rest stays queued on disk for the next run
        if self.mqtt is not None:
            self.mqtt.close()
        self.shadows.close()
        self.queue.close()
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        # Last, once nothing serves: a model that crashes the agent before this point still counts as a crash.
        self.deployer.stop(ds)

    def request_stop(self, *_: object) -> None:
        self.stopping.set()
        self.wake.set()


def run_daemon(cfg: AgentConfig) -> int:
    daemon = Daemon(cfg)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    return daemon.run()
