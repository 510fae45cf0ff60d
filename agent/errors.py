"""Every error the agent raises on purpose, in one tree (docs/errors.md lists each class, reason and exit status).

    EdgeshipError
    ├── BundleRejected          bad data: the bundle, its manifest or the signed metadata      .reason: RejectReason
    ├── TransportError          the broker or a mirror could not deliver; retrying may help    .reason: TransportReason
    │   └── ConnectionLost      the broker connection dropped while an operation waited
    ├── RuntimeUnavailable      the runtime a model needs is missing or cannot load it
    ├── ProbationFailed         the candidate failed its probation window                       .reason: ProbationReason
    ├── FetchWorkerError        an unexpected error in the fetch worker process                 .type_name
    ├── StopRequested           SIGTERM/SIGINT while a step was under way (not a failure)
    ├── ConfigError             the configuration file or an override is wrong
    ├── DeployStateError        the deployment state machine
    │   ├── InvalidTransition   an event the transition table does not allow in that state
    │   └── InvalidState        a malformed or inconsistent deployment state
    │       └── StateFileError  the state file (and its backup) cannot be read or is invalid
    ├── ServingError            a request the serving layer refuses or cannot answer            .status (HTTP)
    │   ├── BadRequest (400), ModelNotFound (404), BatchTooLarge (413), ModelNotReady (503), InferenceFailed (500)
    │   │   (BatchTooLarge > InputTooLarge, 413: a raw input too large to preprocess)
    └── ListenError             the inference server cannot listen on its address

The packager's errors (`packager.errors`) hang off EdgeshipError too. The trust side's `FetchError` (a TransportError
that is also python-tuf's DownloadError) stays in agent/trust so that importing this module never imports tuf.

Reasons are typed (`Literal`): mypy checks every `reason=` written in the code. A reason that arrives as data (the
fetch worker's JSON answer) goes through `reject_reason()` / `transport_reason()` at that boundary.

This module imports nothing outside the standard library: the daemon, the CLI and the packager all load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal, get_args

# Why a bundle (or the metadata that signs it) was refused. Stable: reported in events, `edge-agent fetch --json`
# and `rejected` in the persisted state.
RejectReason = Literal[
    # the bundle file and its manifest (agent.bundle)
    "manifest",         # manifest.json is missing, not JSON, or fails validation
    "format",           # the file is not an uncompressed tar of the expected shape
    "too_large",        # more bytes than allowed: the bundle, the manifest, a member, a target or a chunk
    "unsafe_path",      # an absolute path, `..`, a link or a directory as a member or target name
    "unsafe_member",    # a device file, a FIFO, a sparse or base-256 member
    "unreadable",       # the file cannot be read
    "size_mismatch",    # a member's size, or the members' total, is not what the manifest says
    "unlisted",         # a member the manifest does not list
    "duplicate",        # a member that appears twice
    "missing_member",   # a member the manifest lists is not in the bundle
    "hash_mismatch",    # a member, target or chunk does not match its signed sha256
    # the signed metadata (agent.trust)
    "bad_chunk_plan",   # the signed chunk plan is missing or inconsistent
    "chunk_mismatch",   # a chunk index that does not exist, or a chunk shorter than signed
    "not_found",        # the target is not listed in the signed metadata (e.g. no deployments/<group>.json)
    "expired",          # TUF metadata past its expiry
    "rollback",         # TUF metadata older than what the device already trusts
    "threshold",        # too few valid signatures by the role's keys
    "unknown_key",      # signed only by keys the trusted root does not give that role
    "malformed",        # metadata or a deployment document that does not parse
    "invalid_metadata", # any other python-tuf refusal
    "mismatch",         # the bundle is signed as another name/version than the deployment names
    # encrypted bundles (agent.trust.confidential, docs/security.md)
    "not_granted",      # an encrypted bundle, and no grant for this device in its signed grants (or no decrypt key)
    "decrypt_failed",   # the ciphertext fails its AES-GCM tag (damaged, or encrypted under another key)
    "key_unavailable",  # the device's decrypt key file is unusable, or its grant does not unwrap with it (not blamed)
    # deployment (agent.deploy)
    "unsupported",      # no artifact in the bundle runs on this device (arch, RAM, runtime)
    "parity",           # staging ran the model but no artifact matched its golden outputs (or golden.npz is bad)
    "load_failed",      # no artifact could be loaded or run
    "no_usable_runtime",  # every artifact's runtime crashed, hung or failed the runtime probe on this device
    "superseded",       # the group's deployment changed to another bundle meanwhile
    "usage",            # the fetch worker was started with wrong arguments
    "invalid",          # the default; also a worker answer with no reason
]

# Why a transport could not deliver. `transport` (and `not_found`) are worth a retry; the others mean the bytes
# that arrived were wrong or could not be kept.
TransportReason = Literal[
    "transport",        # the default: unreachable, refused, disconnected, an HTTP error, a read that failed
    "not_found",        # a chunk, or metadata a signed document names, is not (yet) on the broker
    "hash_mismatch",    # a chunk arrived that does not match its signed sha256 (discarded)
    "too_large",        # a chunk arrived longer than signed (discarded)
    "no_space",         # no disk space for the download
    "timeout",          # a fetch worker step ran past its time limit
    "fetch_worker",     # the fetch worker could not start, died without an answer, or answered garbage
]

# Why a candidate failed probation.
ProbationReason = Literal[
    "error_rate",       # more failed requests than [deploy] max_error_rate allows
    "latency",          # p95 latency over the manifest's budget
    "hang",             # the model did not answer a golden probe in time
    "error",            # a golden probe raised
    "parity",           # a golden probe answered, but not what the bundle's golden outputs say
]

REJECT_REASONS: Final[frozenset[str]] = frozenset(get_args(RejectReason))
TRANSPORT_REASONS: Final[frozenset[str]] = frozenset(get_args(TransportReason))
PROBATION_REASONS: Final[frozenset[str]] = frozenset(get_args(ProbationReason))
_REJECT: Final[dict[str, RejectReason]] = {r: r for r in get_args(RejectReason)}
_TRANSPORT: Final[dict[str, TransportReason]] = {r: r for r in get_args(TransportReason)}


def reject_reason(value: object, default: RejectReason = "invalid") -> RejectReason:
    """`value` as a RejectReason when it is one (e.g. read from the fetch worker's JSON), else `default`."""
    return _REJECT.get(value, default) if isinstance(value, str) else default


def transport_reason(value: object, default: TransportReason = "transport") -> TransportReason:
    """`value` as a TransportReason when it is one, else `default`."""
    return _TRANSPORT.get(value, default) if isinstance(value, str) else default


class EdgeshipError(Exception):
    """Base of every error edgeship raises on purpose."""


# --- deployment: data, transport, runtime, probation -------------------------------------------------------------


class BundleRejected(EdgeshipError):
    """A bundle (or part of one, or the signed metadata for it) failed validation. Never worth a retry with the same
    bytes: a deployment that raises it rolls back and records the bundle as rejected with `reason`."""

    def __init__(self, message: str, reason: RejectReason = "invalid") -> None:
        super().__init__(message)
        self.reason: RejectReason = reason


class TransportError(EdgeshipError):
    """The broker or a mirror could not deliver what was asked for. `reason` says why when the transport can tell
    (a chunk that fails its signed hash is `hash_mismatch`, an oversized one `too_large`); retrying may help."""

    def __init__(self, message: str, reason: TransportReason = "transport") -> None:
        super().__init__(message)
        self.reason: TransportReason = reason


class ConnectionLost(TransportError):
    """The broker connection dropped while an operation was waiting; paho reconnects on its own.

    `bytes_received`: payload bytes the interrupted operation had already received (a retained read cut short by a
    reconnect still cost them on the wire)."""

    def __init__(self, message: str, bytes_received: int = 0) -> None:
        super().__init__(message)
        self.bytes_received = bytes_received


class RuntimeUnavailable(EdgeshipError):
    """The inference runtime a model needs is not installed or cannot load the model."""


class ProbationFailed(EdgeshipError):
    """The candidate failed its probation window (error rate, latency, a golden probe). `reason` says which."""

    def __init__(self, message: str, reason: ProbationReason) -> None:
        super().__init__(message)
        self.reason: ProbationReason = reason


class FetchWorkerError(EdgeshipError):
    """An unexpected error in the fetch worker process: `type_name` is the worker's own exception class, which a
    failed deployment reports as its reason (the worker's typed errors come back as BundleRejected/TransportError)."""

    def __init__(self, message: str, type_name: str) -> None:
        super().__init__(message)
        self.type_name = type_name


class StopRequested(EdgeshipError):
    """The agent was asked to stop (SIGTERM/SIGINT) while a step was under way: the persisted state is resumed after
    the restart, so the step is abandoned, not failed."""


# --- configuration and the persisted deployment state ------------------------------------------------------------


class ConfigError(EdgeshipError):
    """The configuration file or an override is missing, malformed or out of bounds."""


class DeployStateError(EdgeshipError):
    """Base of the state machine's errors."""


class InvalidTransition(DeployStateError):
    """`event` is not allowed in `state` by the transition table (or lacks what it needs)."""

    def __init__(self, state: str, event: str, detail: str = "") -> None:
        super().__init__(f"event {event!r} is not allowed in state {state!r}" + (f": {detail}" if detail else ""))
        self.state = state
        self.event = event


class InvalidState(DeployStateError):
    """A deployment state (or its JSON) is malformed or inconsistent."""


class StateFileError(InvalidState):
    """The state file (and its backup, when there is one) cannot be read or is not a valid deployment state."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"deployment state file {path}: {detail}")
        self.path = path
        self.detail = detail


# --- local inference ---------------------------------------------------------------------------------------------


class ServingError(EdgeshipError):
    """A request the serving layer refuses or cannot answer. `status` is the matching HTTP status code."""

    status = 500


class BadRequest(ServingError):
    """The request itself is wrong (unknown or missing input, wrong shape or dtype, ...). The message says what."""

    status = 400


class ModelNotFound(ServingError):
    """No model (or no such version of it) is being served under that name."""

    status = 404


class ModelNotReady(ServingError):
    """No model is loaded yet."""

    status = 503


class BatchTooLarge(ServingError):
    """The request has more rows than the model's batch limit allows (`max_batch`). The message names the limit."""

    status = 413


class InputTooLarge(BatchTooLarge):
    """A raw input whose preprocessing would work on more elements than the agent allows (agent/preprocess.py
    MAX_PREPROCESS_ELEMENTS: N x max(height) x max(width) x channels for images), refused before any conversion.
    413 like a batch over max_batch, and the cure is the same: split the request (or send smaller images)."""


class InferenceFailed(ServingError):
    """The runtime failed on a request that passed validation: the model's fault (or the device's), not the caller's."""

    status = 500


class ListenError(EdgeshipError):
    """The inference server could not listen on its address (in use, not permitted, no such interface)."""
