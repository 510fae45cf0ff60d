"""Encrypted bundles: how fast a bundle is encrypted (packager) and decrypted (device), and how much memory the
device's decryption takes (docs/benchmarks.md, "Confidential models").

    .venv/bin/python benchmarks/confidential_bench.py [--mb 256] [--out benchmarks/results/confidential.json]

Each step runs in a fresh child process (`agent/trust/confidential.py`'s `encrypt_file` / `decrypt_file`, the code
the packager and the fetch worker run) so that its peak RSS is its own; the parent never holds the file in memory
(a forked child starts with its parent's peak). Decryption includes the GCM tag check, the plaintext sha256 and the
fsync of the decrypted file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/confidential_bench.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks._common import machine_info  # noqa: E402 - needs REPO on sys.path


def _child(step: str, src: Path, dst: Path, key: bytes, sha: str, length: int) -> None:
    from agent.trust import confidential as fmt

    start = time.perf_counter()
    if step == "encrypt":
        with dst.open("wb") as f:
            fmt.encrypt_file(src, f, key)
    elif step == "decrypt":
        fmt.decrypt_file(src, dst, key, fmt.Plaintext(sha, length))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _run(step: str, src: Path, dst: Path, key: bytes, sha: str, length: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", step, str(src), str(dst), key.hex(), sha, str(length)],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    result: dict[str, float] = json.loads(out)
    if step != "import":
        result["mb_per_s"] = length / result["seconds"] / 1e6
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256, help="bundle size in MiB (default 256)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        step, src, dst, key, sha, length = args.child
        _child(step, Path(src), Path(dst), bytes.fromhex(key), sha, int(length))
        return 0
    length = args.mb << 20
    with tempfile.TemporaryDirectory(prefix="confidential-bench-") as tmp:
        plain, cipher, out = Path(tmp) / "plain.bundle", Path(tmp) / "cipher.bundle", Path(tmp) / "out.bundle"
        digest = hashlib.sha256()
        with plain.open("wb") as f:
            for _ in range(args.mb):
                block = os.urandom(1 << 20)
                digest.update(block)
                f.write(block)
        key = os.urandom(32)
        results = {
            "import": _run("import", plain, out, key, digest.hexdigest(), length),
            "encrypt": _run("encrypt", plain, cipher, key, digest.hexdigest(), length),
            "decrypt": _run("decrypt", cipher, out, key, digest.hexdigest(), length),
        }
        same = subprocess.run(["cmp", "-s", str(plain), str(out)], check=False).returncode == 0
    results["decrypt"]["rss_above_import_mib"] = results["decrypt"]["peak_rss_mib"] - results["import"]["peak_rss_mib"]
    print(f"bundle {args.mb} MiB; decrypted bundle identical: {same}")
    for step in ("encrypt", "decrypt"):
        r = results[step]
        print(f"{step:8} {r['mb_per_s']:7.0f} MB/s  {r['seconds']:6.2f} s  peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(import alone {results['import']['peak_rss_mib']:.0f} MiB)")
    if args.out:
        doc = {"mb": args.mb, "identical": same, "results": results, "machine": machine_info(dists=("cryptography",))}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
