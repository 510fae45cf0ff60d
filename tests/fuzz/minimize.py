"""Shrinks each harness's corpus to the inputs that keep its coverage (libFuzzer `-merge=1`), in place:
`python -m tests.fuzz.minimize [NAME ...]` (Makefile `fuzz-minimize`).

`seed-*` (make_corpus.py) and `crash-*`/`timeout-*` (regressions) are always kept; every other file (the fuzzer's
finds, named by their sha1) is replaced by the merged set, which is what is committed.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.fuzz.runner import CORPUS, HARNESSES

KEEP = ("seed-", "crash-", "timeout-")


def minimize(name: str) -> tuple[int, int]:
    corpus = CORPUS / name
    before = [p for p in corpus.iterdir() if p.is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged"
        merged.mkdir()
        # the kept files go in first, so the merge adds only what they do not already cover
        for p in before:
            if p.name.startswith(KEEP):
                shutil.copy(p, merged / p.name)
        subprocess.run([sys.executable, "-m", "tests.fuzz.runner", name, "-merge=1", "-timeout=10", str(merged),
                        str(corpus)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for p in before:
            if not p.name.startswith(KEEP):
                p.unlink()
        kept = {hashlib.sha1(p.read_bytes()).hexdigest() for p in corpus.iterdir()}
        for p in merged.iterdir():
            if not p.name.startswith(KEEP) and hashlib.sha1(p.read_bytes()).hexdigest() not in kept:
                shutil.copy(p, corpus / p.name)
    return len(before), len(list(corpus.iterdir()))


def main() -> None:
    for name in sys.argv[1:] or HARNESSES:
        before, after = minimize(name)
        size = sum(p.stat().st_size for p in (CORPUS / name).iterdir())
        print(f"{name}: {before} -> {after} files, {size} bytes")


if __name__ == "__main__":
    main()
