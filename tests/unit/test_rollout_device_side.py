"""The device side of a rollout: revert semantics in the state table, and the fetch client reading the worker's
rollout answer (a fake worker process, as in test_fetch_client.py)."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.deploy.driver import event_payload
from agent.deploy.fetch_client import FetchClient
from agent.deploy.machine import (
    NOT_IN_WAVE,
    BundleRef,
    DeployState,
    Event,
    Outcome,
    State,
    advance,
    apply,
    on_update_found,
)
from agent.deploy.rollout import Membership, rollout_fields
from agent.errors import BundleRejected

V1 = BundleRef("digits", 1, "1" * 64, "/s/releases/digits-1", "onnx")
V2 = BundleRef("digits", 2, "2" * 64, "/s/releases/digits-2", "onnx")


def _committed(cur: BundleRef, prev: tuple[BundleRef, ...] = ()) -> DeployState:
    return DeployState(State.IDLE, current=cur, previous=prev)


def _to(ds: DeployState, state: State, ref: BundleRef) -> DeployState:
    ds = apply(ds, Event.CHECK, at=1)
    ds = on_update_found(ds, BundleRef(ref.name, ref.version, ref.sha256, ref.path), at=2)
    for ev in {State.DOWNLOAD: [], State.VERIFY: [Event.OK]}[state]:
        ds = apply(ds, ev, at=3)
    assert ds.state is state
    return ds


@pytest.mark.parametrize("state", [State.DOWNLOAD, State.VERIFY])
def test_a_superseded_candidate_rolls_back_without_being_rejected(state: State) -> None:
    """A rollout aborted while the device fetched the new version: not the device's verdict on it."""
    ds = _to(_committed(V1), state, V2)
    ds = advance(ds, Outcome(Event.FAILED, "superseded"), at=4)
    assert ds.state is State.ROLLBACK and V2.sha256 not in ds.rejected
    ds = apply(ds, Event.OK, at=5)
    # a later rollout of the same version reaches the device again
    again = on_update_found(apply(ds, Event.CHECK, at=6), V2, at=7)
    assert again.state is State.DOWNLOAD and again.candidate is not None and again.candidate.sha256 == V2.sha256


def test_the_devices_own_failure_still_rejects() -> None:
    ds = _to(_committed(V1), State.VERIFY, V2)
    ds = apply(apply(ds, Event.FAILED, "parity", at=4), Event.OK, at=5)
    assert ds.rejected == {V2.sha256: "parity"}
    le = on_update_found(apply(ds, Event.CHECK, at=6), V2, at=7).last_event
    assert le is not None and le.reason == "rejected: parity"


def test_an_aborted_rollouts_revert_keeps_the_new_version_deployable() -> None:
    """v2 committed, the rollout aborted: the device deploys v1 (kept in previous) like any update; v2 is kept as
    known-good, not rejected, and a later rollout of v2 deploys it again."""
    ds = _committed(V2, (V1,))
    ds = on_update_found(apply(ds, Event.CHECK, at=1), BundleRef("digits", 1, V1.sha256, V1.path), at=2)
    assert ds.state is State.DOWNLOAD
    for ev in (Event.OK, Event.OK):
        ds = apply(ds, ev, at=3)
    ds = advance(ds, Outcome(Event.OK, fmt="onnx"), at=4)
    ds = apply(apply(apply(ds, Event.OK, at=5), Event.PASSED, at=6), Event.OK, at=7)
    assert ds.state is State.IDLE and ds.current is not None and ds.current.version == 1
    assert not ds.rejected and [p.version for p in ds.previous] == [2]
    again = on_update_found(apply(ds, Event.CHECK, at=8), BundleRef("digits", 2, V2.sha256, V2.path), at=9)
    assert again.state is State.DOWNLOAD


def test_not_in_wave_is_its_own_no_update_reason() -> None:
    ds = advance(apply(_committed(V1), Event.CHECK, at=1), Outcome.checked(None, NOT_IN_WAVE), at=2)
    assert ds.state is State.IDLE and ds.last_event is not None and ds.last_event.reason == "not_in_wave"


def test_event_payload_carries_the_rollout_fields() -> None:
    ds = apply(_committed(V1), Event.CHECK, at=1)
    m = Membership("r-1", 2, "bundle")
    p = event_payload("d", State.IDLE, ds, rollout=m)
    assert (p["rollout_id"], p["rollout_wave"]) == ("r-1", 2)
    q = event_payload("d", State.IDLE, ds)
    assert (q["rollout_id"], q["rollout_wave"]) == (None, None)
    assert rollout_fields(None) == {"rollout_id": None, "rollout_wave": None}


def test_membership_json_round_trip_and_malformed() -> None:
    m = Membership("r-1", None, "none", True)
    assert Membership.from_json(json.loads(json.dumps(m.to_json()))) == m
    for bad in (None, [], {"id": 1}, {"id": "r", "wave": "2", "follows": "bundle"},
                {"id": "r", "wave": 1, "follows": "other"}):
        assert Membership.from_json(bad) is None


# --- the fetch client and the worker's rollout answer ------------------------------------------------------------

FAKE_WORKER = textwrap.dedent('''
    import sys
    from pathlib import Path
    box, args = Path(sys.argv[1]), sys.argv[2:]
    step = args[args.index("--step") + 1]
    text = (box / (step + ".out")).read_text()
    sys.stdout.write(text)
    sys.exit(1 if '"error"' in text else 0)
''')


@pytest.fixture
def client(tmp_path: Path) -> FetchClient:
    (tmp_path / "worker.py").write_text(FAKE_WORKER)
    (tmp_path / "state").mkdir()
    cfg = parse_config({"agent": {"device_id": "dev-1", "state_dir": str(tmp_path / "state"), "group": "g"},
                        "trust": {"root": str(tmp_path / "root.json")}}, env={})
    return FetchClient(cfg, stopping=threading.Event(), connected=lambda: True,
                       worker=[sys.executable, str(tmp_path / "worker.py"), str(tmp_path)])


def _answer(client: FetchClient, doc: object) -> None:
    (Path(client.worker[1]).parent / "check.out").write_text(json.dumps(doc) + "\n")


def test_check_answer_carries_the_rollout(client: FetchClient) -> None:
    _answer(client, {"name": "digits", "version": 1, "sha256": "1" * 64, "chunks": 1, "shadow": None,
                     "rollout": {"id": "r-2", "wave": None, "follows": "previous", "reverted": False}})
    cand = client.check()
    assert cand is not None and cand.version == 1
    assert cand.rollout == client.last_rollout == Membership("r-2", None, "previous", False)


def test_not_in_wave_answer_is_no_candidate_with_the_membership_kept(client: FetchClient) -> None:
    _answer(client, {"not_in_wave": True, "rollout": {"id": "r-2", "wave": None, "follows": "none",
                                                      "reverted": False}})
    assert client.check() is None
    assert client.last_rollout == Membership("r-2", None, "none", False)
    # DOWNLOAD after a restart re-checks: the deployment no longer names a bundle for this device
    with pytest.raises(BundleRejected) as e:
        client.candidate_for(BundleRef("digits", 2, "2" * 64, "/x"))
    assert e.value.reason == "superseded"


def test_a_worker_without_rollouts_reports_none(client: FetchClient) -> None:
    _answer(client, {"name": "digits", "version": 1, "sha256": "1" * 64, "chunks": 1})
    cand = client.check()
    assert cand is not None and cand.rollout is None and client.last_rollout is None
