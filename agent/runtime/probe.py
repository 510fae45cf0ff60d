"""The runtime probe: a runtime is imported and run once in a short-lived child before the daemon imports it.

A runtime wheel that does not fit the device's CPU dies on import or on its first kernel: onnxruntime 1.21's
arm64 wheels stopped with "Illegal instruction" on a Raspberry Pi 4, and an emulated arm64 root segfaulted in
STAGE while importing onnxruntime. In the daemon that is a crash: three restarts later the bundle was rolled back
as `crash_loop`, although it also carried a TFLite artifact that would have served. So the first time STAGE needs a
runtime (a model format at a runtime version), it runs

    python -m agent.runtime.probe --format onnx --model REL/model.int8.onnx --golden REL/golden.npz --input x ...

which imports the runtime, loads the artifact and runs the bundle's golden rows once, with a timeout (the
`[deploy] stage_timeout_s` plus PROBE_START_S for the child's own start and imports). Whose fault a failure is
depends on where the child was (the `phase` it last reported) and how it ended:

- the child answered: the runtime is **usable** at that version and is not probed again (until its version changes);
- the child failed while importing the runtime (killed by any signal, hung past the timeout, an ImportError, died
  without an answer), or a CPU fault killed it in any phase (SIGILL, SIGSEGV, SIGBUS: what a wheel built for
  another CPU does, on import or on its first kernel): the runtime is **unusable** at that version, persisted in
  `<state_dir>/runtimes.json` (atomic write) keyed by format and runtime version. STAGE skips that format's
  artifacts and uses the bundle's others. A runtime upgrade changes the version, so the next STAGE probes it
  again; deleting the file (or its entry) retries by hand;
- the runtime imported, then loading or running this artifact failed any other way: an ordinary Python error, a
  kill by another signal (SIGKILL: the kernel's OOM killer when a large model does not fit the service's
  MemoryMax, which the child shares; SIGABRT, ...), the timeout (a slow load on a busy board), an exit without an
  answer. That is charged to the artifact, not the runtime: nothing is recorded, STAGE skips this artifact this
  time (as an in-process load failure would) and the next STAGE probes the runtime again.

Only a usable verdict lets the daemon import the runtime. The child never outlives the daemon (PR_SET_PDEATHSIG,
and it exits at once if its parent is already gone).

Test hook, honoured only in the child: `EDGESHIP_PROBE_FAULT="onnx:SIGILL,tflite:SIGSEGV@run"` makes the child
fault on purpose for a format (`FMT:FAULT[@PHASE]`; PHASE `import` (default), `load` or `run`). SIGILL executes a
real illegal instruction, SIGSEGV reads address 0, another signal name raises that signal, `hang` sleeps past any
timeout and `error` raises ImportError. The daemon process never reads it.

This module imports no runtime at module level: the daemon imports it to decide, only the child imports runtimes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from agent.fsutil import write_atomic

log = logging.getLogger(__name__)

PROBE_FILE = "runtimes.json"
FAULT_ENV = "EDGESHIP_PROBE_FAULT"
SCHEMA = 1
# A probe loads a model, bounded like any model load by [deploy] stage_timeout_s, after starting Python and importing
# numpy and the runtime: seconds on a small board, and more on a busy one, so that much again is allowed for them
# (a probe that times out while importing marks a working runtime unusable until its version changes).
PROBE_START_S = 30.0
DEFAULT_TIMEOUT_S = 120.0 + PROBE_START_S  # with the default stage_timeout_s
# whose fault a failed probe is: the runtime's (persisted), the artifact's, or the probe's own (it never got to the
# runtime: a broken agent install, a bad test hook); only "runtime" verdicts are persisted
Blame = Literal["runtime", "artifact", "probe"]
# the signals a CPU raises for code it cannot run (an instruction it lacks, a bad address or alignment): a runtime
# built for another CPU dies of one on import or on its first kernel, so they blame the runtime in any phase; any
# other death after the import (SIGKILL from the OOM killer, SIGABRT, the timeout's kill) blames the artifact
CPU_FAULTS = frozenset({"SIGILL", "SIGSEGV", "SIGBUS"})
Phase = Literal["start", "import", "load", "run", "done"]
PHASES: tuple[Phase, ...] = ("start", "import", "load", "run", "done")
# what a format's runtime is called, for messages (agent/deploy/stage.py's _RUNTIME_MODULES finds them)
RUNTIME_NAME = {"onnx": "onnxruntime", "tflite": "LiteRT"}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_ANSWER = "answer "  # the child's last stdout line: "answer {json}"
_PHASE = "phase "  # the child's progress lines: "phase import", "phase load", "phase run"


@dataclass(frozen=True)
class Verdict:
    """What the probe found for one runtime (a model format at a runtime version) on this device.

    `usable`: the child imported the runtime and ran the golden rows. `blame` says whose fault a failure is:
    "runtime" verdicts (a failure while importing, a CPU fault in any phase) are persisted; an "artifact" one (the
    runtime imported, then this artifact failed otherwise: an error, SIGKILL, the timeout) and a "probe" one (the
    child failed before it imported the runtime) are not.
    `phase` is where the child was when it ended: import, load, run (or done)."""

    format: str
    version: str
    usable: bool
    why: str
    phase: str
    at: float
    seconds: float
    bundle: str = ""  # the bundle whose artifact was probed ("digits v2")
    blame: Blame = "runtime"

    @property
    def runtime(self) -> str:
        return RUNTIME_NAME.get(self.format, self.format)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["runtime"] = self.runtime
        doc.pop("blame")
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Verdict:
        """A persisted verdict; ValueError if `doc` is not one."""
        try:
            v = cls(format=str(doc["format"]), version=str(doc["version"]), usable=doc["usable"],
                    why=str(doc["why"]), phase=str(doc["phase"]), at=float(doc["at"]),
                    seconds=float(doc["seconds"]), bundle=str(doc.get("bundle", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a runtime verdict: {e}") from e
        if not isinstance(v.usable, bool):
            raise ValueError("not a runtime verdict: usable must be true or false")
        return v

    def describe(self) -> str:
        """One line: `onnx (onnxruntime 1.22.0): unusable: killed by SIGILL while importing onnxruntime`."""
        return (f"{self.format} ({self.runtime} {self.version}): {'usable' if self.usable else 'unusable'}: "
                f"{self.why}")


# --- the persisted verdicts --------------------------------------------------------------------------------------


def read_verdicts(state_dir: Path) -> dict[str, Verdict]:
    """Format -> the persisted verdict for it (whatever runtime version it was for). A missing file is none; an
    unreadable or invalid one is logged and treated as none: the runtimes are then probed again (the safe side)."""
    path = state_dir / PROBE_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s (runtimes are probed again): %s", path, e)
        return {}
    out: dict[str, Verdict] = {}
    runtimes = doc.get("runtimes") if isinstance(doc, dict) else None
    if not isinstance(runtimes, dict):
        log.warning("ignoring %s (runtimes are probed again): no \"runtimes\" object", path)
        return {}
    for fmt, entry in runtimes.items():
        try:
            v = Verdict.from_json(entry) if isinstance(entry, dict) else None
        except ValueError as e:
            log.warning("ignoring %s's %r entry: %s", path, fmt, e)
            continue
        if v is not None and v.format == fmt:
            out[fmt] = v
    return out


def unusable_runtimes(state_dir: Path) -> list[Verdict]:
    """The runtimes the probe marked unusable on this device, by format (for `edge-agent status`, the retained
    state and STAGE's events)."""
    return [v for _, v in sorted(read_verdicts(state_dir).items()) if not v.usable]


def unusable_json(state_dir: Path) -> list[dict[str, Any]]:
    return [v.to_json() for v in unusable_runtimes(state_dir)]


def _write_verdicts(state_dir: Path, verdicts: Mapping[str, Verdict]) -> None:
    doc = {"schema": SCHEMA, "runtimes": {f: v.to_json() for f, v in sorted(verdicts.items())}}
    write_atomic(state_dir / PROBE_FILE, (json.dumps(doc, indent=1) + "\n").encode())


# --- the parent side ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTarget:
    """What to probe: one artifact of an extracted bundle and the golden rows to run it on."""

    format: str
    model: Path | None  # None (with golden None): only import the runtime
    golden: Path | None
    inputs: Sequence[str]  # the model's input names, in the artifact's order (keys input.<name> of golden.npz)
    outputs: Sequence[str]
    bundle: str = ""


class RuntimeProbe:
    """The device's runtime verdicts (`<state_dir>/runtimes.json`) and the child process that makes them.

    Thread-safe: STAGE and a shadow bundle's load may ask at once; one probe of a runtime runs at a time."""

    def __init__(self, state_dir: Path, timeout_s: float = DEFAULT_TIMEOUT_S,
                 command: Sequence[str] = (sys.executable, "-m", "agent.runtime.probe")) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.state_dir = Path(state_dir)
        self.timeout_s = float(timeout_s)
        self.command = tuple(command)
        self._lock = threading.Lock()

    def known(self, fmt: str, version: str) -> Verdict | None:
        """The persisted verdict for `fmt`'s runtime at `version`; None when it has not been probed at it."""
        v = read_verdicts(self.state_dir).get(fmt)
        return v if v is not None and v.version == version else None

    def due(self, fmt: str, version: str) -> bool:
        """Whether using `fmt` at `version` needs a probe first."""
        return self.known(fmt, version) is None

    def check_imports(self, runtimes: Mapping[str, str]) -> dict[str, Verdict]:
        """Format -> verdict for each installed runtime (`runtimes`: format -> version, as
        agent.deploy.stage.installed_runtimes() gives), without a bundle: the persisted verdict, or an import-only
        probe's. A runtime that crashes, hangs or cannot import is marked unusable (persisted); one that imports is
        reported usable but not recorded, since no model ran: the first STAGE that needs it runs the full probe.
        For install time (`edge-agent install`) and diagnostics."""
        out: dict[str, Verdict] = {}
        with self._lock:
            for fmt, version in sorted(runtimes.items()):
                known = self.known(fmt, version)
                if known is not None:
                    out[fmt] = known
                    continue
                verdict = run_probe(ProbeTarget(fmt, None, None, (), ()), version, timeout_s=self.timeout_s,
                                    command=self.command)
                if not verdict.usable and verdict.blame == "runtime":
                    verdicts = read_verdicts(self.state_dir)
                    verdicts[fmt] = verdict
                    _write_verdicts(self.state_dir, verdicts)
                out[fmt] = verdict
        return out

    def check(self, target: ProbeTarget, version: str) -> Verdict:
        """The verdict for `target.format`'s runtime at `version`: the persisted one, or a new probe's (persisted
        only when the runtime is to blame: a usable verdict, a failure while importing, a CPU fault)."""
        with self._lock:
            known = self.known(target.format, version)
            if known is not None:
                return known
            verdict = run_probe(target, version, timeout_s=self.timeout_s, command=self.command)
            if verdict.blame == "runtime":
                verdicts = read_verdicts(self.state_dir)
                verdicts[target.format] = verdict
                _write_verdicts(self.state_dir, verdicts)
            level = logging.INFO if verdict.usable else logging.ERROR if verdict.blame == "runtime" else logging.WARNING
            log.log(level, "runtime probe %s (%.2f s)", verdict.describe(), verdict.seconds)
            return verdict


def _phase_text(fmt: str, phase: str, model: str) -> str:
    return {"start": "starting", "import": f"importing {RUNTIME_NAME.get(fmt, fmt)}", "load": f"loading {model}",
            "run": "running the golden rows", "done": "answering"}.get(phase, phase)


def _last_phase(stdout: str) -> str:
    phase = "start"
    for line in stdout.splitlines():
        if line.startswith(_PHASE) and line[len(_PHASE):] in PHASES:
            phase = line[len(_PHASE):]
    return phase


def _answer(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(_ANSWER):
            try:
                doc = json.loads(line[len(_ANSWER):])
            except ValueError:
                return None
            return doc if isinstance(doc, dict) else None
    return None


def _blame_at(phase: str, signal_name: str = "") -> Blame:
    """Whose fault a child that failed in `phase` is (killed by `signal_name`, "" for a timeout or an exit without
    an answer). One that died before it began importing the runtime says nothing about the runtime; one that died
    while importing it condemns the runtime; after the import only a CPU fault does: a SIGKILL (the OOM killer),
    another signal or the timeout while loading or running is this artifact's (its size, a busy board)."""
    if phase == "start":
        return "probe"
    return "runtime" if phase == "import" or signal_name in CPU_FAULTS else "artifact"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_probe(target: ProbeTarget, version: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
              command: Sequence[str] = (sys.executable, "-m", "agent.runtime.probe")) -> Verdict:
    """Run the child once for `target` and judge what happened (nothing is persisted here)."""
    cmd = [*command, "--format", target.format, "--parent-pid", str(os.getpid())]
    if target.model is None or target.golden is None:
        cmd.append("--import-only")
    else:
        cmd += ["--model", str(target.model), "--golden", str(target.golden)]
    model = target.model.name if target.model is not None else "the model"
    for name in target.inputs:
        cmd += ["--input", name]
    for name in target.outputs:
        cmd += ["--output", name]
    start = time.monotonic()

    def verdict(usable: bool, why: str, phase: str, blame: Blame = "runtime") -> Verdict:
        return Verdict(target.format, version, usable, why, phase, at=time.time(),
                       seconds=round(time.monotonic() - start, 3), bundle=target.bundle, blame=blame)

    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired as e:  # run() killed it (SIGKILL) and read what it had written
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        phase = _last_phase(out)
        return verdict(False, f"hung: no answer within {timeout_s:g} s while "
                              f"{_phase_text(target.format, phase, model)}", phase, _blame_at(phase))
    except OSError as e:  # the agent's own install is broken: not this runtime's verdict to make
        return verdict(False, f"could not start the runtime probe: {e}", "start", blame="probe")

    phase = _last_phase(proc.stdout)
    doing = _phase_text(target.format, phase, model)
    if proc.returncode < 0:
        name = _signal_name(-proc.returncode)
        return verdict(False, f"killed by {name} while {doing}", phase, _blame_at(phase, name))
    answer = _answer(proc.stdout)
    if answer is None:
        last = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return verdict(False, f"exited with status {proc.returncode} without an answer while {doing}"
                              + (f": {last}" if last else ""), phase, _blame_at(phase))
    if answer.get("ok") is True and proc.returncode == 0:
        if target.model is None:
            return verdict(True, "imported (no model run yet: the first STAGE that needs it runs one)", "import")
        return verdict(True, f"imported, loaded {model} and ran {answer.get('rows', '?')} golden rows", "done")
    failed = str(answer.get("phase", phase))
    error = str(answer.get("error", "unknown error"))[:300]
    if failed == "start":
        return verdict(False, f"the runtime probe refused to start: {error}", failed, blame="probe")
    if failed == "import":
        return verdict(False, f"cannot import {RUNTIME_NAME.get(target.format, target.format)}: {error}", failed)
    return verdict(False, f"{_phase_text(target.format, failed, model)} failed: {error}", failed,
                   blame="artifact")


# --- the child ---------------------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int | None) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(3)  # the parent died before the death signal was set: nobody reads the answer


def _illegal_instruction() -> None:
    """Execute an undefined instruction (x86 `ud2`, arm64 `udf #0`): the CPU raises SIGILL, as a runtime built
    for instructions this CPU lacks does."""
    import mmap

    code = {"x86_64": b"\x0f\x0b", "amd64": b"\x0f\x0b", "aarch64": b"\x00\x00\x00\x00",
            "arm64": b"\x00\x00\x00\x00"}.get(platform.machine().lower())
    signal.signal(signal.SIGILL, signal.SIG_DFL)
    if code is not None:
        try:
            page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except OSError:  # W^X (MemoryDenyWriteExecute=): fall back to the signal itself
            pass
        else:
            page.write(code)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            ctypes.CFUNCTYPE(None)(address)()
    signal.raise_signal(signal.SIGILL)


def _segfault() -> None:
    """Read address 0: a real SIGSEGV."""
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    ctypes.string_at(0, 1)
    signal.raise_signal(signal.SIGSEGV)


def parse_faults(text: str) -> dict[tuple[str, str], str]:
    """`onnx:SIGILL,tflite:hang@run` -> {("onnx", "import"): "SIGILL", ("tflite", "run"): "hang"}; ValueError."""
    faults: dict[tuple[str, str], str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        fmt, sep, rest = item.partition(":")
        fault, _, phase = rest.partition("@")
        phase = phase or "import"
        if not sep or not fmt or not fault or phase not in ("import", "load", "run"):
            raise ValueError(f"{FAULT_ENV}: expected FORMAT:FAULT[@import|load|run], got {item!r}")
        if fault not in ("hang", "error") and not (fault.startswith("SIG") and hasattr(signal, fault)):
            raise ValueError(f"{FAULT_ENV}: unknown fault {fault!r} (a signal name such as SIGILL, hang or error)")
        faults[(fmt, phase)] = fault
    return faults


def _maybe_fault(fmt: str, phase: str) -> None:
    """The test hook (module doc): fault on purpose when EDGESHIP_PROBE_FAULT says so for this format and phase."""
    fault = parse_faults(os.environ.get(FAULT_ENV, "")).get((fmt, phase))
    if fault is None:
        return
    sys.stdout.flush()
    if fault == "SIGILL":
        _illegal_instruction()
    elif fault == "SIGSEGV":
        _segfault()
    elif fault == "hang":
        while True:
            time.sleep(3600)
    elif fault == "error":
        raise ImportError(f"{FAULT_ENV} asked this import to fail")
    else:
        sig = getattr(signal, fault)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught, so have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)


def _import_runtime(fmt: str) -> None:
    if fmt == "onnx":
        importlib.import_module("onnxruntime")
    elif fmt == "tflite":
        from agent.runtime.litert_session import _interpreter_class

        _interpreter_class()  # ai_edge_litert, else tflite_runtime; RuntimeUnavailable when neither imports
    else:
        raise ImportError(f"unknown model format {fmt!r}")


def _phase(name: str) -> None:
    print(_PHASE + name, flush=True)


def child(args: argparse.Namespace) -> int:
    """Import the runtime, load the artifact, run the golden rows once; print progress and one answer line."""
    import numpy as np

    from agent.bundle import golden_input_key
    from agent.runtime import open_session

    phase = "import"
    try:
        _phase("import")
        _maybe_fault(args.format, "import")
        _import_runtime(args.format)
        if args.import_only:
            _phase("done")
            print(_ANSWER + json.dumps({"ok": True, "imported": True}), flush=True)
            return 0
        phase = "load"
        _phase("load")
        _maybe_fault(args.format, "load")
        session = open_session(args.model, args.format, threads=1, input_names=args.input or None,
                               output_names=args.output or None)
        with np.load(args.golden, allow_pickle=False) as z:
            feeds = {s.name: z[golden_input_key(s.name)] for s in session.inputs}
        phase = "run"
        _phase("run")
        _maybe_fault(args.format, "run")
        outputs = session.run(feeds)
        rows = len(next(iter(feeds.values()))) if feeds else 0
        finite = all(bool(np.all(np.isfinite(o))) for o in outputs if o.dtype.kind in "fc")
    except Exception as e:  # every failure is the answer: the parent judges it
        text = (str(e).strip().splitlines() or [""])[0]
        print(_ANSWER + json.dumps({"ok": False, "phase": phase, "error": f"{type(e).__name__}: {text}"}),
              flush=True)
        return 1
    _phase("done")
    print(_ANSWER + json.dumps({"ok": True, "rows": rows, "outputs": len(outputs), "finite": finite}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.runtime.probe",
                                     description="Import a runtime and run one artifact on golden rows (child).")
    parser.add_argument("--format", required=True, choices=sorted(RUNTIME_NAME))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--golden", type=Path)
    parser.add_argument("--import-only", action="store_true", help="only import the runtime")
    parser.add_argument("--input", action="append", default=[], help="the model's input names, in order")
    parser.add_argument("--output", action="append", default=[], help="the model's output names, in order")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    if not args.import_only and (args.model is None or args.golden is None):
        parser.error("--model and --golden are required (or --import-only)")
    _die_with_parent(args.parent_pid)
    try:
        parse_faults(os.environ.get(FAULT_ENV, ""))
    except ValueError as e:  # a bad test hook is nobody's runtime verdict ("start": the parent blames no runtime)
        print(_ANSWER + json.dumps({"ok": False, "phase": "start", "error": str(e)}), flush=True)
        return 2
    return child(args)


__all__ = ["CPU_FAULTS", "DEFAULT_TIMEOUT_S", "FAULT_ENV", "PROBE_FILE", "PROBE_START_S", "ProbeTarget", "RuntimeProbe",
           "Verdict", "parse_faults", "read_verdicts", "run_probe", "unusable_json", "unusable_runtimes"]

if __name__ == "__main__":
    sys.exit(main())
