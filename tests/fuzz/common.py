"""What the harnesses share: a scratch directory (tmpfs where there is one: the bundle and TUF harnesses write files
on every input) and the defect exception a harness raises when an input was accepted that must not have been."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


class Accepted(AssertionError):
    """The code under test accepted an input that breaks one of the harness's invariants: a real defect."""


def check(cond: bool, message: str) -> None:
    if not cond:
        raise Accepted(message)


def scratch(prefix: str) -> Path:
    """A private directory for one harness process, on /dev/shm when it exists (faster than disk, no fsync cost)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=f"edgeship-fuzz-{prefix}-", dir=base))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
