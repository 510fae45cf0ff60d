"""The dashboard in a real Chromium (Debian's /usr/bin/chromium through Playwright, no browser download) against a
real mosquitto with an ordinary and a websockets listener on loopback, and real agents (`edge-agent run`, the
tests/e2e helpers) on one fleet: both devices appear with their versions; publishing v2 shows its transitions
live; a real drift alarm shows; a SIGKILLed agent turns offline through its last will. A screenshot of the page is
saved to out/dashboard.png (docs/dashboard.png is a copy of one). A second test publishes bursts of 1,000 devices'
telemetry (a synthetic publisher) and reads how long the page took to draw each burst, measured in the browser
(window.__edgeshipDrawMs).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from examples.local_broker import Mosquitto, free_port
from packager.dashboard.server import DashboardServer, make_server

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "out" / "dashboard.png"  # copied to docs/dashboard.png by hand: tests do not edit docs
TIMEOUT_MS = 90_000
BURST_DEVICES = 1000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run installs it)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")


class WsBroker:
    """A mosquitto with an ordinary listener (mosquitto 2.0.11 will not start with a websockets listener alone)
    and a websockets listener, both on 127.0.0.1."""

    def __init__(self, make: Callable[..., Mosquitto]) -> None:
        self.ws_port = free_port()
        self.broker = make(extra_conf=f"listener {self.ws_port} 127.0.0.1\nprotocol websockets\n")

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"


@pytest.fixture
def ws_broker(mosquitto_factory: Callable[..., Mosquitto]) -> WsBroker:
    return WsBroker(mosquitto_factory)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions"])
        yield b
        b.close()


@pytest.fixture
def dashboard() -> Iterator[Callable[[WsBroker, str], DashboardServer]]:
    servers: list[DashboardServer] = []

    def make(broker: WsBroker, fleet: str) -> DashboardServer:
        srv = make_server("127.0.0.1:0", broker.ws_url, fleet)
        srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors
    page.goto(url)
    wait_page(page, "() => document.getElementById('conn').dataset.state === 'connected'", None,
              "a connection to the broker", 20_000)
    return page


def wait_page(page: Any, expression: str, arg: Any, what: str, timeout_ms: int = TIMEOUT_MS) -> None:
    """Poll `expression` (a JS function of `arg`) in the page until it is truthy. Polled from here with evaluate:
    Playwright's own wait_for_function compiles its predicate with eval, which the page's CSP forbids."""
    deadline = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(expression, arg):
        if time.monotonic() > deadline:
            pytest.fail(f"the page did not show {what} within {timeout_ms / 1000:g}s; it shows:\n"
                        f"{page.inner_text('main')}\npage errors: {page.errors}")
        time.sleep(0.1)


CELL = "(([d, k]) => document.querySelector(`tr[data-device='${d}'] td[data-key='${k}']`)?.textContent ?? null)"


def cell_is(page: Any, device: str, key: str, value: str, what: str) -> None:
    wait_page(page, f"([d, k, v]) => {CELL}([d, k]) === v", [device, key, value], what)


# --- real agents on one fleet ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    from examples.digits.train import train_digits
    from packager.build import BuildOptions, Progress, build

    tmp = tmp_path_factory.mktemp("dashboard-bundles")
    paths = train_digits(tmp / "digits", epochs=2)

    def make(version: int) -> Path:
        opts = BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                            out_dir=tmp / "out", name="digits", version=version, formats=("onnx",), latency_runs=20)
        return build(opts, Progress(0, enabled=False)).bundle

    with np.load(paths["eval"], allow_pickle=False) as z:
        x = z["x"][:16].astype(np.float32)
    return make(1), make(2), x


TELEMETRY_CONF = "[telemetry]\ninterval_s = 0.5\ndrift_window = 50\ndrift_min_samples = 20\n"


@pytest.fixture
def two_agents(ws_broker: WsBroker, tmp_path: Path) -> Iterator[list[Any]]:
    """Two devices (tests/e2e Device) in one fleet and group, sharing the first one's TUF repository."""
    from tests.e2e.test_daemon import Device

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Device(tmp_path / "a", ws_broker.broker)
    b = Device(tmp_path / "b", ws_broker.broker)
    new_id = f"{a.id}-b"
    conf = b.config.read_text().replace(f'device_id = "{b.id}"', f'device_id = "{new_id}"')
    b.config.write_text(conf.replace(f'fleet = "{b.fleet}"', f'fleet = "{a.fleet}"'))
    shutil.copyfile(tmp_path / "a" / "provisioned-root.json", tmp_path / "b" / "provisioned-root.json")
    b.id, b.fleet, b.topics, b.repo = new_id, a.fleet, a.topics, a.repo
    for dev in (a, b):
        with dev.config.open("a") as f:
            f.write(TELEMETRY_CONF)
    yield [a, b]
    for dev in (a, b):
        dev.close()


def test_fleet_live_from_real_agents(ws_broker: WsBroker, two_agents: list[Any], browser: Any,
                                     dashboard: Callable[[WsBroker, str], DashboardServer],
                                     digits: tuple[Path, Path, np.ndarray]) -> None:
    a, b = two_agents
    v1, v2, x = digits
    srv = dashboard(ws_broker, a.fleet)
    page = open_page(browser, srv.url)

    # 1. both devices appear with the version they serve
    for dev in (a, b):
        dev.start()
    a.publish(v1)
    for dev in (a, b):
        dev.commit_with_requests(x, 1, first=True)
    for dev in (a, b):
        cell_is(page, dev.id, "version", "digits v1", f"{dev.id} serving v1")
        cell_is(page, dev.id, "online", "online", f"{dev.id} online")
    wait_page(page, "() => document.querySelector('#versions li[data-version=\"1\"]')?.dataset.devices === '2'",
              None, "two devices on v1 in the versions list")

    # 2. v2's transitions show live: every state cell value the page displayed for device a is recorded
    page.evaluate("""(d) => {
        window.__seen = [];
        const td = () => document.querySelector(`tr[data-device='${d}'] td[data-key='state']`);
        new MutationObserver(() => window.__seen.push(td().textContent))
            .observe(td(), {childList: true, characterData: true, subtree: true});
    }""", a.id)
    a.publish(v2)
    for dev in (a, b):
        dev.commit_with_requests(x, 2)
    for dev in (a, b):
        cell_is(page, dev.id, "version", "digits v2", f"{dev.id} serving v2")
    seen = page.evaluate("window.__seen")
    assert "probation" in seen and seen[-1] in ("idle", "check"), seen
    assert seen.index("probation") > 0  # it moved through earlier states first (download, stage, ...)
    page.goto(f"{srv.url}#/device/{a.id}")
    wait_page(page, """() => [...document.querySelectorAll('#timeline li')].some(
                         (li) => li.dataset.to === 'probation' && li.dataset.version === '2')
                     && [...document.querySelectorAll('#timeline li')].some(
                         (li) => li.dataset.from === 'probation' && li.dataset.to === 'commit')""",
              None, "v2's transitions in device a's event timeline")
    wait_page(page, "() => document.querySelectorAll('#charts .uplot').length === 6", None, "the device's charts")
    page.screenshot(path=str(a.tmp / "device.png"), full_page=True)
    page.goto(f"{srv.url}#/")

    # 3. a real drift alarm: one input over and over fills a single reference bin
    conn = a.http()
    try:
        from tests.e2e.test_daemon import post_infer

        for _ in range(60):
            assert post_infer(conn, x[3][None])[0] == 200
    finally:
        conn.close()
    wait_page(page, "(d) => document.querySelector(`tr[data-device='${d}']`)?.dataset.alarms.includes('drift')",
              a.id, "device a's drift alarm")
    assert "alarm" in page.inner_text(f"tr[data-device='{a.id}'] td[data-key='drift_psi']")

    # 4. a killed agent turns offline through its last will
    b.kill()
    cell_is(page, b.id, "online", "OFFLINE", "device b offline after SIGKILL (the broker's last will)")
    assert page.get_attribute(f"tr[data-device='{b.id}']", "class") is not None
    assert "offline" in (page.get_attribute(f"tr[data-device='{b.id}']", "class") or "")

    # 5. sorting and filtering
    page.click("#fleet-table th[data-key='online']")
    page.fill("#filter", "offline")
    wait_page(page, "(d) => [...document.querySelectorAll('#rows tr')].map((tr) => tr.dataset.device).join() === d",
              b.id, "the filter keeping only the offline device")
    page.fill("#filter", "")
    wait_page(page, "() => document.querySelectorAll('#rows tr').length === 2", None, "both rows again")

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert not [e for e in page.errors if "favicon" not in e], page.errors
    page.close()


# --- 1,000 devices ---------------------------------------------------------------------------------------------


def _telemetry(device: str, seq: int, ts: float, rng: np.random.Generator) -> bytes:
    p95 = float(rng.uniform(2, 30))
    return json.dumps({
        "schema": 1, "device": device, "name": "digits", "version": 3 if device.endswith("7") else 2, "ts": ts,
        "seq": seq, "requests_total": seq * 10, "errors_total": 0, "rejected_total": 0, "error_rate": 0.0,
        "latency_ms_p50": p95 / 2, "latency_ms_p95": p95, "latency_ms_p99": p95 * 1.2,
        "throughput_rps": 10.0, "accuracy": None, "drift_psi": float(rng.uniform(0, 0.3)),
        "drift_status": "ok", "parity_ok": True, "cpu_percent": float(rng.uniform(0, 100)),
        "agent_cpu_percent": 3.0, "rss_bytes": 80 << 20, "mem_available_bytes": 1 << 30, "temp_celsius": 48.5,
        "queue_messages": 0, "telemetry_dropped_total": 0, "events_dropped_total": 0,
    }).encode()


def test_a_burst_of_1000_devices_is_drawn_within_a_second(ws_broker: WsBroker, browser: Any,
                                                          dashboard: Callable[[WsBroker, str], DashboardServer]
                                                          ) -> None:
    fleet = "synthetic"
    srv = dashboard(ws_broker, fleet)
    page = open_page(browser, srv.url)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="synthetic-fleet")
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", ws_broker.broker.port)
    pub.loop_start()
    rng = np.random.default_rng(0)
    devices = [f"sim-{i:04d}" for i in range(BURST_DEVICES)]
    try:
        now = time.time()
        for d in devices:
            pub.publish(f"edgeship/{fleet}/devices/{d}/state", json.dumps({
                "status": "online", "device": d, "group": "sim", "state": "idle", "at": now,
                "bundle": {"name": "digits", "version": 2, "format": "onnx"}}), qos=1, retain=True)
        wait_page(page, "(n) => document.querySelectorAll('#rows tr').length === n", BURST_DEVICES,
                  "1,000 rows")
        figures = []
        for burst in range(1, 4):
            page.evaluate("window.__edgeshipResetDrawStats()")
            ts = time.time()
            infos = [pub.publish(f"edgeship/{fleet}/devices/{d}/telemetry", _telemetry(d, burst, ts, rng), qos=0)
                     for d in devices]
            for info in infos:
                info.wait_for_publish(timeout=30)
            wait_page(page, "(n) => { const s = window.__edgeshipDrawStats(); return s.telemetry === n && "
                            "s.pending === 0 && window.__edgeshipDrawMs !== null; }", BURST_DEVICES,
                      f"burst {burst} drawn")
            stats = page.evaluate("window.__edgeshipDrawStats()")
            figures.append(stats["maxBurstMs"])
            print(f"burst {burst}: {BURST_DEVICES} telemetry messages drawn in {stats['maxBurstMs']:.0f} ms "
                  f"(longest frame {stats['maxFrameMs']:.0f} ms, {stats['frames']} frames, arrivals over "
                  f"{stats['lastArrival'] - stats['burstStart']:.0f} ms)")
            time.sleep(1.0)  # every device reports every second
        cell_is(page, "sim-0007", "version", "digits v2", "the state's version, not telemetry's")
        assert all(f < 1000 for f in figures), figures
        assert page.inner_text("#counts").startswith("1000 devices")
    finally:
        pub.loop_stop()
        pub.disconnect()
    page.close()
