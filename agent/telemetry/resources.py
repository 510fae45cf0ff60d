"""The device's resources for the telemetry message (the one module that imports psutil).

`Resources(state_dir).sample()` returns flat Prometheus-style names with units (docs/telemetry.md):

    cpu_percent          all cores, 0..100, since the previous sample (the first: since the agent started)
    agent_cpu_percent    this process, share of ONE core (may exceed 100 on several cores), since the previous sample
    load1                1-minute load average
    mem_available_bytes  memory available to new work without swapping (MemAvailable)
    rss_bytes            this process's resident set
    disk_free_bytes      free bytes (for unprivileged users) on the state directory's file system
    temp_celsius         the hottest SoC thermal zone (cpu/soc/gpu/x86_pkg zones; None when the board exposes none)
    throttled_flags      Raspberry Pi firmware flags (get_throttled, an int bitmask; None elsewhere), and from it
    under_voltage_now, throttled_now   bit 0, and bits 1|2 (frequency capped or throttled) (None elsewhere)
    net_rx_bytes, net_tx_bytes   bytes received/sent on every interface but loopback since boot

Cheap on purpose (the idle agent samples every second within 1% of a core): no subprocess, no blocking cpu_percent,
the zone list is found once.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

THERMAL_ROOT = Path("/sys/class/thermal")
THROTTLED_PATH = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
# SoC zones: Raspberry Pi "cpu-thermal", Jetson "CPU-therm"/"GPU-therm"/"SOC0-therm", x86 "x86_pkg_temp". A PMIC's
# zone is left out: on Jetson it reads a constant 100 C.
_SOC_ZONE = re.compile(r"cpu|soc|gpu|x86_pkg", re.IGNORECASE)
_EXCLUDED_ZONE = re.compile(r"pmic", re.IGNORECASE)


def soc_zones(root: Path = THERMAL_ROOT) -> list[Path]:
    """The `temp` files of the SoC thermal zones under `root`."""
    zones: list[Path] = []
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text().strip()
        except OSError:
            continue
        if _SOC_ZONE.search(kind) and not _EXCLUDED_ZONE.search(kind) and (zone / "temp").exists():
            zones.append(zone / "temp")
    return zones


def read_temp_celsius(zones: list[Path]) -> float | None:
    """The hottest readable zone in degrees Celsius (sysfs gives millidegrees); None when none is readable."""
    best: float | None = None
    for path in zones:
        try:
            value = int(path.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        best = value if best is None else max(best, value)
    return best


def read_throttled(path: Path = THROTTLED_PATH) -> int | None:
    """The Raspberry Pi firmware's throttling flags (`0x50005`), or None where the file does not exist."""
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return None


class Resources:
    def __init__(self, state_dir: Path, *, thermal_root: Path = THERMAL_ROOT,
                 throttled_path: Path = THROTTLED_PATH) -> None:
        self.state_dir = state_dir
        self.throttled_path = throttled_path
        self._zones = soc_zones(thermal_root)
        self._has_throttled = throttled_path.exists()
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)  # starts the "since the previous call" windows
        self._process.cpu_percent(interval=None)

    def sample(self) -> dict[str, Any]:
        cpu = psutil.cpu_percent(interval=None)
        agent_cpu = self._process.cpu_percent(interval=None)
        try:
            disk_free: int | None = psutil.disk_usage(str(self.state_dir)).free
        except OSError:
            disk_free = None
        rx = tx = 0
        for nic, counters in psutil.net_io_counters(pernic=True).items():
            if nic != "lo":
                rx += counters.bytes_recv
                tx += counters.bytes_sent
        flags = read_throttled(self.throttled_path) if self._has_throttled else None
        return {
            "cpu_percent": cpu,
            "agent_cpu_percent": agent_cpu,
            "load1": os.getloadavg()[0],
            "mem_available_bytes": psutil.virtual_memory().available,
            "rss_bytes": self._process.memory_info().rss,
            "disk_free_bytes": disk_free,
            "temp_celsius": read_temp_celsius(self._zones) if self._zones else None,
            "throttled_flags": flags,
            "under_voltage_now": None if flags is None else bool(flags & 0x1),
            "throttled_now": None if flags is None else bool(flags & 0x6),
            "net_rx_bytes": rx,
            "net_tx_bytes": tx,
        }
