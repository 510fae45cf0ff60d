"""Golden parity on a schedule, through the serving model's own session (not a fresh one, as at STAGE): it catches
a model that changed under the running process (a flipped bit in memory or on disk, a runtime gone wrong).

The check reads the golden rows from the extracted release directory, runs them in one batch (as STAGE does) and
compares with the manifest's parity rule (agent.deploy.stage.parity_check). It never raises: any failure is
`parity_ok: False` with the reason in `parity_detail`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bundle import read_golden_rows
from agent.deploy.stage import parity_check

if TYPE_CHECKING:
    from agent.serve.holder import LoadedModel

log = logging.getLogger(__name__)

ALL_ROWS = 1 << 31  # read_golden_rows slices [:rows]: the whole golden set


def unknown_parity() -> dict[str, Any]:
    """What a device reports before its first scheduled check."""
    return {"parity_ok": None, "parity_score": None, "parity_checked_at": None, "parity_detail": None}


class ParitySchedule:
    """Decides when the next check is due (every `interval_s` by `clock`, the first one at once) and runs it."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s, self._clock = interval_s, clock
        self._lock = threading.Lock()
        self._last_at: float | None = None
        self._last: dict[str, Any] = unknown_parity()

    def due(self) -> bool:
        with self._lock:
            return self._last_at is None or self._clock() - self._last_at >= self.interval_s

    @property
    def last(self) -> dict[str, Any]:
        """The latest check's result (unknown_parity() before the first)."""
        with self._lock:
            return dict(self._last)

    def reset(self) -> None:
        """Forget the last result and make a check due now (a new model is serving)."""
        with self._lock:
            self._last_at, self._last = None, unknown_parity()

    def check(self, model: LoadedModel, release: Path, fmt: str) -> dict[str, Any]:
        """Run the golden rows of `release` through `model`'s session and compare with `fmt`'s expected outputs.

        Returns parity_ok (bool), parity_score (the rule's value: agreement, cosine or max abs error; None when
        nothing could be compared), parity_checked_at (the clock's time) and parity_detail (why, in words).
        """
        at = self._clock()
        ok, score, detail = self._run(model, release, fmt)
        if ok:
            log.debug("parity %s v%s: %s", model.name, model.version, detail)
        else:
            log.warning("scheduled parity check of %s v%s failed: %s", model.name, model.version, detail)
        result = {"parity_ok": ok, "parity_score": score, "parity_checked_at": at, "parity_detail": detail}
        with self._lock:
            self._last_at, self._last = at, dict(result)
        return result

    @staticmethod
    def _run(model: LoadedModel, release: Path, fmt: str) -> tuple[bool, float | None, str]:
        try:
            manifest = model.manifest
            if manifest is None:
                return False, None, "the serving model has no manifest to check parity with"
            inputs, expected = read_golden_rows(release, manifest, fmt, ALL_ROWS)
            if not expected:
                return False, None, f"the golden set has no expected {fmt} outputs"
            got = model.session.run(inputs)
            result = parity_check(manifest.parity, expected, got)
        except Exception as e:  # the runtimes raise their own types; a scheduled check must never take serving down
            return False, None, f"{type(e).__name__}: {e}"
        score = None if math.isnan(result.value) else float(result.value)
        return bool(result.passed), score, result.detail
