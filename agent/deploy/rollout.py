"""Staged rollouts, device side (pure): which wave a device is in, and which bundle a signed deployment document
names for it.

A deployment document may carry a `rollout` entry (docs/transport.md):

    "rollout": {"id": "r-digits-2-...", "wave": 2, "waves": [1, 10, 50, 100], "percent": 10.0,
                "previous": {"bundle": "bundles/digits-1.bundle", "name": "digits", "version": 1} | null,
                "state": "rolling" | "aborted" | "done", "reverted_by_controller": bool}

Membership is computed by each device from a hash of its id, so one signed document serves the whole group and a
device in an early wave stays in every later one (its bucket is fixed; the percentage only grows). The controller
(packager/rollout) imports `bucket` and `in_wave` from here: one definition on both sides.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from agent.errors import BundleRejected

RolloutState = Literal["rolling", "aborted", "done"]
ROLLOUT_STATES: tuple[RolloutState, ...] = ("rolling", "aborted", "done")
# CHECK's no_update reason when the group's document has a rollout this device is not part of and nothing to run
# outside it (a first rollout to a group: `previous` is null).
NOT_IN_WAVE = "not_in_wave"


def bucket(device_id: str, group: str) -> float:
    """The device's fixed place in its group, a float in [0, 100) with two decimals."""
    digest = hashlib.sha256(f"{group}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10000 / 100.0


def in_wave(device_id: str, group: str, percent: float) -> bool:
    """Whether the device belongs to a wave covering `percent` of the group (monotonic in `percent`)."""
    return bucket(device_id, group) < percent


def wave_of(device_id: str, group: str, waves: list[float]) -> int | None:
    """The 1-based index of the first wave of `waves` the device belongs to (None: in none of them)."""
    b = bucket(device_id, group)
    return next((i for i, p in enumerate(waves, 1) if b < p), None)


@dataclass(frozen=True)
class BundleRef:
    bundle: str  # target path, bundles/<name>-<version>.bundle
    name: str
    version: int


@dataclass(frozen=True)
class Rollout:
    id: str
    wave: int  # 1-based index of the reached wave
    waves: tuple[float, ...]
    percent: float
    previous: BundleRef | None
    state: RolloutState
    reverted_by_controller: bool


@dataclass(frozen=True)
class Target:
    """What the document tells this device to run. `rollout_id`/`rollout_wave` are None without a rollout;
    `rollout_wave` is the device's own wave (the first wave that includes it) when that wave has been reached."""

    bundle: str
    name: str
    version: int
    rollout_id: str | None = None
    rollout_wave: int | None = None
    previous: bool = False  # the rollout's `previous` (outside the reached wave, or the rollout was aborted)
    reverted: bool = False  # previous because the controller aborted the rollout (not the device's own verdict)


def _malformed(group: str, why: str) -> BundleRejected:
    return BundleRejected(f"deployment document for group {group!r}: rollout {why}", reason="malformed")


def _number(v: Any) -> TypeGuard[float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _bundle_ref(raw: Any, group: str, what: str) -> BundleRef:
    if not isinstance(raw, Mapping):
        raise _malformed(group, f"{what} must be an object")
    path, name, version = raw.get("bundle"), raw.get("name"), raw.get("version")
    if not isinstance(path, str) or not path.startswith("bundles/") or not isinstance(name, str) \
            or isinstance(version, bool) or not isinstance(version, int):
        raise _malformed(group, f"{what} does not describe a bundle")
    return BundleRef(path, name, version)


def parse_rollout(doc: Mapping[str, Any], group: str) -> Rollout | None:
    """The document's `rollout` entry (None when it has none); malformed -> BundleRejected "malformed"."""
    raw = doc.get("rollout")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise _malformed(group, "must be an object")
    rid, wave, waves, percent, state = raw.get("id"), raw.get("wave"), raw.get("waves"), raw.get("percent"), \
        raw.get("state")
    if not isinstance(rid, str) or not rid:
        raise _malformed(group, "id must be a non-empty string")
    if not isinstance(waves, list) or not waves or not all(_number(p) and 0 < p <= 100 for p in waves) \
            or any(a >= b for a, b in itertools.pairwise(waves)):
        raise _malformed(group, "waves must be increasing percentages in (0, 100]")
    if isinstance(wave, bool) or not isinstance(wave, int) or not 1 <= wave <= len(waves):
        raise _malformed(group, f"wave must be an index 1..{len(waves)} of waves")
    if not _number(percent) or not 0 <= percent <= 100:
        raise _malformed(group, "percent must be a number in [0, 100]")
    if state not in ROLLOUT_STATES:
        raise _malformed(group, f"state must be one of {', '.join(ROLLOUT_STATES)}")
    prev = raw.get("previous")
    previous = None if prev is None else _bundle_ref(prev, group, "previous")
    reverted = raw.get("reverted_by_controller", False)
    if not isinstance(reverted, bool):
        raise _malformed(group, "reverted_by_controller must be a boolean")
    return Rollout(rid, wave, tuple(float(p) for p in waves), float(percent), previous, state, reverted)


def target_for(doc: Mapping[str, Any], device_id: str, group: str) -> Target | None:
    """The bundle the document names for this device; None when it names none for it (a rollout this device is
    outside of, with no `previous`: reason NOT_IN_WAVE). The document's own `bundle`/`name`/`version` must have
    been checked by the caller (agent.trust.fetch.parse_deployment); a malformed rollout -> BundleRejected."""
    main = BundleRef(doc["bundle"], doc["name"], doc["version"])
    rollout = parse_rollout(doc, group)
    if rollout is None:
        return Target(main.bundle, main.name, main.version)
    own = wave_of(device_id, group, list(rollout.waves))
    member_wave = own if own is not None and own <= rollout.wave else None
    if rollout.state == "aborted":
        follow_new, reverted = False, True  # percent ignored: every device goes back
    elif rollout.state == "done":
        follow_new, reverted = True, False
    else:
        follow_new, reverted = in_wave(device_id, group, rollout.percent), False
    if follow_new:
        return Target(main.bundle, main.name, main.version, rollout.id, member_wave)
    if rollout.previous is None:
        return None
    p = rollout.previous
    return Target(p.bundle, p.name, p.version, rollout.id, member_wave, previous=True, reverted=reverted)


@dataclass(frozen=True)
class Membership:
    """What a device reports of the rollout its group's document carries (retained state, events, telemetry):
    `follows` is "bundle" (the rollout's new version), "previous", or "none" (outside the wave, no previous)."""

    rollout_id: str
    rollout_wave: int | None
    follows: Literal["bundle", "previous", "none"]
    reverted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"id": self.rollout_id, "wave": self.rollout_wave, "follows": self.follows, "reverted": self.reverted}

    @classmethod
    def from_json(cls, raw: object) -> Membership | None:
        """None for None or anything malformed (an answer from a worker that predates rollouts sends none)."""
        if not isinstance(raw, Mapping):
            return None
        rid, wave, follows, reverted = raw.get("id"), raw.get("wave"), raw.get("follows"), raw.get("reverted", False)
        if not isinstance(rid, str) or not (wave is None or (isinstance(wave, int) and not isinstance(wave, bool))) \
                or follows not in ("bundle", "previous", "none") or not isinstance(reverted, bool):
            return None
        return cls(rid, wave, follows, reverted)


def membership(doc: Mapping[str, Any], device_id: str, group: str) -> Membership | None:
    """This device's place in the document's rollout (None: the document has no rollout)."""
    rollout = parse_rollout(doc, group)
    if rollout is None:
        return None
    target = target_for(doc, device_id, group)
    if target is None:
        own = wave_of(device_id, group, list(rollout.waves))
        return Membership(rollout.id, own if own is not None and own <= rollout.wave else None, "none",
                          rollout.state == "aborted")
    return Membership(rollout.id, target.rollout_wave, "previous" if target.previous else "bundle", target.reverted)


def rollout_fields(m: Membership | None) -> dict[str, Any]:
    """The flat fields the state, event and telemetry messages carry (docs/telemetry.md)."""
    return {"rollout_id": None if m is None else m.rollout_id, "rollout_wave": None if m is None else m.rollout_wave}
