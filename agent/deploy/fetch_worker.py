"""One deployment step (CHECK, DOWNLOAD or VERIFY) in a short-lived process.

The daemon (`agent/daemon.py`) runs these steps here rather than in its own process so that the TUF stack
(python-tuf, securesystemslib, cryptography, requests) never stays resident beside the serving model:

    python -m agent.deploy.fetch_worker --config FILE --step check|download|verify|shadow [--sha256 HEX]
                                 [--extract-to DIR] [--parent-pid PID] [--parent-fd FD]

`--config` is a JSON document of the agent configuration's sections (what `config_document` writes; values are
final, `EDGESHIP_*` overrides are not applied again). The worker connects its own MQTT client
(`edge-agent-<id>-fetch-<pid>-<random>`: unique, so it never takes over another process's session) and falls back
to the HTTP mirror like `agent.fetch.fetch`. Every step but `check` first re-reads the signed deployment and
refuses to go on ("superseded") when it no longer names `--sha256` (for `shadow`: as its shadow bundle).

`shadow` downloads and verifies the shadow bundle the deployment names (`--sha256` is the shadow's), unpacking it
to `--extract-to`, with every check a candidate gets; it records no deployment (the state machine never sees a
shadow). A deployment that names no shadow is "not_found".

The worker ends when the daemon that started it dies (a SIGKILL included), so a restarted daemon never finds an
earlier worker still fetching: on Linux the kernel sends it SIGKILL (`PR_SET_PDEATHSIG`, set first thing, then
`--parent-pid` tells whether the parent died before that); everywhere, a thread waits on `--parent-fd`, the read end
of a pipe whose write end only the daemon holds, and exits at its end of file.

It prints exactly one JSON line on stdout:
    check     {"name", "version", "sha256", "length", "chunks", "shadow", "rollout"}
              shadow: {"name", "version", "sha256", "length", "chunks"} of the shadow bundle, or null (none, or an
              entry that does not check out: logged, and never a reason to refuse the deployment itself)
              rollout: {"id", "wave", "follows", "reverted"} (agent/deploy/rollout.py Membership), or null when the
              document has no rollout entry; name/version/sha256 are then of the bundle it names for this device
              (the new one, or the rollout's `previous`)
    check     {"not_in_wave": true, "rollout": {...}}   (outside a rollout's wave, and no previous bundle named)
    download  {"name", "version", "sha256", "path"}   (path: an encrypted bundle's ciphertext, in encrypted/, or its
              plaintext in bundles/ when it was decrypted already)
    verify    {"name", "version", "sha256", "path"}   (path: the verified bundle, decrypted when it was encrypted)
    shadow    {"name", "version", "sha256", "path", "release"}   (the shadow's; release: where it was unpacked)
    failure   {"error": message, "reason": reason, "kind": "rejected" | "transport" | "error", "type": class name}
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig, parse_config
from agent.errors import BundleRejected, TransportError

if TYPE_CHECKING:
    from agent.trust.fetch import BundleSource, SignedCandidate

log = logging.getLogger(__name__)

STEPS = ("check", "download", "verify", "shadow")
EXIT_ORPHANED = 3  # the daemon died: nobody is left to read the answer
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int | None, parent_fd: int | None) -> None:
    """End this process when its parent dies (see the module doc). Call it before any work."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                log.debug("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as e:  # no usable libc: the pipe below still ends us
            log.debug("prctl unavailable: %s", e)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)  # the parent died before the death signal was set: it will never come
    if parent_fd is not None:
        threading.Thread(target=_exit_at_eof, args=(parent_fd,), name="parent-watch", daemon=True).start()


def _exit_at_eof(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:  # every write end is closed: the daemon is gone
            log.warning("the daemon that started this fetch worker is gone; exiting")
            os._exit(EXIT_ORPHANED)


def config_document(cfg: AgentConfig) -> dict[str, dict[str, Any]]:
    """The configuration as JSON-able sections that `parse_config` reads back into an equal AgentConfig."""
    doc: dict[str, dict[str, Any]] = {}
    for section in fields(cfg):
        value = getattr(cfg, section.name)
        doc[section.name] = {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return doc


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def read_config(path: Path) -> AgentConfig:
    return parse_config(json.loads(path.read_text()), env={})


def error_document(e: BaseException) -> dict[str, Any]:
    reason: str  # a RejectReason, a TransportReason or a class name
    if isinstance(e, BundleRejected):
        kind, reason = "rejected", e.reason
    elif isinstance(e, TransportError):
        kind, reason = "transport", e.reason
    else:
        kind, reason = "error", type(e).__name__
    return {"error": str(e), "reason": reason, "kind": kind, "type": type(e).__name__}


def run_step(step: str, source: BundleSource, sha256: str | None, extract_to: Path | None) -> dict[str, Any]:
    """Do `step` with `source`; the result document (errors propagate)."""
    try:
        cand = source.check()
    except BundleRejected as e:
        member = source.last_rollout
        if member is None or member.follows != "none" or e.reason != "not_found":
            raise
        if step == "check":
            return {"not_in_wave": True, "rollout": member.to_json()}
        raise BundleRejected(f"the deployment no longer names a bundle for this device: {e}",
                             reason="superseded") from e
    if step == "check":
        plan = source.client.chunk_plan(cand.bundle_tf)
        return {"name": cand.name, "version": cand.version, "sha256": cand.sha256, "length": cand.bundle_tf.length,
                "chunks": len(plan.chunk_hashes), "shadow": _shadow_summary(source, cand),
                "rollout": None if cand.rollout is None else cand.rollout.to_json()}
    if step == "shadow":
        return _shadow_step(source, cand, sha256, extract_to)
    _require(cand, sha256)
    path = source.download(cand)
    if step == "verify":
        source.verify(cand, path, extract_to=extract_to)
        path = source.bundle_file(cand)  # an encrypted bundle's download was its ciphertext, decrypted by now
    return {"name": cand.name, "version": cand.version, "sha256": cand.sha256, "path": str(path)}


def _shadow_summary(source: BundleSource, cand: SignedCandidate) -> dict[str, Any] | None:
    """What `check` reports of the shadow. Its failures are logged, not raised: a shadow is optional."""
    try:
        shadow = source.shadow(cand)
        if shadow is None:
            return None
        plan = source.client.chunk_plan(shadow.bundle_tf)
    except BundleRejected as e:
        log.warning("ignoring the deployment's shadow: %s (%s)", e, e.reason)
        return None
    return {"name": shadow.name, "version": shadow.version, "sha256": shadow.sha256,
            "length": shadow.bundle_tf.length, "chunks": len(plan.chunk_hashes)}


def _shadow_step(source: BundleSource, cand: SignedCandidate, sha256: str | None,
                 extract_to: Path | None) -> dict[str, Any]:
    shadow = source.shadow(cand)
    if shadow is None:
        raise BundleRejected(f"the deployment of {cand.name} v{cand.version} names no shadow bundle",
                             reason="not_found")
    if sha256 is not None and shadow.sha256 != sha256:
        raise BundleRejected(f"the deployment's shadow changed to {shadow.name} v{shadow.version} meanwhile",
                             reason="superseded")
    source.verify_shadow(shadow, source.download(shadow), extract_to=extract_to)
    path = source.bundle_file(shadow)
    return {"name": shadow.name, "version": shadow.version, "sha256": shadow.sha256, "path": str(path),
            "release": str(extract_to) if extract_to is not None else None}


def _require(cand: SignedCandidate, sha256: str | None) -> None:
    if sha256 is not None and cand.sha256 != sha256:
        raise BundleRejected(f"the deployment changed to {cand.name} v{cand.version} meanwhile", reason="superseded")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent.deploy.fetch_worker", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True, help="the configuration as JSON (config_document)")
    p.add_argument("--step", choices=STEPS, required=True)
    p.add_argument("--sha256", help="the candidate the daemon is deploying (download, verify), or the shadow "
                                    "bundle it fetches (shadow)")
    p.add_argument("--extract-to", type=Path, help="the release directory to unpack the bundle to (verify, shadow)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--parent-pid", type=int, help="the daemon's pid: exit at once if it is no longer the parent")
    p.add_argument("--parent-fd", type=int, help="read end of a pipe from the daemon: exit when it reaches EOF")
    return p


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout if out is None else out
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(levelname)s %(name)s [fetch-worker]: %(message)s")
    die_with_parent(args.parent_pid, args.parent_fd)
    result: Mapping[str, Any]
    try:
        if args.step != "check" and not args.sha256:
            raise BundleRejected(f"--step {args.step} needs --sha256", reason="usage")
        from agent.trust.fetch import with_source

        cfg = read_config(args.config)
        result = with_source(cfg, lambda source: run_step(args.step, source, args.sha256, args.extract_to))
        code = 0
    except Exception as e:
        log.debug("%s failed", args.step, exc_info=True)
        result, code = error_document(e), 1
    out.write(json.dumps(result) + "\n")
    out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
