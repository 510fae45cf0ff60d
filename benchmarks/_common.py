"""Shared by the scripts in `benchmarks/`: what machine a benchmark ran on (recorded in every results JSON) and
how a target is judged and printed.

Import it as `benchmarks._common` after putting the repository root on `sys.path` (the scripts do that first).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Flags that decide which int8 kernels the runtimes can use (x86: /proc/cpuinfo "flags"; arm: "Features").
INT8_FLAGS = ("sse4_1", "ssse3", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx_vnni_int8", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve",
              "sve2", "bf16")
DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
RUNTIME_DISTS = ("onnxruntime", "ai-edge-litert", "torch", "litert-torch", "onnx", "numpy")


def machine_info(isa_flags: Sequence[str] = INT8_FLAGS, dists: Sequence[str] = RUNTIME_DISTS) -> dict[str, Any]:
    """CPU model, cores, which of `isa_flags` the CPU has, and the versions of `dists`, from /proc/cpuinfo and
    package metadata. The defaults are the int8-relevant flags and the inference runtimes."""
    fields: dict[str, str] = {}
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            key = key.strip()
            if not sep:
                if fields:  # first processor block is enough
                    break
                continue
            if key in ("flags", "Features") and not flags:
                flags = value.split()
            elif key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    present = set(flags)
    versions: dict[str, str | None] = {}
    for dist in dists:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    dot = [f for f in DOT_PRODUCT_FLAGS if f in present]
    return {
        "cpu": fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id") or fields.get("CPU implementer"),
        "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model") or fields.get("CPU part"),
        "stepping": fields.get("stepping"), "virtualized": "hypervisor" in present,
        "machine": platform.machine(), "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa_flags": [f for f in isa_flags if f in present],
        "int8_dot_product": dot,
        "int8_summary": (f"int8 dot-product instructions present ({', '.join(dot)})" if dot
                         else "no int8 dot-product instructions (no VNNI / AMX / asimddp / i8mm)"),
        "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


@dataclass(frozen=True)
class Target:
    """One measured figure against its limit; a benchmark prints PASS/MISS lines and writes `to_json()`."""

    id: str
    description: str
    measured: float
    limit: float
    op: str  # "<=" or ">="
    unit: str
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.measured <= self.limit if self.op == "<=" else self.measured >= self.limit

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "description": self.description, "measured": self.measured, "op": self.op,
                "limit": self.limit, "unit": self.unit, "pass": self.passed, "note": self.note}

    def line(self) -> str:
        verdict = "PASS" if self.passed else "MISS"
        note = f"  -- {self.note}" if self.note and not self.passed else ""
        unit = self.unit if self.unit in ("", "x") else f" {self.unit}"
        return (f"{verdict}  {self.id:<34} {self.description}: measured {fmt(self.measured)}{unit}, "
                f"target {self.op} {fmt(self.limit)}{unit}{note}")


def fmt(v: float) -> str:
    if v != v:  # NaN: the figure could not be measured
        return "n/a"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


REPO = Path(__file__).resolve().parents[1]


def mosquitto_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"mosquitto version (\S+)", out)
    return m.group(1) if m else None


def code_state() -> dict[str, Any]:
    """The commit measured, and which files of the measured code paths differed from it (uncommitted work)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.rstrip("\n") if out.returncode == 0 else None  # keep porcelain's leading columns

    status = git("status", "--porcelain", "--", "agent", "packager", "examples")
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": [line[3:] for line in status.splitlines()] if status else []}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# BENCHMARK-ONLY DEFAULT: the packager's keys are encrypted at rest (packager/keystore.py); the throwaway
# repositories the benchmarks make, in process or in their packager children, use this passphrase unless one is set.
BENCH_KEY_PASSPHRASE = "edgeship-benchmark-passphrase"
os.environ.setdefault("EDGESHIP_KEY_PASSPHRASE", BENCH_KEY_PASSPHRASE)


def init_fleet_repo(repo: Path, root: Path) -> None:
    """A fresh TUF repository at `repo`, and the root.json a device is provisioned with copied to `root`."""
    from packager import tuf_repo

    tuf_repo.init_repo(repo)
    root.write_bytes(tuf_repo.provisioning_root(repo).read_bytes())
