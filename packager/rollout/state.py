"""A rollout's persisted state, `REPO/rollouts/<name>.json`, and the requests other terminals leave for it.

The controller saves the state after every step that matters (temp file, fsync, `os.replace`, fsync of the
directory), so a controller that crashed or was killed resumes at the wave it had signed. Another terminal never
writes the state file: `packager rollout pause|resume|abort NAME` writes a request file beside it
(`<name>.request`, atomically, the last request wins); the running controller applies it within a tick, records it
in the state and deletes the request. `<name>.lock` is held (flock) by the controller while it runs, so a second
controller for the same rollout is refused, and `status` can tell whether anyone is acting on a request.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from agent.fsutil import write_atomic
from packager.errors import InputError

Status = Literal["rolling", "paused", "aborted", "done"]
Request = Literal["pause", "resume", "abort"]
REQUESTS: tuple[Request, ...] = ("pause", "resume", "abort")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_HISTORY = 200


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InputError(f"rollout name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or "
                         "digit (at most 64)")
    return name


def rollouts_dir(repo: Path) -> Path:
    return repo / "rollouts"


def state_path(repo: Path, name: str) -> Path:
    return rollouts_dir(repo) / f"{check_name(name)}.json"


def request_path(repo: Path, name: str) -> Path:
    return rollouts_dir(repo) / f"{check_name(name)}.request"


def lock_path(repo: Path, name: str) -> Path:
    return rollouts_dir(repo) / f"{check_name(name)}.lock"


@dataclass
class RolloutState:
    """Everything needed to resume: the plan (fixed at start) and where it is."""

    name: str
    group: str
    fleet: str
    bundle: str  # target path of the new bundle
    bundle_name: str
    version: int
    sha256: str
    previous: dict[str, Any] | None  # {"bundle", "name", "version"} of what the group ran before, or None
    waves: list[float]
    soak_s: float
    gate: str  # the --gate text, parsed again on resume
    min_devices: int
    min_requests: int
    wave: int = 1  # 1-based index of the wave being rolled out
    signed: str | None = None  # "<wave>:<rolling|aborted|done>" of the document last signed and pushed
    status: Status = "rolling"
    reason: str | None = None
    wave_started_at: float | None = None  # unix s, when the controller began watching this wave (deploying)
    soak_started_at: float | None = None  # unix s, when every online canary device served the new version
    rolled_back: list[str] = field(default_factory=list)  # devices that rejected the new version themselves
    last_request: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # {"at", "wave", "status", "reason"}
    figures: dict[str, Any] = field(default_factory=dict)  # the last evaluation, for `status`
    baseline: dict[str, float] = field(default_factory=dict)  # the control's last known figures (see controller)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def rollout_id(self) -> str:
        return self.name

    @property
    def percent(self) -> float:
        return self.waves[self.wave - 1]

    @property
    def document_state(self) -> str:
        """The `rollout.state` the group's document should say now."""
        return "aborted" if self.status == "aborted" else "done" if self.status == "done" else "rolling"

    @property
    def wanted(self) -> str:
        return f"{self.wave}:{self.document_state}"

    @property
    def finished(self) -> bool:
        return self.status in ("aborted", "done")

    def note(self, status: Status, reason: str | None, at: float | None = None) -> None:
        self.status, self.reason = status, reason
        self.history.append({"at": at if at is not None else time.time(), "wave": self.wave, "status": status,
                             "reason": reason})
        del self.history[:-MAX_HISTORY]

    def plan(self) -> dict[str, Any]:
        """What `rollout start` was asked (a rerun with the same plan resumes; another plan is refused)."""
        return {"group": self.group, "fleet": self.fleet, "version": self.version, "waves": self.waves,
                "soak_s": self.soak_s, "gate": self.gate, "min_devices": self.min_devices,
                "min_requests": self.min_requests}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any, path: Path) -> RolloutState:
        if not isinstance(doc, dict):
            raise InputError(f"{path}: not a rollout state")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in doc.items() if k in known})
        except TypeError as e:
            raise InputError(f"{path}: not a rollout state ({e})") from e


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def save(repo: Path, state: RolloutState) -> None:
    state.updated_at = time.time()
    _write_atomic(state_path(repo, state.name), json.dumps(state.to_json(), indent=1, sort_keys=True).encode())


def load(repo: Path, name: str) -> RolloutState | None:
    path = state_path(repo, name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from e
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not JSON ({e})") from e
    return RolloutState.from_json(doc, path)


def load_existing(repo: Path, name: str) -> RolloutState:
    state = load(repo, name)
    if state is None:
        raise InputError(f"no rollout {name!r} in {rollouts_dir(repo)}")
    return state


def write_request(repo: Path, name: str, request: Request) -> None:
    _write_atomic(request_path(repo, name), json.dumps({"request": request, "at": time.time()}).encode())


def take_request(repo: Path, name: str) -> Request | None:
    """The pending request, if any (a malformed request file is ignored and removed)."""
    path = request_path(repo, name)
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        doc = None
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    req = doc.get("request") if isinstance(doc, dict) else None
    for known in REQUESTS:
        if req == known:
            return known
    return None


def pending_request(repo: Path, name: str) -> str | None:
    try:
        doc = json.loads(request_path(repo, name).read_bytes())
    except (OSError, ValueError):
        return None
    req = doc.get("request") if isinstance(doc, dict) else None
    return req if isinstance(req, str) else None


@contextlib.contextmanager
def controller_lock(repo: Path, name: str) -> Iterator[None]:
    """Held while a controller runs this rollout; InputError when another one holds it."""
    path = lock_path(repo, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"rollout {name!r} is already being run by another controller") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def controller_running(repo: Path, name: str) -> bool:
    path = lock_path(repo, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
