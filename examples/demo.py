"""The story behind `make demo`, told step by step with the real command lines (each printed before it runs):

 1. a broker: Mosquitto from this machine, on private loopback ports, with the project's listener config (an
    ordinary listener for the agents and tools, a WebSockets one for the dashboard);
 2. the digits model trained and its int8 bundle built (ONNX + TFLite, with a measured accuracy report);
 3. the fleet's signing keys created (a TUF repository);
 4. v1 signed and published for the device group `lab`;
 5. three devices started: real `edge-agent run` processes that verify, stage and serve it;
 6. inference requests, each followed by its true label (labelled feedback);
 7. `packager fleet status`, and the dashboard's address;
 8. v2 rolled out in three waves, each gated on what the devices report;
 9. a deliberately bad v3 (trained on shifted labels): its accuracy gate fails in the first wave, the controller
    aborts, and the group goes back to v2;
10. the fleet as it ends.

Everything runs against a throwaway broker and out/demo/, never a broker already on the machine. All processes are
stopped at the end, on an error and on Ctrl-C (examples/demo_procs.py).

    python -m examples.demo [--out out/demo] [--live]

`--live` (`make demo-live`) keeps the fleet, the traffic and the dashboard running after the story until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from examples.demo_fleet import (
    DEVICES,
    GROUP,
    WAVES,
    Device,
    Traffic,
    agent_config,
    served_version,
    wave_of,
)
from examples.demo_procs import Children, Interrupted, StepFailed, stop_signals_ignored, stop_signals_raise
from examples.local_broker import Mosquitto, MosquittoMissing, free_port

BIN = Path(sys.executable).parent
STEPS = 10
GATES = "parity>=0.99,accuracy>=0.9*baseline,error_rate<=0.01,latency_ms_p95<=50,rollbacks==0,offline==0"
SOAK = "5s"
MIN_REQUESTS = 50  # in a wave's window, before a failing gate is a verdict (a few seconds of the demo's traffic)
DEPLOY_TIMEOUT_S = 180.0  # generous: a loaded 2-core machine stages a bundle in seconds, not minutes
EXIT_INTERRUPTED = 130
# torch's OpenMP threads spin at each barrier by default: on a busy 2-core machine (other jobs, CI) that made the
# digits training about 4x slower (3 epochs: ~45 s against ~12 s with PASSIVE, at a load average of ~14). The
# demo's training and build steps get PASSIVE unless the caller chose a policy.
# The packager's private keys are encrypted at rest (docs/security.md): the demo's own packager runs use this demo
# passphrase unless the caller set EDGESHIP_KEY_PASSPHRASE; step 3 says so. Only the packager commands that
# sign get a passphrase: every other child (agents, training, the dashboard, the event follower) gets none.
DEMO_PASSPHRASE = "edgeship-demo-passphrase"
DEMO_ROOT_PASSPHRASE = "edgeship-demo-root-passphrase"  # the root keys' own, as README advises
_PASSPHRASES = ("EDGESHIP_KEY_PASSPHRASE", "EDGESHIP_ROOT_KEY_PASSPHRASE")
CHILD_ENV = {**{k: v for k, v in os.environ.items() if k not in _PASSPHRASES},
             "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
PACKAGER_ENV = {**CHILD_ENV, **{k: os.environ[k] for k in _PASSPHRASES if os.environ.get(k)},
                "EDGESHIP_KEY_PASSPHRASE": os.environ.get("EDGESHIP_KEY_PASSPHRASE") or DEMO_PASSPHRASE,
                "EDGESHIP_ROOT_KEY_PASSPHRASE": os.environ.get("EDGESHIP_ROOT_KEY_PASSPHRASE") or DEMO_ROOT_PASSPHRASE}


def say(text: str) -> None:
    print(textwrap.fill(f"demo: {text}", width=110, subsequent_indent="      "), flush=True)


def shown(cmd: list[str]) -> str:
    """The command as a user would type it: the venv's scripts by name, paths as given."""
    return shlex.join([Path(cmd[0]).name if cmd[0].startswith(str(BIN)) else cmd[0], *cmd[1:]])


class Demo:
    def __init__(self, out: Path, live: bool) -> None:
        self.out = out
        self.live = live
        self.children = Children()
        self.broker: Mosquitto | None = None
        self.traffic: Traffic | None = None
        self.devices: list[Device] = []
        self.started = time.monotonic()
        self.told = False  # the whole story ran (then, with --live, Ctrl-C is the expected way out)

    # --- running things ---------------------------------------------------------------------------------------

    def run(self, *cmd: object, ok: tuple[int, ...] = (0,), env: dict[str, str] = CHILD_ENV) -> tuple[int, str]:
        args = [str(c) for c in cmd]
        print(f"\n$ {shown(args)}", flush=True)
        return self.children.run(args, ok=ok, env=env)

    def packager(self, *args: object, ok: tuple[int, ...] = (0,)) -> tuple[int, str]:
        return self.run(BIN / "packager", *args, ok=ok, env=PACKAGER_ENV)

    def check_agents(self) -> None:
        dead = [d.device_id for d in self.devices if d.device_id not in self.children.running]
        if dead:
            logs = ", ".join(str(self.out / d / "agent.log") for d in dead)
            raise StepFailed(f"agent(s) {', '.join(dead)} exited; see {logs}")

    def wait_versions(self, want: dict[str, int], what: str) -> None:
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while True:
            self.check_agents()
            now = {d.device_id: served_version(d.port) for d in self.devices}
            if all(now[d] == v for d, v in want.items()):
                return
            if time.monotonic() > deadline:
                raise StepFailed(f"{what}: after {DEPLOY_TIMEOUT_S:g}s the devices serve {now} (agent logs in "
                                 f"{self.out}/<device>/agent.log)")
            time.sleep(0.5)

    def close(self) -> None:
        with stop_signals_ignored():
            if self.traffic is not None:
                self.traffic.stop()
            left = len(self.children.running) + (self.broker is not None and self.broker.proc is not None)
            self.children.stop_all()
            if self.broker is not None:
                self.broker.stop()
            if left:
                print(f"demo: stopped the {left} process(es) it had running", flush=True)

    # --- the story --------------------------------------------------------------------------------------------

    def step(self, n: int, title: str, text: str) -> None:
        at = time.monotonic() - self.started
        head = f"[{n}/{STEPS}] {title}   ({at // 60:.0f}:{at % 60:02.0f} in)"
        print(f"\n\033[1m{head}\033[0m" if sys.stdout.isatty() else f"\n{head}")
        print(textwrap.fill(text, width=110), flush=True)

    def story(self) -> None:
        out = self.out
        self.step(1, "A broker", "Mosquitto from this machine on private loopback ports, with the listeners the "
                  "project's docs recommend (docs/dashboard.md): an ordinary one for the agents and the packager, "
                  "and a WebSockets one the dashboard's page reads (Mosquitto 2.0.11 refuses to start with a "
                  "WebSockets listener alone).")
        ws_port = free_port()
        (out / "broker").mkdir()
        self.broker = Mosquitto(out / "broker", extra_conf=f"set_tcp_nodelay true\nlistener {ws_port} 127.0.0.1\n"
                                                           "protocol websockets\n")
        self.broker.start()
        say(f"{self.broker.binary} -c {self.broker.conf_path}: MQTT on {self.broker.url}, WebSockets on "
            f"ws://127.0.0.1:{ws_port}")

        self.step(2, "Train the model and build its bundle", "A small CNN learns sklearn's 8x8 digits; `packager "
                  "build` quantizes it to int8 ONNX and int8 TFLite, measures both against fp32 on held-out data "
                  "with the real runtimes, and writes a self-checking bundle and an HTML report.")
        self.run(BIN / "python", "-m", "examples.digits.train", "--out", out)
        self.packager("build", out / "digits.pt2", "--name", "digits", "--version", "1", "--calib",
                      out / "calib.npz", "--eval", out / "eval.npz", "--out", out / "bundles")
        say(f"the report: {out / 'bundles' / 'digits-1.report.html'}")

        self.step(3, "The fleet's keys", "A TUF repository with fresh Ed25519 keys. Devices trust only what these "
                  "keys sign, whatever the broker serves; they are provisioned with the repository's root.json.")
        repo = out / "repo"
        if not os.environ.get("EDGESHIP_KEY_PASSPHRASE"):
            say(f"its private keys are encrypted at rest; the demo's packager runs use the demo passphrase "
                f"EDGESHIP_KEY_PASSPHRASE={DEMO_PASSPHRASE} (and {DEMO_ROOT_PASSPHRASE} for the root keys, unless "
                "EDGESHIP_ROOT_KEY_PASSPHRASE is set; for real keys: your own, or let packager ask; README).")
        self.packager("keys", "init", "--repo", repo)
        from packager.tuf_repo import provisioning_root

        root = provisioning_root(repo).resolve()

        self.step(4, "Publish v1 to the group", f"Signed for group `{GROUP}` and published as retained MQTT "
                  "messages: every device of the group deploys it.")
        self.packager("publish", out / "bundles" / "digits-1.bundle", "--repo", repo, "--broker", self.broker.url,
                      "--group", GROUP)

        self.step(5, "Three devices", "Three real device agents (`edge-agent run`), each with its own config and "
                  "state directory: each fetches the signed deployment, verifies every chunk, stages the bundle, "
                  "checks its golden-output parity, swaps it in, serves it over HTTP and watches a probation "
                  "window before committing it.")
        events = [BIN / "packager", "fleet", "events", "--follow", "--broker", self.broker.url]
        print(f"\n$ {shown([str(a) for a in events])}   (in the background: every device's transitions, into "
              f"{out / 'events.log'})", flush=True)
        self.children.start("events", events, log=out / "events.log", env=CHILD_ENV)
        for device_id in DEVICES:
            home = out / device_id
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir(parents=True)
            port = free_port()
            (home / "agent.toml").write_text(agent_config(device_id, broker_url=self.broker.url, root=root,
                                                          http_port=port))
            print(f"\n$ edge-agent run --config {home / 'agent.toml'}   (in the background; log: "
                  f"{home / 'agent.log'})", flush=True)
            self.children.start(device_id, [BIN / "edge-agent", "run", "--config", home / "agent.toml"],
                                log=home / "agent.log", env=CHILD_ENV)
            self.devices.append(Device(device_id, port, home))
        self.wait_versions({d: 1 for d in DEVICES}, "deploying v1")
        say("every device serves digits v1: " + ", ".join(f"{d.device_id} on http://127.0.0.1:{d.port}"
                                                          for d in self.devices))
        self.run(BIN / "edge-agent", "status", "--config", out / DEVICES[0] / "agent.toml")

        self.step(6, "Inference", "Users send images to the devices (Open Inference Protocol v2 over HTTP); later "
                  "the application learns each true digit and tells the device (labelled feedback), which turns "
                  "it into the accuracy figure of its telemetry. From here on that traffic runs in the background.")
        self.show_one_request()
        self.traffic = Traffic(self.devices, out / "eval.npz").start()
        time.sleep(4.0)
        say(f"{self.traffic.answered} requests answered and {self.traffic.labelled} labels accepted so far")

        self.step(7, "The fleet's view", "What the devices report over MQTT (state, version, latency, accuracy, "
                  "drift, resources), as a table; and the same, live, in the browser.")
        self.packager("fleet", "status", "--broker", self.broker.url, "--group", GROUP, "--wait", "3")
        dash_port = free_port()
        dash = [BIN / "packager", "dashboard", "--broker-ws", f"ws://127.0.0.1:{ws_port}", "--listen",
                f"127.0.0.1:{dash_port}"]
        print(f"\n$ {shown([str(a) for a in dash])}   (in the background; log: {out / 'dashboard.log'})")
        self.children.start("dashboard", dash, log=out / "dashboard.log", env=CHILD_ENV)
        url = f"http://127.0.0.1:{dash_port}/"
        self.wait_http(url)
        say(f"the dashboard is on {url}: open it now to watch the rollouts below"
            + ("" if self.live else " (`make demo-live` keeps it up after the story)"))

        self.step(8, "v2, in waves", "v2 is the same model without the TFLite artifact these devices do not use "
                  "(they run ONNX, as `edge-agent status` said): half the download. `packager publish` without a "
                  "group signs it for nobody; `packager rollout start` then moves the group in waves of "
                  f"{', '.join(f'{w:g}%' for w in WAVES)} of its devices ("
                  + ", ".join(f"{d} in wave {wave_of(d)}" for d in DEVICES) + f"), each soaking {SOAK} with "
                  "every gate holding on the devices' telemetry: the canary's accuracy against the devices still "
                  "on v1, parity, errors, latency, rollbacks, devices offline.")
        self.build_and_publish(out / "digits.pt2", 2, "--format", "onnx")
        self.rollout("digits-v2", 2, ok=(0,))
        self.wait_versions({d: 2 for d in DEVICES}, "rolling out v2")
        say("every device serves v2")

        self.step(9, "A bad v3", "v3 was trained on labels shifted by one digit, a data-pipeline bug that raises no "
                  "error: it builds (int8 agrees with its own fp32 model, which is what the build's gate compares; "
                  "the report does show its accuracy on the true labels, for whoever reads it), signs, and passes "
                  "every check a device makes on its own. Only the labelled feedback from the field shows that it "
                  "is wrong: the accuracy gate fails in the first wave, and the controller aborts, signing a "
                  "document that returns the whole group to v2.")
        self.run(BIN / "python", "-m", "examples.digits.train", "--out", out / "v3", "--epochs", "6",
                 "--shift-labels", "1")
        self.build_and_publish(out / "v3" / "digits.pt2", 3)
        seen = (out / "events.log").stat().st_size
        self.rollout("digits-v3", 3, ok=(3,))
        self.wait_versions({d: 2 for d in DEVICES}, "returning to v2")
        canary = [d for d in DEVICES if wave_of(d) == 1]
        time.sleep(1.0)  # the last transition's event
        with (out / "events.log").open("rb") as f:
            f.seek(seen)
            lines = f.read().decode(errors="replace").splitlines()
        say(f"the devices' transitions since the v3 rollout started, from {out / 'events.log'} (checks that "
            "found nothing new left out):")
        print("\n".join(line for line in lines if " no_update " not in line), flush=True)
        say(f"every device serves v2 again: {', '.join(canary)} (wave 1) ran v3 and went back to v2; "
            f"{' and '.join(d for d in DEVICES if d not in canary)} never downloaded v3.")

        self.step(10, "The fleet now", "Every device on v2 and answering; v3 stays signed, and no device runs it.")
        self.packager("fleet", "status", "--broker", self.broker.url, "--group", GROUP, "--wait", "3")
        self.check_agents()
        elapsed = time.monotonic() - self.started
        say(f"the story took {elapsed // 60:.0f} min {elapsed % 60:02.0f} s; the devices answered "
            f"{self.traffic.answered} requests ({self.traffic.failed} got no answer) and accepted "
            f"{self.traffic.labelled} labels")
        self.told = True
        if self.live:
            say(f"the fleet stays up: the dashboard is on {url}; Ctrl-C ends the demo")
            while True:
                time.sleep(1.0)
                self.check_agents()

    def build_and_publish(self, model: Path, version: int, *build_args: str) -> None:
        self.packager("build", model, "--name", "digits", "--version", str(version), *build_args, "--calib",
                      self.out / "calib.npz", "--eval", self.out / "eval.npz", "--out", self.out / "bundles")
        assert self.broker is not None
        self.packager("publish", self.out / "bundles" / f"digits-{version}.bundle", "--repo", self.out / "repo",
                      "--broker", self.broker.url)

    def rollout(self, name: str, version: int, ok: tuple[int, ...]) -> None:
        assert self.broker is not None
        self.packager("rollout", "start", name, "--version", str(version), "--group", GROUP, "--waves",
                      ",".join(f"{w:g}" for w in WAVES), "--soak", SOAK, "--gate", GATES, "--min-requests",
                      str(MIN_REQUESTS), "--repo", self.out / "repo", "--broker", self.broker.url, ok=ok)
        args = ["rollout", "status", name, "--repo", str(self.out / "repo"), "--json"]
        print(f"\n$ packager {shlex.join(args)}   (the gates' last verdicts, from its JSON)", flush=True)
        _, text = self.children.run([BIN / "packager", *args], echo=False, env=CHILD_ENV)
        doc = json.loads(text)
        figures = doc.get("figures") or {}
        for v in figures.get("verdicts") or []:
            print(f"  {v['outcome']:>7}  {v['gate']:<24} {v['reason']}")
        print(f"  {doc['status']}: {doc['reason']}", flush=True)

    def show_one_request(self) -> None:
        import numpy as np

        with np.load(self.out / "eval.npz", allow_pickle=False) as data:
            x, label = data["x"][0].astype(np.float32), int(data["y"][0])
        d = self.devices[0]
        url = f"http://127.0.0.1:{d.port}/v2/models/digits/infer"
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, *x.shape], "data": x.ravel().tolist()}]}
        print(f"\n$ curl -s {url} -d '{{\"inputs\": [{{\"name\": \"x\", \"datatype\": \"FP32\", \"shape\": "
              f"[1, 1, 8, 8], \"data\": [...64 pixels...]}}]}}'", flush=True)
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type":
                                                                                   "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.loads(r.read())
        scores = answer["outputs"][0]["data"]
        digit = max(range(len(scores)), key=scores.__getitem__)
        print(json.dumps({k: v for k, v in answer.items() if k != "outputs"})[:-1]
              + f', "outputs": [{{"name": "{answer["outputs"][0]["name"]}", ... 10 scores ...}}]}}')
        say(f"{d.device_id} says {digit}; the image is a {label}")
        fb = f"http://127.0.0.1:{d.port}/v2/models/digits/feedback"
        print(f"\n$ curl -s {fb} -d '{{\"id\": \"{answer['id']}\", \"label\": {label}}}'", flush=True)
        req = urllib.request.Request(fb, data=json.dumps({"id": answer["id"], "label": label}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            print(r.read().decode(), flush=True)

    def wait_http(self, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if "dashboard" not in self.children.running:
                raise StepFailed(f"the dashboard exited; see {self.out / 'dashboard.log'}")
            time.sleep(0.2)
        raise StepFailed(f"the dashboard did not answer on {url} within {timeout:g}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--live", action="store_true",
                        help="keep the fleet, its traffic and the dashboard running after the story until Ctrl-C")
    args = parser.parse_args(argv)
    out: Path = args.out
    for stale in ("bundles", "repo", "repo-root-keys", "broker", "v2", "v3", *DEVICES):
        shutil.rmtree(out / stale, ignore_errors=True)  # a rerun starts from a clean fleet
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out, args.live)
    with stop_signals_raise():
        try:
            demo.story()
            return 0
        except Interrupted as e:
            print(f"\ndemo: {e} received, stopping", file=sys.stderr, flush=True)
            return 0 if demo.told else EXIT_INTERRUPTED
        except (StepFailed, MosquittoMissing, RuntimeError) as e:  # RuntimeError: mosquitto did not start
            print(f"demo: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            demo.close()


if __name__ == "__main__":
    sys.exit(main())
