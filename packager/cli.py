"""`packager`: the workstation command line. Errors are one line on stderr and a non-zero exit status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.bundle import verify_bundle
from agent.errors import BundleRejected, EdgeshipError
from packager import __version__

log = logging.getLogger("packager")

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packager", description="Build, inspect and ship int8 model bundles.")
    p.add_argument("--version", action="version", version=f"packager {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="quantize a model to int8 ONNX/TFLite, evaluate it, write a bundle")
    b.add_argument("model", help="a torch.export .pt2, a TorchScript file, an .onnx file, or package.module:factory")
    b.add_argument("--weights", type=Path, help="state_dict for a package.module:factory model (weights_only)")
    b.add_argument("--calib", type=Path, required=True, help="calibration .npz (x, or one array per input)")
    b.add_argument("--eval", type=Path, required=True, help="evaluation .npz (x and y, or one array per input)")
    b.add_argument("--out", type=Path, required=True, help="directory that receives the bundle")
    b.add_argument("--name", help="bundle name (default: from the model file name)")
    b.add_argument("--version", dest="bundle_version", type=int, help="integer version (default: next in --out)")
    b.add_argument("--format", default=None,
                   help="comma-separated artifact formats: onnx,tflite (default: all the model allows)")
    b.add_argument("--prune", type=float, default=0.0, help="global L1 pruning amount in [0, 1) (default 0)")
    b.add_argument("--max-drop", type=float, default=None,
                   help="largest allowed metric loss: top-1 points, R^2 points (regression) or cosine "
                        "(default 1.0, or 0.01 for embeddings)")
    b.add_argument("--task", choices=("classification", "regression", "embedding"), default="classification")
    b.add_argument("--latency-budget-ms", type=float, default=None,
                   help="p95 budget on the device recorded in the manifest (default 10x host p95, >= 5 ms)")
    b.add_argument("--threads", type=int, default=1, help="runtime threads for evaluation and timing (default 1)")
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    i = sub.add_parser("inspect", help="validate a bundle (hashes, safe paths, manifest) and summarize it")
    i.add_argument("bundle", type=Path)
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return p


def _build(args: argparse.Namespace) -> int:
    from packager.build import BuildOptions, Progress, build, check_build_options

    formats = None
    if args.format:
        formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    opts = BuildOptions(
        model=args.model, calib=args.calib, eval=args.eval, out_dir=args.out, name=args.name,
        version=args.bundle_version, formats=formats, prune=args.prune, max_drop=args.max_drop, task=args.task,
        weights=args.weights, latency_budget_ms=args.latency_budget_ms, threads=args.threads,
    )
    check_build_options(opts)
    result = build(opts, Progress(0))
    r = result.report
    if args.json:
        fp32 = r["fp32"]
        print(json.dumps({
            "bundle": str(result.bundle),
            "fp32": {k: fp32[k] for k in ("bytes", "metric", "value", "p50_ms", "p95_ms")},
            "artifacts": [{k: a[k] for k in ("format", "bytes", "metric", "value", "drop", "p50_ms", "p95_ms")}
                          for a in r["artifacts"]],
        }))
    else:
        print(_summary_table(r))
        print(f"bundle: {result.bundle}")
    return 0


def _summary_table(r: dict[str, Any]) -> str:
    fp32 = r["fp32"]
    rows = [("fp32", fp32["bytes"], 1.0, fp32["value"], 0.0, fp32["p50_ms"], fp32["p95_ms"])]
    rows += [(a["format"] + " int8", a["bytes"], a["bytes"] / fp32["bytes"], a["value"], a["drop"], a["p50_ms"],
              a["p95_ms"]) for a in r["artifacts"]]
    lines = [f"{'model':<12}{'bytes':>12}{'x fp32':>8}{r['metric']:>11}{'drop':>10}{'p50 ms':>9}{'p95 ms':>9}"]
    lines += [f"{n:<12}{b:>12}{x:>8.3f}{v:>11.5g}{d:>10.3g}{p50:>9.3f}{p95:>9.3f}"
              for n, b, x, v, d, p50, p95 in rows]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    verified = verify_bundle(args.bundle)
    m = verified.manifest
    if args.json:
        print(json.dumps({"path": str(args.bundle), "bytes": verified.bytes, "valid": True,
                          "manifest": m.to_json()}))
        return 0
    print(f"{args.bundle}: valid ({verified.bytes} bytes, {len(m.files)} members, hashes match)")
    print(f"  {m.name} v{m.version}  task {m.task}  fp32 {m.metric} {m.fp32_metric_value:.4g}  "
          f"max drop {m.max_drop:g}  latency budget {m.latency_budget_ms:g} ms")
    for a in m.artifacts:
        print(f"  {a.file:<20} {a.runtime:<12} {m.files[a.file].bytes:>10} bytes  {m.metric} "
              f"{a.metric_value:.4g} (drop {a.drop:.3g})  recipe {a.recipe.get('name', '?')}")
    shapes = ", ".join(f"{t.name}{list(t.shape)} {t.dtype}" for t in m.inputs)
    print(f"  inputs: {shapes}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _build(args) if args.command == "build" else _inspect(args)
    except BundleRejected as e:
        print(f"packager: bundle rejected ({e.reason}): {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EdgeshipError as e:
        code = getattr(e, "exit_code", EXIT_BAD_INPUT)
        if args.command == "build" and getattr(args, "json", False):
            print(json.dumps({"error": str(e), "exit_code": code}))
        print(f"packager: error: {e}", file=sys.stderr)
        return int(code)
    except KeyboardInterrupt:
        print("packager: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
