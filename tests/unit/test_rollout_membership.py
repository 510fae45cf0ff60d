"""Rollout membership (agent/deploy/rollout.py): the hash buckets and which bundle a document names for a device."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest

from agent.deploy.rollout import NOT_IN_WAVE, bucket, in_wave, parse_rollout, target_for, wave_of
from agent.errors import BundleRejected

IDS = [f"dev-{i:05d}" for i in range(10_000)]
WAVES = [1, 10, 50, 100]


def doc(state: str = "rolling", wave: int = 2, percent: float = 10.0,
        previous: dict[str, Any] | None = None, prev_null: bool = False) -> dict[str, Any]:
    prev = None if prev_null else (previous or {"bundle": "bundles/digits-1.bundle", "name": "digits", "version": 1})
    return {"group": "lab", "bundle": "bundles/digits-2.bundle", "name": "digits", "version": 2,
            "rollout": {"id": "r-digits-2", "wave": wave, "waves": WAVES, "percent": percent, "previous": prev,
                        "state": state, "reverted_by_controller": state == "aborted"}}


def test_bucket_is_the_agreed_hash_and_deterministic() -> None:
    expected = int.from_bytes(hashlib.sha256(b"lab/dev-1").digest()[:8], "big") % 10000 / 100.0
    assert bucket("dev-1", "lab") == expected == bucket("dev-1", "lab")
    assert 0 <= bucket("dev-1", "lab") < 100
    # the group is part of the hash: the same device lands elsewhere in another group (for most ids)
    assert sum(bucket(d, "lab") != bucket(d, "other") for d in IDS[:100]) > 90


def test_waves_are_monotonic() -> None:
    for d in IDS[:2000]:
        member = [in_wave(d, "lab", p) for p in WAVES]
        first = member.index(True) if True in member else len(member)
        assert member == [False] * first + [True] * (len(member) - first), d
        assert wave_of(d, "lab", WAVES) == (first + 1 if first < len(member) else None)
    assert all(in_wave(d, "lab", 100) for d in IDS)
    assert not any(in_wave(d, "lab", 0) for d in IDS)


@pytest.mark.parametrize("percent", [1, 10, 50])
def test_distribution_is_close_to_the_percentage(percent: float) -> None:
    share = 100 * sum(in_wave(d, "lab", percent) for d in IDS) / len(IDS)
    # binomial sd over 10,000 ids is at most 0.5 percentage points; 4 sd
    assert abs(share - percent) < 2.0


def test_no_rollout_every_device_follows_the_bundle() -> None:
    d = doc()
    del d["rollout"]
    t = target_for(d, "dev-1", "lab")
    assert t is not None and (t.bundle, t.version, t.rollout_id, t.rollout_wave) == \
        ("bundles/digits-2.bundle", 2, None, None)


def test_rolling_in_wave_follows_bundle_others_previous() -> None:
    inside = next(d for d in IDS if bucket(d, "lab") < 10)
    outside = next(d for d in IDS if bucket(d, "lab") >= 10)
    t_in, t_out = target_for(doc(), inside, "lab"), target_for(doc(), outside, "lab")
    assert t_in is not None and t_in.version == 2 and not t_in.previous and t_in.rollout_id == "r-digits-2"
    assert t_in.rollout_wave == wave_of(inside, "lab", WAVES) and t_in.rollout_wave in (1, 2)
    assert t_out is not None and t_out.version == 1 and t_out.bundle == "bundles/digits-1.bundle"
    assert t_out.previous and not t_out.reverted and t_out.rollout_wave is None


def test_aborted_every_device_returns_to_previous() -> None:
    for d in IDS[:500]:
        t = target_for(doc("aborted", wave=1, percent=1.0), d, "lab")
        assert t is not None and t.version == 1 and t.previous and t.reverted


def test_done_every_device_follows_bundle() -> None:
    assert all(t is not None and t.version == 2
               for t in (target_for(doc("done", wave=4, percent=100.0), d, "lab") for d in IDS[:500]))


def test_previous_null_outside_the_wave_gets_nothing() -> None:
    outside = next(d for d in IDS if bucket(d, "lab") >= 10)
    inside = next(d for d in IDS if bucket(d, "lab") < 10)
    assert target_for(doc(prev_null=True), outside, "lab") is None
    assert target_for(doc("aborted", prev_null=True), inside, "lab") is None
    t = target_for(doc(prev_null=True), inside, "lab")
    assert t is not None and t.version == 2
    assert NOT_IN_WAVE == "not_in_wave"


@pytest.mark.parametrize("path,value", [
    (("rollout",), "x"), (("rollout", "id"), ""), (("rollout", "wave"), 0), (("rollout", "wave"), 5),
    (("rollout", "wave"), True), (("rollout", "waves"), [10, 5]), (("rollout", "waves"), []),
    (("rollout", "waves"), [0, 100]), (("rollout", "percent"), 101), (("rollout", "percent"), float("nan")),
    (("rollout", "state"), "paused"), (("rollout", "previous"), {"bundle": "x", "name": "d", "version": 1}),
    (("rollout", "previous"), {"bundle": "bundles/a", "name": "d", "version": "1"}),
    (("rollout", "reverted_by_controller"), "yes"),
])
def test_malformed_rollout_is_refused(path: tuple[str, ...], value: Any) -> None:
    d = copy.deepcopy(doc())
    node: Any = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(BundleRejected) as e:
        target_for(d, "dev-1", "lab")
    assert e.value.reason == "malformed"


def test_parse_rollout_reads_every_field() -> None:
    r = parse_rollout(doc(), "lab")
    assert r is not None and r.id == "r-digits-2" and r.wave == 2 and r.waves == (1, 10, 50, 100)
    assert r.previous is not None and r.previous.version == 1 and r.state == "rolling"
