"""`make demo` interrupted: the real demo (examples/demo.py) gets SIGINT once its whole fleet runs (the broker, three
agents with their fetch workers, the traffic, the dashboard) and leaves no process behind.

The whole story takes minutes, too long for the suite; this runs it up to the dashboard (training and one build:
well under a minute on a quiet machine) and stops there. The full run is measured by hand (README, "The two
commands").
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300.0


def _alive(pids: list[int]) -> list[int]:
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_ctrl_c_mid_demo_stops_every_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "examples.demo", "--out", str(tmp_path / "demo")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = b""
    try:
        deadline = time.monotonic() + TIMEOUT
        while b"the dashboard is on http" not in seen:
            assert proc.poll() is None, f"the demo exited with {proc.returncode}:\n{seen.decode(errors='replace')}"
            assert time.monotonic() < deadline, f"no dashboard within {TIMEOUT:g}s:\n{seen.decode()[-3000:]}"
            if select.select([proc.stdout], [], [], 0.5)[0]:
                seen += os.read(proc.stdout.fileno(), 65536)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        names = [" ".join(p.cmdline()[:3]) for p in descendants]
        # the broker, three agents and the dashboard at least (the agents' fetch workers come and go)
        assert sum("mosquitto" in n for n in names) == 1, names
        assert sum("edge-agent" in n for n in names) >= 3, names
        assert sum("dashboard" in n for n in names) == 1, names
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, output[-3000:]
    assert "SIGINT received, stopping" in output
    assert _alive([p.pid for p in descendants]) == [], names
