"""The demo's devices, seen from outside: each a real `edge-agent run` with its own config and state directory,
reached only through its public HTTP API (Open Inference Protocol v2 and the labelled-feedback endpoint).

`Traffic` plays the users: it sends the evaluation images to every agent, one request at a time, and then tells the
agent the true label of each answer (POST /v2/models/<name>/feedback), as an application that learns the right
answer later would. The agents turn that into the `accuracy` figure of their telemetry, which a rollout gate reads.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.deploy.rollout import bucket

GROUP = "lab"
# Three devices, one in each wave of WAVES (a device is in a wave when its bucket, a hash of group and id, is below
# the wave's percentage: docs/rollouts.md); tests/unit/test_examples.py checks that they still split that way.
DEVICES = ("pi-hall", "pi-den", "pi-kitchen")
WAVES = (34.0, 67.0, 100.0)


def wave_of(device_id: str, group: str = GROUP, waves: tuple[float, ...] = WAVES) -> int:
    """The first wave (1-based) that holds `device_id`."""
    b = bucket(device_id, group)
    return next(i for i, w in enumerate(waves, 1) if b < w)


def agent_config(device_id: str, *, broker_url: str, root: Path, http_port: int) -> str:
    """A device's agent.toml: short probation and telemetry intervals so the story moves in seconds, not the
    defaults' minutes. Checks for a new deployment follow the broker's `notify` pokes (every publish and every
    signed wave sends one); the 30 s timer is only the fallback, and each check is a short-lived worker process."""
    return (f'[agent]\ndevice_id = "{device_id}"\ngroup = "{GROUP}"\nstate_dir = "state"\n'
            f'[mqtt]\nurl = "{broker_url}"\n'
            f'[trust]\nroot = "{root}"\n'
            f'[serve]\nhttp = "127.0.0.1:{http_port}"\n'
            "[deploy]\npoll_interval_s = 30.0\nprobation_s = 3.0\n"
            "[telemetry]\ninterval_s = 1.0\nparity_interval_s = 2.0\n")


def _get_json(url: str, timeout: float = 2.0) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read()) if r.status == 200 else None
    except (OSError, ValueError):  # not up yet, no model yet (503), or a half-written answer
        return None


def served_version(port: int, model: str = "digits") -> int | None:
    """The version the agent on `port` serves now (its OIP model metadata), None without a model."""
    meta = _get_json(f"http://127.0.0.1:{port}/v2/models/{model}")
    versions = meta.get("versions") if meta else None
    return int(versions[0]) if isinstance(versions, list) and versions else None


@dataclass
class Device:
    device_id: str
    port: int
    home: Path


@dataclass
class Traffic:
    """Inference requests with labelled feedback to every device, in a background thread, until `stop()`."""

    devices: list[Device]
    eval_npz: Path
    pause_s: float = 0.05  # between rounds: ~15 requests/s per device on a quiet machine
    answered: int = 0
    labelled: int = 0
    failed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        with np.load(self.eval_npz, allow_pickle=False) as data:
            self._x, self._y = data["x"].astype(np.float32), data["y"]
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _post(self, url: str, body: dict[str, object]) -> dict[str, object] | None:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type":
                                                                                    "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except (OSError, ValueError):  # 503 while a device has no model, refused while it starts or stops
            return None

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            for d in self.devices:
                row, label = self._x[i % len(self._x)], int(self._y[i % len(self._y)])
                i += 1
                base = f"http://127.0.0.1:{d.port}/v2/models/digits"
                answer = self._post(f"{base}/infer", {"inputs": [{"name": "x", "datatype": "FP32",
                                                                  "shape": [1, *row.shape],
                                                                  "data": row.ravel().tolist()}]})
                if answer is None or not isinstance(answer.get("id"), str):
                    self.failed += 1
                    continue
                self.answered += 1
                fed = self._post(f"{base}/feedback", {"id": answer["id"], "label": label})
                self.labelled += fed is not None and fed.get("result") == "accepted"
            self._stop.wait(self.pause_s)
