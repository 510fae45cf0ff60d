"""Run fuzz harnesses for a number of executions each and write the figures as JSON (docs/benchmarks.md, Fuzzing).

    python benchmarks/fuzz_bench.py [--runs 1000000] [--max-time S] [--out benchmarks/results/fuzz.json] [NAME ...]

Each harness (tests/fuzz/fuzz_<NAME>.py) runs in its own `python -m tests.fuzz.runner NAME` process, one after the
other, with libFuzzer's `-runs` (and `-max_total_time` when --max-time is given: a harness too slow for --runs
stops there and its real count is recorded), `-timeout=10` (an input running longer is a hang: a failure) and its
corpus directory tests/fuzz/corpus/<NAME>/ (new inputs are added to it). The figures are libFuzzer's own final
stats (`-print_final_stats=1`): executions, wall seconds, exec/s, peak RSS. A crash, a hang or a harness invariant
broken fails the run (libFuzzer exits non-zero and writes the input into the corpus directory as crash-*/timeout-*,
which the corpus replay in make test then fails on until it is fixed) and is recorded as such. The figures of the
harnesses run are merged into the existing JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fuzz.runner import CORPUS, HARNESSES  # noqa: E402

_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)


def run_one(name: str, runs: int, max_time: int | None, log_dir: Path) -> dict[str, object]:
    corpus = CORPUS / name
    corpus.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tests.fuzz.runner", name, str(corpus), f"-runs={runs}", "-timeout=10",
           "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={corpus}/"]
    if max_time is not None:
        cmd.append(f"-max_total_time={max_time}")
    before = len(list(corpus.iterdir()))
    log = log_dir / f"fuzz-{name}.log"
    start = time.monotonic()
    with log.open("w") as out:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    text = log.read_text(errors="replace")
    stats = {k: int(v) for k, v in _STAT.findall(text)}
    execs = stats.get("number_of_executed_units", 0)
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "exit_code": rc,
        "clean": rc == 0,
        "executions": execs,
        "seconds": round(wall, 1),
        "exec_per_s": round(execs / wall, 1) if wall else None,
        "target_met": rc == 0 and execs >= 1_000_000,
        "peak_rss_mb": stats.get("peak_rss_mb"),
        "corpus_files_before": before,
        "corpus_files_after": len(list(corpus.iterdir())),
        "log": str(log),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", choices=[[], *HARNESSES], default=[], metavar="NAME")
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--max-time", type=int, default=None, help="seconds per harness at most")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fuzz.json")
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    args = ap.parse_args()
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc["machine"] = {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                      "note": "shared with other engineers' test runs while measured; run under nice -n 10"}
    results = doc.setdefault("harnesses", {})
    for name in args.names or HARNESSES:
        print(f"{name}: fuzzing ({args.runs} runs" + (f", at most {args.max_time} s)" if args.max_time else ")"),
              flush=True)
        results[name] = run_one(name, args.runs, args.max_time, args.log_dir)
        r = results[name]
        print(f"{name}: {r['executions']} executions in {r['seconds']} s ({r['exec_per_s']}/s), "
              f"exit {r['exit_code']}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
