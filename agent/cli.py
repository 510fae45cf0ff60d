"""`edge-agent`: the device command line. The daemon and the MQTT fetch arrive with later work; today it
verifies (and optionally unpacks) a bundle the way the daemon will before staging it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.bundle import DEFAULT_MAX_BUNDLE_BYTES, verify_bundle
from agent.errors import BundleRejected


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="edgeship device agent")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check a bundle's manifest, member hashes and paths; optionally unpack it")
    v.add_argument("bundle", type=Path)
    v.add_argument("--extract", type=Path, help="unpack into this (new) directory after every check passes")
    v.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BUNDLE_BYTES, help="refuse larger bundles")
    v.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
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
