"""FetchClient against a fake fetch worker: a small Python script run as a real process, which records its command
line and prints whatever answer the test left for its step. No broker, no TUF, no sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from agent.config import AgentConfig, parse_config
from agent.deploy.fetch_client import FETCH_CONFIG, Candidate, FetchClient
from agent.deploy.fetch_worker import read_config
from agent.deploy.machine import BundleRef, Event, State, failure_event
from agent.errors import BundleRejected, FetchWorkerError, StopRequested, TransportError

SHA_A, SHA_B = "a" * 64, "b" * 64
CHECK_A = {"name": "digits", "version": 2, "sha256": SHA_A, "length": 1000, "chunks": 3}
CHECK_B = {"name": "digits", "version": 3, "sha256": SHA_B, "length": 1000, "chunks": 1}

FAKE_WORKER = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path

    box, args = Path(sys.argv[1]), sys.argv[2:]
    fd = int(args[args.index("--parent-fd") + 1])
    os.fstat(fd)  # the pipe's read end was handed over
    with open(box / "runs.jsonl", "a") as f:
        f.write(json.dumps({"args": args, "pid": os.getpid()}) + "\\n")
    step = args[args.index("--step") + 1]
    answer = box / (step + ".out")
    text = answer.read_text() if answer.exists() else ""
    if text == "HANG":
        while True:
            time.sleep(1)
    sys.stdout.write(text)
    sys.exit(1 if '"error"' in text else 0)
''')


class Fake:
    def __init__(self, box: Path) -> None:
        self.box = box

    def answer(self, step: str, doc: object) -> None:
        (self.box / f"{step}.out").write_text(doc if isinstance(doc, str) else json.dumps(doc) + "\n")

    def runs(self) -> list[dict[str, object]]:
        path = self.box / "runs.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def args(self, i: int = -1) -> list[str]:
        args = self.runs()[i]["args"]
        assert isinstance(args, list)
        return args


def _cfg(tmp_path: Path, mirror: str = "") -> AgentConfig:
    return parse_config({"agent": {"device_id": "dev-1", "state_dir": str(tmp_path / "state"), "group": "g"},
                         "trust": {"root": str(tmp_path / "root.json")}, "mirror": {"http": mirror},
                         "limits": {"chunk_timeout_s": 2.5}}, env={})


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    box = tmp_path / "fake"
    box.mkdir()
    (box / "worker.py").write_text(FAKE_WORKER)
    (tmp_path / "state").mkdir()
    return Fake(box)


def _client(tmp_path: Path, fake: Fake, *, connected: bool = True, mirror: str = "",
            stopping: threading.Event | None = None) -> FetchClient:
    return FetchClient(_cfg(tmp_path, mirror), stopping=stopping or threading.Event(), connected=lambda: connected,
                       worker=[sys.executable, str(fake.box / "worker.py"), str(fake.box)])


def _ref(tmp_path: Path, sha256: str = SHA_A) -> BundleRef:
    return BundleRef("digits", 2, sha256, str(tmp_path / "state" / "releases" / "digits-2"))


def _opt(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_check_answers_a_candidate_and_hands_the_worker_its_config(tmp_path: Path, fake: Fake) -> None:
    fake.answer("check", CHECK_A)
    client = _client(tmp_path, fake)
    assert client.check() == Candidate("digits", 2, SHA_A, 3)
    args = fake.args()
    assert _opt(args, "--step") == "check" and _opt(args, "--sha256") is None
    assert _opt(args, "--parent-pid") == str(os.getpid())
    config = Path(str(_opt(args, "--config")))
    assert config == tmp_path / "state" / FETCH_CONFIG
    assert read_config(config) == client.cfg


def test_check_is_none_when_no_deployment_is_signed_for_the_group(tmp_path: Path, fake: Fake) -> None:
    fake.answer("check", {"error": "no deployments/g.json", "reason": "not_found", "kind": "rejected",
                          "type": "BundleRejected"})
    assert _client(tmp_path, fake).check() is None


@pytest.mark.parametrize("doc, exc_type, reason", [
    ({"error": "bad sig", "reason": "threshold", "kind": "rejected", "type": "BundleRejected"},
     BundleRejected, "threshold"),
    ({"error": "chunk 3", "reason": "hash_mismatch", "kind": "transport", "type": "TransportError"},
     TransportError, "hash_mismatch"),
    ({"error": "x", "reason": "", "kind": "rejected"}, BundleRejected, "invalid"),
    ({"error": "x", "kind": "transport"}, TransportError, "transport"),
    # a reason this agent does not know (a newer worker?) becomes the family's default, never free text
    ({"error": "x", "reason": "cosmic_ray", "kind": "rejected"}, BundleRejected, "invalid"),
    ({"error": "x", "reason": "cosmic_ray", "kind": "transport"}, TransportError, "transport"),
])
def test_typed_worker_errors_come_back_with_their_reason(tmp_path: Path, fake: Fake, doc: dict[str, str],
                                                         exc_type: type[Exception], reason: str) -> None:
    fake.answer("download", doc)
    with pytest.raises(exc_type) as info:
        _client(tmp_path, fake).download(Candidate("digits", 2, SHA_A))
    assert info.value.reason == reason  # type: ignore[attr-defined]
    assert str(info.value) == doc["error"]


@pytest.mark.parametrize("doc, type_name", [
    ({"error": "'k'", "reason": "KeyError", "kind": "error", "type": "KeyError"}, "KeyError"),
    ({"error": "boom", "kind": "error", "reason": "MemoryError"}, "MemoryError"),
    ({"error": "boom", "kind": "error", "type": "not a name"}, "FetchWorkerError"),
    ({"error": "boom"}, "FetchWorkerError"),
])
def test_unexpected_worker_errors_keep_the_workers_class_name(tmp_path: Path, fake: Fake, doc: dict[str, str],
                                                              type_name: str) -> None:
    fake.answer("verify", doc)
    with pytest.raises(FetchWorkerError) as info:
        _client(tmp_path, fake).verify(Candidate("digits", 2, SHA_A), tmp_path / "release")
    assert info.value.type_name == type_name
    assert failure_event(State.VERIFY, info.value) == (Event.FAILED, type_name)


@pytest.mark.parametrize("step, text", [
    ("check", ""),  # exited without an answer
    ("check", "not json\n"),
    ("check", "[1, 2]\n"),
    ("check", json.dumps({"name": "digits", "sha256": SHA_A}) + "\n"),  # no version
    ("check", json.dumps({**CHECK_A, "version": "two"}) + "\n"),
    ("download", json.dumps({"name": "digits", "version": 2, "sha256": SHA_A}) + "\n"),  # no path
])
def test_malformed_answers_are_transport_errors(tmp_path: Path, fake: Fake, step: str, text: str) -> None:
    fake.answer(step, text)
    client = _client(tmp_path, fake)
    with pytest.raises(TransportError) as info:
        if step == "check":
            client.check()
        else:
            client.download(Candidate("digits", 2, SHA_A))
    assert info.value.reason == "fetch_worker"


def test_only_the_last_line_is_the_answer(tmp_path: Path, fake: Fake) -> None:
    fake.answer("check", "some noise\n" + json.dumps(CHECK_B) + "\n")
    assert _client(tmp_path, fake).check() == Candidate("digits", 3, SHA_B, 1)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_worker_past_its_time_is_killed(tmp_path: Path, fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.answer("download", "HANG")
    client = _client(tmp_path, fake)
    monkeypatch.setattr(client, "fetch_timeout", lambda chunks: 0.2)
    with pytest.raises(TransportError) as info:
        client.download(Candidate("digits", 2, SHA_A))
    assert info.value.reason == "timeout"
    pid = fake.runs()[-1]["pid"]
    assert isinstance(pid, int) and _gone(pid)


def test_a_stop_request_kills_the_worker_and_raises_stop_requested(tmp_path: Path, fake: Fake) -> None:
    fake.answer("download", "HANG")
    stopping = threading.Event()
    stopping.set()
    with pytest.raises(StopRequested):
        _client(tmp_path, fake, stopping=stopping).download(Candidate("digits", 2, SHA_A))
    pid = fake.runs()[-1]["pid"]
    assert isinstance(pid, int) and _gone(pid)


def test_timeout_grows_with_chunks_and_the_mirror(tmp_path: Path, fake: Fake) -> None:
    plain, mirrored = _client(tmp_path, fake), _client(tmp_path, fake, mirror="https://mirror.example/")
    assert plain.fetch_timeout(100) - plain.fetch_timeout(1) == pytest.approx(99 * 2.5)
    assert mirrored.fetch_timeout(1) > plain.fetch_timeout(1)


def test_download_and_verify_name_the_candidate(tmp_path: Path, fake: Fake) -> None:
    bundle = tmp_path / "state" / "bundles" / "digits-2.bundle"
    fake.answer("download", {"name": "digits", "version": 2, "sha256": SHA_A, "path": str(bundle)})
    fake.answer("verify", {"name": "digits", "version": 2, "sha256": SHA_A, "path": str(bundle)})
    client = _client(tmp_path, fake)
    cand = Candidate("digits", 2, SHA_A, 3)
    assert client.download(cand) == bundle
    assert (_opt(fake.args(), "--step"), _opt(fake.args(), "--sha256")) == ("download", SHA_A)
    client.verify(cand, tmp_path / "release")
    args = fake.args()
    assert (_opt(args, "--step"), _opt(args, "--sha256"), _opt(args, "--extract-to")) == \
        ("verify", SHA_A, str(tmp_path / "release"))


def test_without_a_broker_or_mirror_no_worker_starts(tmp_path: Path, fake: Fake) -> None:
    fake.answer("check", CHECK_A)
    with pytest.raises(TransportError):
        _client(tmp_path, fake, connected=False).check()
    assert fake.runs() == []
    # with a mirror the worker may still reach something
    assert _client(tmp_path, fake, connected=False, mirror="https://m.example/").check() is not None


def test_a_worker_that_cannot_start_is_a_transport_error(tmp_path: Path, fake: Fake) -> None:
    client = FetchClient(_cfg(tmp_path), stopping=threading.Event(), connected=lambda: True,
                         worker=[str(tmp_path / "no-such-program")])
    with pytest.raises(TransportError) as info:
        client.check()
    assert info.value.reason == "fetch_worker"


def test_precheck_outcome_is_what_the_next_check_returns(tmp_path: Path, fake: Fake) -> None:
    client = _client(tmp_path, fake)
    fake.answer("check", CHECK_A)
    client.precheck()
    fake.answer("check", CHECK_B)
    assert client.check() == Candidate("digits", 2, SHA_A, 3)  # consumed, no second worker
    assert len(fake.runs()) == 1
    assert client.check() == Candidate("digits", 3, SHA_B, 1)  # nothing stored any more: a worker runs
    assert len(fake.runs()) == 2


def test_precheck_keeps_its_error_for_check(tmp_path: Path, fake: Fake) -> None:
    client = _client(tmp_path, fake)
    fake.answer("check", {"error": "late", "reason": "expired", "kind": "rejected", "type": "BundleRejected"})
    client.precheck()  # does not raise: IDLE is persisted, CHECK reports it
    fake.answer("check", CHECK_A)
    with pytest.raises(BundleRejected, match="late"):
        client.check()
    assert client.check() == Candidate("digits", 2, SHA_A, 3)


def test_precheck_raises_a_stop_request_and_keeps_nothing(tmp_path: Path, fake: Fake) -> None:
    stopping = threading.Event()
    client = _client(tmp_path, fake, stopping=stopping)
    fake.answer("check", "HANG")
    stopping.set()
    with pytest.raises(StopRequested):
        client.precheck()
    stopping.clear()
    fake.answer("check", CHECK_B)
    assert client.check() == Candidate("digits", 3, SHA_B, 1)


def test_candidate_for_reuses_what_check_remembered(tmp_path: Path, fake: Fake) -> None:
    client = _client(tmp_path, fake)
    fake.answer("check", CHECK_A)
    cand = client.check()
    client.remember(cand)
    assert client.candidate_for(_ref(tmp_path)) is cand
    assert len(fake.runs()) == 1


def test_candidate_for_checks_again_after_a_restart(tmp_path: Path, fake: Fake) -> None:
    client = _client(tmp_path, fake)  # a fresh process: nothing remembered
    fake.answer("check", CHECK_A)
    assert client.candidate_for(_ref(tmp_path)) == Candidate("digits", 2, SHA_A, 3)
    assert client.candidate_for(_ref(tmp_path)) == Candidate("digits", 2, SHA_A, 3)
    assert len(fake.runs()) == 1  # the fresh CHECK is remembered


@pytest.mark.parametrize("remembered", [None, Candidate("digits", 3, SHA_B)])
def test_candidate_for_refuses_a_superseded_deployment(tmp_path: Path, fake: Fake,
                                                       remembered: Candidate | None) -> None:
    client = _client(tmp_path, fake)
    client.remember(remembered)
    fake.answer("check", CHECK_B)
    with pytest.raises(BundleRejected) as info:
        client.candidate_for(_ref(tmp_path, SHA_A))
    assert info.value.reason == "superseded"


def test_candidate_for_passes_on_not_found(tmp_path: Path, fake: Fake) -> None:
    """After a restart the deployment may be gone: that fails the candidate, it is not 'no update'."""
    fake.answer("check", {"error": "gone", "reason": "not_found", "kind": "rejected", "type": "BundleRejected"})
    with pytest.raises(BundleRejected) as info:
        _client(tmp_path, fake).candidate_for(_ref(tmp_path))
    assert info.value.reason == "not_found"


def test_importing_the_client_loads_no_trust_or_transport_stack() -> None:
    code = ("import sys, agent.deploy.fetch_client; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'tuf', 'securesystemslib', 'cryptography', 'requests', 'paho', 'urllib3'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
