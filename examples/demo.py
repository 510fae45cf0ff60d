"""The end-to-end demo behind `make demo`: train, build, sign, publish over MQTT, and fetch as a device.

Every step runs the real command line a user would type (printed before it runs), against a throwaway mosquitto
on a free port, so the demo never touches a broker already on the machine.

    python -m examples.demo [--out out/demo]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from examples.local_broker import Mosquitto

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
    broker = Mosquitto(out / "broker")
    broker.start()
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
    finally:
        broker.stop()
    print(f"\ndemo: the device verified {fetched['name']} v{fetched['version']} ({fetched['sha256'][:12]}) "
          f"at {fetched['path']}; the build report is {out / 'bundles' / 'digits-1.report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
