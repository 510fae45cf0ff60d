"""The persisted rollout (packager/rollout/state.py): atomic saves, resume with the same plan, requests from
another terminal, the controller lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.errors import InputError
from packager.rollout import state as st
from packager.rollout.controller import prepare, rollout_entry


def make(name: str = "r1") -> st.RolloutState:
    return st.RolloutState(name=name, group="lab", fleet="f", bundle="bundles/digits-2.bundle", bundle_name="digits",
                           version=2, sha256="a" * 64, previous={"bundle": "bundles/digits-1.bundle",
                                                                "name": "digits", "version": 1},
                           waves=[20.0, 50.0, 100.0], soak_s=3.0, gate="error_rate<=0.01", min_devices=1,
                           min_requests=0)


def test_save_and_load_round_trip_without_leftovers(tmp_path: Path) -> None:
    s = make()
    s.wave, s.signed, s.rolled_back = 2, "2:rolling", ["dev-a"]
    s.note("paused", "no data: parity")
    st.save(tmp_path, s)
    again = st.load(tmp_path, "r1")
    assert again is not None and again.to_json() == s.to_json()
    assert sorted(p.name for p in st.rollouts_dir(tmp_path).iterdir()) == ["r1.json"]  # no temp files left
    assert st.load(tmp_path, "nothing") is None
    with pytest.raises(InputError, match="no rollout 'nothing'"):
        st.load_existing(tmp_path, "nothing")


def test_a_corrupt_state_file_is_one_line(tmp_path: Path) -> None:
    st.rollouts_dir(tmp_path).mkdir()
    st.state_path(tmp_path, "r1").write_text("{not json")
    with pytest.raises(InputError, match="not JSON"):
        st.load(tmp_path, "r1")
    st.state_path(tmp_path, "r1").write_text("[]")
    with pytest.raises(InputError, match="not a rollout state"):
        st.load(tmp_path, "r1")


@pytest.mark.parametrize("name", ["", "a/b", "../x", "-x", "x" * 65])
def test_names_are_one_file_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="rollout name"):
        st.state_path(tmp_path, name)


def test_requests_are_taken_once_last_one_wins(tmp_path: Path) -> None:
    assert st.take_request(tmp_path, "r1") is None
    st.write_request(tmp_path, "r1", "pause")
    st.write_request(tmp_path, "r1", "abort")
    assert st.pending_request(tmp_path, "r1") == "abort"
    assert st.take_request(tmp_path, "r1") == "abort"
    assert st.take_request(tmp_path, "r1") is None
    st.request_path(tmp_path, "r1").write_text('{"request": "explode"}')
    assert st.take_request(tmp_path, "r1") is None and not st.request_path(tmp_path, "r1").exists()


def test_one_controller_per_rollout(tmp_path: Path) -> None:
    assert not st.controller_running(tmp_path, "r1")
    with st.controller_lock(tmp_path, "r1"):
        assert st.controller_running(tmp_path, "r1")
        with pytest.raises(InputError, match="already being run"), st.controller_lock(tmp_path, "r1"):
            pass
    assert not st.controller_running(tmp_path, "r1")


def test_resume_needs_the_same_plan(tmp_path: Path) -> None:
    s = make()
    s.wave, s.signed = 2, "2:rolling"
    st.save(tmp_path, s)
    kwargs = dict(version=2, group="lab", fleet="f", waves=(20.0, 50.0, 100.0), soak_s=3.0,
                  gate="error_rate<=0.01", min_devices=1, min_requests=0)
    resumed = prepare(tmp_path, "r1", **kwargs)  # type: ignore[arg-type]
    assert (resumed.wave, resumed.signed) == (2, "2:rolling")  # where it was, not wave 1
    with pytest.raises(InputError, match=r"another plan.*soak_s"):
        prepare(tmp_path, "r1", **(kwargs | {"soak_s": 4.0}))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="--gate"):
        prepare(tmp_path, "r1", **(kwargs | {"gate": "bogus>1"}))  # type: ignore[arg-type]


def test_the_documents_rollout_entry() -> None:
    s = make()
    s.wave = 2
    assert rollout_entry(s) == {"id": "r1", "wave": 2, "waves": [20.0, 50.0, 100.0], "percent": 50.0,
                                "previous": s.previous, "state": "rolling", "reverted_by_controller": False}
    s.note("aborted", "gate failed")
    e = rollout_entry(s)
    assert e["state"] == "aborted" and e["reverted_by_controller"] is True and s.wanted == "2:aborted"
    s.note("done", "ok")
    assert rollout_entry(s)["percent"] == 100.0 and rollout_entry(s)["state"] == "done"
    json.dumps(rollout_entry(s))


def test_the_devices_read_the_entry_the_controller_signs() -> None:
    from agent.deploy.rollout import parse_rollout

    s = make()
    s.wave = 2
    r = parse_rollout({"rollout": rollout_entry(s)}, "lab")
    assert r is not None and (r.id, r.wave, r.percent, r.state) == ("r1", 2, 50.0, "rolling")
    assert r.previous is not None and r.previous.version == 1


def test_the_retained_status_topic() -> None:
    from agent.transport.topics import Topics

    assert Topics("edgeship/f").rollout("lab") == "edgeship/f/rollouts/lab"
    for bad in ("a/b", "+", "#", ""):
        with pytest.raises(ValueError):
            Topics("edgeship/f").rollout(bad)
