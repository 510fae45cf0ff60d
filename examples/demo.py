"""The end-to-end demo behind `make demo`: train, build, sign, publish over MQTT, fetch as a device, then run two
real device agents that deploy the bundle, serve inference and report telemetry, and show the fleet.

Every step runs the real command line a user would type (printed before it runs), against a throwaway mosquitto
on a free port (with a WebSockets listener for the dashboard), so the demo never touches a broker already on the
machine.

    python -m examples.demo [--out out/demo] [--live]

`--live` (`make demo-live`) keeps the broker and the agents running and serves the fleet dashboard until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from examples.local_broker import Mosquitto, free_port

BIN = Path(sys.executable).parent


def run(*args: object) -> str:
    cmd = [str(a) for a in args]
    shown = [Path(cmd[0]).name, *cmd[1:]] if cmd[0].startswith(str(BIN)) else cmd
    print(f"\n$ {shlex.join(shown)}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo: step failed with exit status {proc.returncode}: {shlex.join(shown)}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--live", action="store_true",
                        help="keep the broker and agents running and serve the dashboard until Ctrl-C")
    args = parser.parse_args(argv)
    out: Path = args.out
    for stale in ("bundles", "repo", "repo-root-keys", "device", "mirror", "broker"):
        shutil.rmtree(out / stale, ignore_errors=True)  # a rerun starts from a clean fleet
    out.mkdir(parents=True, exist_ok=True)

    run(BIN / "python", "-m", "examples.digits.train", "--out", out)
    run(BIN / "packager", "build", out / "digits.pt2", "--calib", out / "calib.npz", "--eval", out / "eval.npz",
        "--out", out / "bundles")
    bundle = out / "bundles" / "digits-1.bundle"
    run(BIN / "packager", "inspect", bundle)

    (out / "broker").mkdir()
    ws_port = free_port()  # mosquitto 2.0.11 needs an ordinary listener beside the websockets one (dashboard.md)
    broker = Mosquitto(out / "broker", extra_conf=f"listener {ws_port} 127.0.0.1\nprotocol websockets\n")
    broker.start()
    agents: list[subprocess.Popen[bytes]] = []
    try:
        run(BIN / "packager", "keys", "init", "--repo", out / "repo")
        run(BIN / "packager", "publish", bundle, "--repo", out / "repo", "--broker", broker.url, "--group", "lab",
            "--http-dir", out / "mirror")
        config = out / "device" / "agent.toml"
        config.parent.mkdir(parents=True)
        config.write_text(
            '[agent]\ndevice_id = "demo-pi-1"\ngroup = "lab"\nstate_dir = "state"\n'
            f'[mqtt]\nurl = "{broker.url}"\n'
            f'[trust]\nroot = "{(out / "repo" / "root.json").resolve()}"\n'
        )
        fetched = json.loads(run(BIN / "edge-agent", "fetch", "--config", config, "--json"))
        print(f"\ndemo: the device verified {fetched['name']} v{fetched['version']} ({fetched['sha256'][:12]}) "
              f"at {fetched['path']}; the build report is {out / 'bundles' / 'digits-1.report.html'}")

        ports = [start_agent(out, broker.url, f"demo-pi-{i}", agents) for i in (2, 3)]
        for port in ports:
            wait_serving(port)
        answers = [infer(port, out / "eval.npz") for port in ports]
        print(f"\ndemo: two agents (`edge-agent run`) deployed the bundle and answered {sum(answers)} inference "
              "requests over HTTP (OIP v2)", flush=True)
        time.sleep(3.0)  # a few telemetry messages (interval 1 s)
        run(BIN / "packager", "fleet", "status", "--broker", broker.url, "--wait", "5")
        dashboard = [BIN / "packager", "dashboard", "--broker-ws", f"ws://127.0.0.1:{ws_port}"]
        if args.live:
            print(f"\n$ {shlex.join(str(a) if i else 'packager' for i, a in enumerate(dashboard))}\n"
                  "demo: the fleet is live; open the address below in a browser. Ctrl-C ends the demo.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                subprocess.run([str(a) for a in dashboard], check=False)
        else:
            print("\ndemo: `make demo-live` keeps this fleet running and serves its dashboard in the browser")
    finally:
        for proc in agents:
            proc.terminate()
        for proc in agents:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
    return 0


def start_agent(out: Path, broker_url: str, device_id: str, agents: list[subprocess.Popen[bytes]]) -> int:
    """A real `edge-agent run` for `device_id` in out/<device_id>/, logging there; returns its HTTP port."""
    home = out / device_id
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    port = free_port()
    config = home / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "{device_id}"\ngroup = "lab"\nstate_dir = "state"\n'
        f'[mqtt]\nurl = "{broker_url}"\n'
        f'[trust]\nroot = "{(out / "repo" / "root.json").resolve()}"\n'
        f'[serve]\nhttp = "127.0.0.1:{port}"\n'
        "[deploy]\nprobation_s = 5.0\n"
        "[telemetry]\ninterval_s = 1.0\n"
    )
    print(f"\n$ edge-agent run --config {config}   (in the background; log: {home / 'agent.log'})", flush=True)
    log = (home / "agent.log").open("ab")
    agents.append(subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(config)], stdout=log,
                                   stderr=log))
    return port


def wait_serving(port: int, timeout: float = 120.0) -> None:
    """Until the agent's model is ready (it deploys, stages and swaps the bundle first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"demo: the agent on port {port} did not serve a model within {timeout:g}s")


def infer(port: int, eval_npz: Path, rows: int = 300) -> int:
    """Send `rows` eval images one by one to the agent's OIP v2 endpoint; returns how many were answered (more than
    [telemetry] drift_min_samples, so the fleet view shows a drift figure rather than "unknown")."""
    with np.load(eval_npz) as data:
        x = data["x"][:rows].astype(np.float32)
    answered = 0
    for row in x:
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, *row.shape],
                                       "data": row.ravel().tolist()}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/digits/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            answered += r.status == 200
    return answered


if __name__ == "__main__":
    sys.exit(main())
