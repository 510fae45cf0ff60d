"""Where the deployment state lives on disk: one JSON file, replaced atomically, with the previous good copy beside it.

The caller's rule (see agent.deploy.machine): persist the new state BEFORE acting on it, and delete bundle files only
AFTER a state that no longer refers to them is saved. Then a crash or power cut at any point leaves a file that
names exactly the old or the new model.

Files (in the agent's state directory):
    deploy-state.json       the latest state (written by write_atomic: temp file, fsync, os.replace, fsync dir)
    deploy-state.json.bak   the state before it, kept only if it was valid: if the latest is ever found corrupt
                            (disk fault, a hand edit), load() falls back to it, one step behind; on_restart then
                            resumes from there (every step is safe to redo)
To reset a device's deployment state, remove both.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.deploy.machine import DeployState, decode, encode, initial_state
from agent.errors import InvalidState, StateFileError
from agent.fsutil import write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "deploy-state.json"


def _read(path: Path) -> DeployState | None:
    """The state in `path`, None when there is no such file, StateFileError when it is unreadable or invalid."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateFileError(path, f"unreadable: {e}") from e
    try:
        return decode(data)
    except InvalidState as e:
        raise StateFileError(path, f"corrupt: {e}") from e


class StateStore:
    """load() / save() of the one DeployState of an agent. Not safe for two processes at once (one agent per
    state directory)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.backup = self.path.with_name(self.path.name + ".bak")

    @classmethod
    def in_dir(cls, state_dir: Path) -> StateStore:
        return cls(Path(state_dir) / STATE_FILE)

    def load(self) -> DeployState:
        """The latest saved state; a fresh IDLE state when nothing was ever saved. A corrupt or unreadable latest
        file falls back to the valid backup (logged); with no valid backup it raises StateFileError naming it."""
        try:
            ds = _read(self.path)
        except StateFileError as latest:
            try:
                backup = _read(self.backup)
            except StateFileError as e:
                raise StateFileError(self.path, f"{latest.detail}; its backup {self.backup}: {e.detail}") from latest
            if backup is None:
                raise
            log.warning("%s; using the previous copy %s (state %s)", latest, self.backup, backup.state)
            return backup
        if ds is not None:
            return ds
        backup = _read(self.backup)  # the latest missing beside a backup is not a fresh device
        if backup is not None:
            log.warning("deployment state file %s is missing; using the previous copy %s", self.path, self.backup)
            return backup
        return initial_state()

    def save(self, ds: DeployState) -> None:
        """Persist `ds` atomically. The file it replaces is kept as the backup first, if it is valid (a corrupt
        latest never overwrites a good backup). Raises OSError when the disk refuses; the old file then stays."""
        data = encode(ds)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            old: bytes | None = self.path.read_bytes()
        except FileNotFoundError:
            old = None
        except OSError as e:
            log.warning("cannot read %s to back it up: %s", self.path, e)
            old = None
        if old == data:
            return
        if old is not None:
            try:
                decode(old)
            except InvalidState as e:
                log.warning("not backing up %s, it is corrupt: %s", self.path, e)
            else:
                write_atomic(self.backup, old)
        write_atomic(self.path, data)
