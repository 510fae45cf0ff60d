"""`edge-agent`: the device command line. `run` is the daemon; `status` reads its persisted state; `fetch` pulls
this device's signed bundle once; `verify` checks (and optionally unpacks) a bundle as the daemon does; `install`
puts the agent in service under systemd (agent/install.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.bundle import DEFAULT_MAX_BUNDLE_BYTES, verify_bundle
from agent.errors import BundleRejected, TransportError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="edgeship device agent")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check a bundle's manifest, member hashes and paths; optionally unpack it")
    v.add_argument("bundle", type=Path)
    v.add_argument("--extract", type=Path, help="unpack into this (new) directory after every check passes")
    v.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BUNDLE_BYTES, help="refuse larger bundles")
    v.add_argument("--json", action="store_true")
    f = sub.add_parser("fetch", help="refresh trust, download and verify this device's deployment, once")
    f.add_argument("--config", type=Path, required=True, help="agent TOML configuration")
    f.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r = sub.add_parser("run", help="the daemon: deploy, serve, probation, rollback (under systemd)")
    r.add_argument("--config", type=Path, required=True)
    r.add_argument("-v", "--verbose", action="store_true")
    st = sub.add_parser("status", help="the persisted deployment state (whether or not the daemon runs)")
    st.add_argument("--config", type=Path, required=True)
    st.add_argument("--json", action="store_true")
    i = sub.add_parser("install", help="install config, trust root, state directory and systemd unit; probe runtimes")
    i.add_argument("--config", type=Path, required=True, help="this device's agent TOML (installed as agent.toml)")
    i.add_argument("--root", type=Path, required=True, help="the fleet's provisioned TUF root.json")
    i.add_argument("--prefix", type=Path, default=None, help="the venv holding the agent (default: this one)")
    i.add_argument("--config-dir", type=Path, default=Path("/etc/edge-agent"))
    i.add_argument("--state-dir", type=Path, default=Path("/var/lib/edge-agent"))
    i.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    i.add_argument("--force", action="store_true", help="replace an installed config or root that differs")
    i.add_argument("--no-probe", action="store_true", help="do not run the runtime probe's import check")
    i.add_argument("--json", action="store_true")
    return p


def _run(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, check_paths, load_config
    from agent.daemon import run_daemon
    from agent.errors import StateFileError

    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        cfg = load_config(args.config)
        check_paths(cfg)  # refuse to start rather than run, serve nothing and look healthy to systemd
        return run_daemon(cfg)
    except ConfigError as e:  # also what the daemon finds at start, e.g. a [serve] http port already in use
        print(f"edge-agent: config: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StateFileError as e:  # restarting cannot fix it: an operator resets it (docs/errors.md), so not restarted
        print(f"edge-agent: state: {e} (remove both files to reset this device's deployment state)", file=sys.stderr)
        return EXIT_CONFIG


def _status(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config
    from agent.deploy.machine import DeployStateError, State, no_deployment, serving_after_restart
    from agent.deploy.store import StateStore
    from agent.runtime.probe import unusable_runtimes

    try:
        cfg = load_config(args.config)
        ds = StateStore.in_dir(cfg.agent.state_dir).load()
    except (ConfigError, DeployStateError) as e:
        return _fail(args, str(e), "config" if isinstance(e, ConfigError) else "state", EXIT_CONFIG)
    serving = serving_after_restart(ds)  # what serves now, or what the next start serves
    le = ds.last_event
    out: dict[str, Any] = {
        "name": serving.name if serving else None, "version": serving.version if serving else None,
        "format": serving.format if serving else None, "state": ds.state.value,
        "previous": [{"name": r.name, "version": r.version} for r in ds.previous],
        "last_event": None if le is None else {"state": le.state.value, "event": le.event.value,
                                               "reason": le.reason, "at": le.at},
        "rejected": dict(ds.rejected),
        # crashes counted against the deployment in progress (clean stops are not), and whether the agent's last
        # run ended in a clean stop it has not started since
        "restarts": ds.restarts, "max_restarts": cfg.deploy.max_restarts, "clean_stop": ds.clean_stop,
        # the last check found no signed deployments/<group>.json: a mistyped [agent] group looks like this
        "group": cfg.agent.group, "no_deployment": no_deployment(ds),
        # runtimes the runtime probe found crashing, hanging or failing here: their artifacts are skipped
        "unusable_runtimes": [v.to_json() for v in unusable_runtimes(cfg.agent.state_dir)],
    }
    if args.json:
        print(json.dumps(out))
    else:
        what = f"{out['name']} v{out['version']} ({out['format']})" if serving else "no model"
        previous = ", ".join(f"v{r.version}" for r in ds.previous) or "none"
        restarts = f"; restarts {ds.restarts} of {cfg.deploy.max_restarts}" if ds.state is not State.IDLE else ""
        stopped = "; stopped cleanly (the next start is not counted)" if ds.clean_stop else ""
        print(f"{what}; state {ds.state.value}; previous {previous}{restarts}{stopped}")
        if le is not None:
            print(f"last event: {le.state.value} {le.event.value} {le.reason}".rstrip())
        for v in unusable_runtimes(cfg.agent.state_dir):
            print(f"unusable runtime: {v.format} ({v.runtime} {v.version}): {v.why}")
        if out["no_deployment"]:
            print(f"warning: no deployment is signed for group {cfg.agent.group!r} "
                  f"(deployments/{cfg.agent.group}.json); check [agent] group")
    return 0


def _install(args: argparse.Namespace) -> int:
    from agent.errors import ConfigError
    from agent.install import InstallPlan, install

    prefix = args.prefix if args.prefix is not None else Path(sys.prefix)
    plan = InstallPlan(config=args.config, root=args.root, prefix=prefix.absolute(), config_dir=args.config_dir,
                       state_dir=args.state_dir, unit_dir=args.unit_dir, force=args.force, probe=not args.no_probe)
    try:
        result = install(plan)
    except ConfigError as e:
        return _fail(args, str(e), "config", EXIT_CONFIG)
    except (OSError, UnicodeError) as e:  # install() names the paths it checks; anything else still one line
        return _fail(args, " ".join(str(e).split()), "config", EXIT_CONFIG)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    for path in result.written:
        print(f"wrote {path}")
    for path in result.unchanged:
        print(f"unchanged {path}")
    print(f"state directory {result.state_dir} (mode 0700)")
    for r in result.runtimes:
        print(f"runtime {r['format']} ({r['runtime']} {r['version']}): {'usable' if r['usable'] else 'UNUSABLE'}: "
              f"{r['why']}")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print("next: systemctl daemon-reload && systemctl enable --now edge-agent.service")
    return 0


EXIT_REJECTED = 1
EXIT_CONFIG = 2
EXIT_TRANSPORT = 75  # EX_TEMPFAIL: worth retrying later


def _fetch(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, check_paths, load_config
    from agent.trust.fetch import fetch

    try:
        cfg = load_config(args.config)
        check_paths(cfg)
        result = fetch(cfg)
    except ConfigError as e:
        return _fail(args, str(e), "config", EXIT_CONFIG)
    except BundleRejected as e:
        # not_found: nothing is signed for this group (yet): it may appear later, like an incomplete broker
        return _fail(args, str(e), e.reason, EXIT_TRANSPORT if e.reason == "not_found" else EXIT_REJECTED)
    except TransportError as e:
        # bad bytes from the broker are a rejection; an unreachable or incomplete broker is worth a retry
        code = EXIT_TRANSPORT if e.reason in ("transport", "not_found") else EXIT_REJECTED
        return _fail(args, str(e), e.reason, code)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{result.name} v{result.version} verified over {result.transport}: {result.path}")
    return 0


def _fail(args: argparse.Namespace, message: str, reason: str, code: int) -> int:
    if args.json:
        print(json.dumps({"error": message, "reason": reason}))
    print(f"edge-agent: {reason}: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "fetch":
        return _fetch(args)
    if args.command == "run":
        return _run(args)
    if args.command == "status":
        return _status(args)
    if args.command == "install":
        return _install(args)
    if args.extract is not None and args.extract.exists():
        print(f"edge-agent: error: {args.extract} already exists", file=sys.stderr)
        return 2
    try:
        verified = verify_bundle(args.bundle, dest=args.extract, max_bytes=args.max_bytes)
    except BundleRejected as e:
        if args.json:
            print(json.dumps({"error": str(e), "reason": e.reason}))
        print(f"edge-agent: bundle rejected ({e.reason}): {e}", file=sys.stderr)
        return 1
    m = verified.manifest
    if args.json:
        print(json.dumps({"name": m.name, "version": m.version, "bytes": verified.bytes,
                          "artifacts": [a.format for a in m.artifacts],
                          "path": str(args.extract or args.bundle)}))
    else:
        print(f"{args.bundle}: {m.name} v{m.version} verified ({', '.join(a.format for a in m.artifacts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
