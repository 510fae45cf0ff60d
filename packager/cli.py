"""`packager`: the workstation command line. Errors are one line on stderr and a non-zero exit status."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.bundle import DEFAULT_MAX_BATCH, MAX_BATCH_LIMIT, verify_bundle
from agent.errors import BundleRejected, EdgeshipError, TransportError
from packager import __version__
from packager.errors import InputError

log = logging.getLogger("packager")

EXIT_BAD_INPUT = 2
EXIT_TRANSPORT = 4


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
    b.add_argument("--prune-channels", type=float, default=0.0, metavar="AMOUNT",
                   help="structured pruning: remove this fraction [0, 1) of every layer's channels (torch-pruning; "
                        "package.module:factory models)")
    b.add_argument("--finetune-epochs", type=int, default=10,
                   help="after --prune-channels, fine-tune on the calibration data for N epochs (default 10, 0: none)")
    b.add_argument("--qat-epochs", type=int, default=3,
                   help="when every ONNX post-training recipe misses the gate and the calibration data has labels, "
                        "try quantization-aware training for N epochs (default 3, 0: never)")
    b.add_argument("--max-drop", type=float, default=None,
                   help="largest allowed metric loss: top-1 points, R^2 points (regression) or cosine "
                        "(default 1.0, or 0.01 for embeddings)")
    b.add_argument("--task", choices=("classification", "regression", "embedding"), default="classification")
    b.add_argument("--latency-budget-ms", type=float, default=None,
                   help="p95 budget on the device recorded in the manifest (default 10x host p95, >= 5 ms)")
    b.add_argument("--threads", type=int, default=1, help="runtime threads for evaluation and timing (default 1)")
    b.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"largest batch one inference request may carry on a device, recorded in the manifest "
                        f"(1..{MAX_BATCH_LIMIT}, default {DEFAULT_MAX_BATCH})")
    b.add_argument("--labels", type=Path, metavar="LABELS.txt",
                   help="class names, one per line in class-index order: devices answer with names (classification)")
    b.add_argument("--preprocess", metavar="'KEY=VALUE ...'",
                   help="what the device does to raw inputs, e.g. 'scale=1/255 mean=0.485,0.456,0.406 "
                        "std=0.229,0.224,0.225 layout=NHWC resize=bilinear dtype=uint8' (docs/packager.md)")
    b.add_argument("--target", default="any", choices=("any", "x86-avx2", "x86-vnni", "arm"),
                   help="device family: any/x86-avx2 use 7-bit ONNX weights (no 16-bit saturation on AVX2-only x86), "
                        "x86-vnni and arm 8-bit; recorded in the manifest (default any)")
    b.add_argument("--allow-fp32", action="store_true",
                   help="when no int8 ONNX recipe pays (accuracy, or larger/slower than fp32), ship fp32 ONNX "
                        "instead of exiting 3")
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    _distill_args(sub)

    i = sub.add_parser("inspect", help="validate a bundle (hashes, safe paths, manifest) and summarize it")
    i.add_argument("bundle", type=Path)
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")

    keys = sub.add_parser("keys", help="create or rotate the fleet's TUF signing keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    ki = ksub.add_parser("init", help="create a TUF repository with fresh Ed25519 keys")
    ki.add_argument("--repo", type=Path, required=True)
    ki.add_argument("--root-key-dir", type=Path, help="where root keys go (default REPO/../<repo>-root-keys); "
                    "move it offline afterwards")
    ki.add_argument("--root-keys", type=int, default=3)
    ki.add_argument("--root-threshold", type=int, default=2)
    for role, days in (("root", 365), ("targets", 90), ("snapshot", 7), ("timestamp", 1)):
        ki.add_argument(f"--{role}-expiry-days", type=float, default=days, help=f"default {days}")
    ke = ksub.add_parser("encrypt", help="encrypt at rest the private keys of a repository made before keys were "
                         "encrypted (each rewritten in one rename: never missing)")
    ke.add_argument("--repo", type=Path, required=True)
    ke.add_argument("--root-key-dir", type=Path, help="the root keys too (default REPO/../<repo>-root-keys when it "
                    "is there)")
    kr = ksub.add_parser("rotate", help="new keys for a role; a new root signed by old and new root keys")
    kr.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"))
    kr.add_argument("--repo", type=Path, required=True)
    kr.add_argument("--root-key-dir", type=Path)
    _transport_args(kr, required=False)

    pub = sub.add_parser("publish", help="sign a bundle for a group and publish it over MQTT (and a mirror)")
    pub.add_argument("bundle", type=Path)
    pub.add_argument("--repo", type=Path, required=True)
    pub.add_argument("--group", default=None,
                     help="device group whose deployment this becomes at once; without it the bundle is signed "
                          "and published for nobody, and `packager rollout start` deploys it")
    pub.add_argument("--shadow", type=Path, metavar="SHADOW_BUNDLE",
                     help="also sign this bundle for the group to run in shadow on a sample of live inputs (never "
                          "answering from it); each publish writes the whole deployment: omit it to end a shadow")
    pub.add_argument("--encrypt", action="store_true",
                     help="encrypt the bundle so that only the group's registered devices can read it (a fresh "
                          "content key wrapped for each device's key; docs/security.md, confidential models)")
    pub.add_argument("--no-encrypt", action="store_true",
                     help="publish in plaintext to a group that was sent encrypted bundles (refused without it); "
                          "the group takes plaintext from then on")
    _transport_args(pub, required=False)

    ref = sub.add_parser("refresh", help="re-sign timestamp (and snapshot when due) and publish it")
    ref.add_argument("--repo", type=Path, required=True)
    ref.add_argument("--force-snapshot", action="store_true")
    _transport_args(ref, required=False)

    un = sub.add_parser("unpublish", help="stop signing bundles and delete retained chunks nothing references")
    un.add_argument("bundles", nargs="*", metavar="NAME-VERSION")
    un.add_argument("--repo", type=Path, required=True)
    _transport_args(un, required=False)

    _fleet_args(sub)
    _rollout_args(sub)
    _dashboard_args(sub)
    _device_args(sub)
    return p


def _distill_args(sub: Any) -> None:
    d = sub.add_parser("distill", help="train a smaller student on a teacher's outputs; write it as a .pt2 for build")
    d.add_argument("--teacher", required=True, help="a .pt2, TorchScript or .onnx file, or package.module:factory")
    d.add_argument("--teacher-weights", type=Path, help="state_dict for a package.module:factory teacher")
    d.add_argument("--student", required=True, help="package.module:factory returning the untrained student "
                   "(imported and run: your own code)")
    d.add_argument("--data", type=Path, required=True, help="training .npz (x, optional labels y)")
    d.add_argument("--eval", type=Path, help="evaluation .npz (default: 20%% of --data held out)")
    d.add_argument("--out", type=Path, required=True, help="the student's .pt2 (torch.export, dynamic batch)")
    d.add_argument("--task", choices=("classification", "regression", "embedding"), default="classification")
    d.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    d.add_argument("--temperature", type=float, default=4.0, help="softmax temperature of the soft targets "
                   "(default 4)")
    d.add_argument("--alpha", type=float, default=0.7, help="weight of the teacher's targets against the labels "
                   "(default 0.7; 1 without labels)")
    d.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 0.002)")
    d.add_argument("--batch-size", type=int, default=32, help="default 32")
    d.add_argument("--seed", type=int, default=0, help="default 0")
    d.add_argument("--max-drop", type=float, default=None, help="largest allowed metric loss against the teacher "
                   "(default 1.0 point, 0.01 cosine for embeddings); more is exit 3 and no file")
    d.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the latency figures (default 1)")
    d.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")


def _dashboard_args(sub: Any) -> None:
    d = sub.add_parser("dashboard", help="serve the fleet's live page; the browser reads the broker over WebSockets")
    d.add_argument("--broker-ws", required=True, help="the broker's websockets listener: ws://HOST:PORT or wss://...")
    d.add_argument("--fleet", default="default", help="topic prefix edgeship/<fleet>/ (default: default)")
    d.add_argument("--listen", default="127.0.0.1:8088", help="HOST:PORT to serve the page on (default "
                   "127.0.0.1:8088)")
    d.add_argument("--open", action="store_true", help="open the page in the default browser")


def _rollout_args(sub: Any) -> None:
    ro = sub.add_parser("rollout", help="move a group to a version in waves gated on the devices' telemetry")
    rsub = ro.add_subparsers(dest="rollout_command", required=True)
    rs = rsub.add_parser("start", help="start (or, with the same arguments, resume) a rollout and run it")
    rs.add_argument("name", help="the rollout's name (its state is REPO/rollouts/NAME.json)")
    rs.add_argument("--version", dest="bundle_version", type=int, required=True,
                    help="the signed bundle version to roll out (`packager publish` it without --group first)")
    rs.add_argument("--group", required=True, help="device group to move")
    rs.add_argument("--waves", default="1,10,50,100", help="increasing percentages ending at 100 (default "
                    "1,10,50,100)")
    rs.add_argument("--soak", default="5m", help="how long every gate must hold in each wave (e.g. 30s, 5m)")
    rs.add_argument("--gate", required=True, help='comma-separated gates, e.g. "parity>=0.99,'
                    'latency_ms_p95<=1.2*baseline,error_rate<=0.01,drift_psi<0.25,rollbacks==0,offline<=0.05"')
    rs.add_argument("--min-devices", type=int, default=1, help="canary devices that must report (default 1)")
    rs.add_argument("--min-requests", type=int, default=0,
                    help="requests the canary must answer in the window (default 0)")
    rs.add_argument("--no-encrypt", action="store_true", help="roll a plaintext bundle out to a group that was sent "
                    "encrypted bundles (refused without it); the group takes plaintext from then on")
    rs.add_argument("--broker", required=True, help="mqtt[s]://HOST:PORT; several comma-separated: failover")
    rs.add_argument("--fleet", default="default", help="topic prefix edgeship/<fleet>/ (default: default)")
    rs.add_argument("--ca-file", help="CA certificate for mqtts://")
    _identity_args(rs)
    for cmd, text in (("status", "print a rollout's state"), ("pause", "ask the controller to pause"),
                      ("resume", "ask the controller to resume a paused rollout (the wave soaks again)"),
                      ("abort", "ask the controller to abort: the group returns to the previous version")):
        c = rsub.add_parser(cmd, help=text)
        c.add_argument("name")
    for c in rsub.choices.values():
        c.add_argument("--repo", type=Path, required=True)
        c.add_argument("--json", action="store_true", help="print JSON on stdout")


def _fleet_args(sub: Any) -> None:
    from packager.fleet.view import EVENTS_WAIT_S, STATUS_WAIT_S  # pure: no paho or rich for other commands

    fl = sub.add_parser("fleet", help="the fleet's view from the devices' state, telemetry and events")
    fsub = fl.add_subparsers(dest="fleet_command", required=True)
    fs = fsub.add_parser("status", help="one row per device: state, bundle, latency, accuracy, drift, resources")
    fw = fsub.add_parser("watch", help="the status table, live (Ctrl-C quits)")
    fe = fsub.add_parser("events", help="the devices' transition events, de-duplicated, one per line")
    for f in (fs, fw, fe):
        f.add_argument("--broker", required=True, help="mqtt[s]://HOST:PORT; several comma-separated: failover")
        f.add_argument("--fleet", default="default", help="topic prefix edgeship/<fleet>/ (default: default)")
        f.add_argument("--ca-file", help="CA certificate for mqtts://")
        f.add_argument("--repo", type=Path, help="with a device registry there: groups are the registry's, and "
                                                 "unregistered or revoked ids are ignored (and counted)")
        _identity_args(f)
    for f in (fs, fw):
        f.add_argument("--group", help="only devices whose state names this group")
        f.add_argument("--error-rate-alarm", type=float, default=0.05,
                       help="error rate above which a device is flagged (default 0.05)")
    fs.add_argument("--json", action="store_true", help='print {"devices": [...]} on stdout')
    fs.add_argument("--wait", type=float, default=STATUS_WAIT_S,
                    help=f"longest time to listen for telemetry, seconds (default {STATUS_WAIT_S:g}: "
                         "two of the agent's default intervals)")
    fe.add_argument("--follow", action="store_true", help="keep printing events until Ctrl-C")
    fe.add_argument("--device", help="only this device's events")
    fe.add_argument("--json", action="store_true", help="one JSON object per line")
    fe.add_argument("--wait", type=float, default=EVENTS_WAIT_S,
                    help=f"without --follow, listen this many seconds (default {EVENTS_WAIT_S:g})")


def _identity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cert-file", help="this client's certificate, for brokers that require one (`packager ca issue`)")
    p.add_argument("--key-file", help="its private key (encrypted: EDGESHIP_KEY_PASSPHRASE)")


def _device_args(sub: Any) -> None:
    from packager.provision import DEFAULT_DEVICE_DIR, DEFAULT_STATE_DIR

    ca = sub.add_parser("ca", help="the fleet CA: broker certificates, identities, the ACL (docs/security.md)")
    csub = ca.add_subparsers(dest="ca_command", required=True)
    csub.add_parser("init", help="create the fleet CA in REPO/ca (device add creates it when missing)")
    ci = csub.add_parser("issue", help="a client certificate for the packager, the dashboard or an inference app")
    ci.add_argument("--role", required=True, choices=("packager", "dashboard", "app"))
    ci.add_argument("--name", help="the app's name (--role app)")
    ci.add_argument("--out", type=Path, required=True, help="directory for <identity>.pem, .key and ca.pem")
    cb = csub.add_parser("broker-cert", help="Mosquitto's server certificate and key, the CA and the CRL")
    cb.add_argument("--host", required=True, help="the name (or IP address) clients use to reach the broker")
    cb.add_argument("--out", type=Path, required=True)
    ca_acl = csub.add_parser("acl", help="print the Mosquitto acl_file for the fleet")
    cr = csub.add_parser("revoke", help="revoke a certificate that is not a device's (device revoke for those)")
    cr.add_argument("serial", help="the certificate's serial, hex (packager ca list)")
    csub.add_parser("list", help="every certificate the CA issued")
    for c in csub.choices.values():
        c.add_argument("--repo", type=Path, required=True)
    for c in (ci, ca_acl):
        c.add_argument("--fleet", default="default", help="the fleet it is for (default: default)")

    dv = sub.add_parser("device", help="provision, revoke and list devices (client certificates, keys, config)")
    dsub = dv.add_subparsers(dest="device_command", required=True)
    da = dsub.add_parser("add", help="credentials, agent.toml and root.json for a new device, into --out")
    da.add_argument("device_id")
    da.add_argument("--group", required=True)
    da.add_argument("--out", type=Path, required=True, help="a new directory; copy its files to the device")
    da.add_argument("--broker", help="mqtts://HOST:PORT the device connects to (default: EDGESHIP_BROKER)")
    da.add_argument("--fleet", default="default")
    da.add_argument("--device-dir", default=str(DEFAULT_DEVICE_DIR),
                    help=f"where --out's files will be on the device (default {DEFAULT_DEVICE_DIR})")
    da.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR),
                    help=f"[agent] state_dir on the device (default {DEFAULT_STATE_DIR})")
    da.add_argument("--systemd-credentials", action="store_true",
                    help="also write credentials.conf, a drop-in giving edge-agent.service (DynamicUser=) the keys "
                         "as systemd credentials, and point agent.toml at /run/credentials/edge-agent.service/")
    dr = dsub.add_parser("revoke", help="revoke the device's certificate (CRL) and mark it revoked")
    dr.add_argument("device_id")
    dl = dsub.add_parser("list", help="the registered devices")
    dl.add_argument("--json", action="store_true")
    dg = dsub.add_parser("grant", help="grant the device every encrypted bundle of its group (re-wrapping the "
                                       "content keys, never re-encrypting) and push the grants")
    dg.add_argument("device_id")
    for c in dsub.choices.values():
        c.add_argument("--repo", type=Path, required=True)
    _transport_args(dg, required=False)


def _transport_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--broker", required=required, help="mqtt[s]://HOST:PORT; several comma-separated: failover")
    p.add_argument("--fleet", default="default", help="topic prefix edgeship/<fleet>/ (default: default)")
    p.add_argument("--http-dir", type=Path, help="also write the static tree for an HTTP mirror here")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    _identity_args(p)


def _build(args: argparse.Namespace) -> int:
    from packager.build import BuildOptions, Progress, build, check_build_options

    formats = None
    if args.format:
        formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    opts = BuildOptions(
        model=args.model, calib=args.calib, eval=args.eval, out_dir=args.out, name=args.name,
        version=args.bundle_version, formats=formats, prune=args.prune, prune_channels=args.prune_channels,
        finetune_epochs=args.finetune_epochs, qat_epochs=args.qat_epochs, max_drop=args.max_drop, task=args.task,
        weights=args.weights, latency_budget_ms=args.latency_budget_ms, threads=args.threads,
        max_batch=args.max_batch, labels=args.labels, preprocess=args.preprocess,
        target=args.target, allow_fp32=args.allow_fp32,
    )
    check_build_options(opts)
    result = build(opts, Progress(0))
    r = result.report
    if args.json:
        fp32 = r["fp32"]
        print(json.dumps({
            "bundle": str(result.bundle),
            "fp32": {k: fp32[k] for k in ("bytes", "metric", "value", "p50_ms", "p95_ms")},
            "artifacts": [{k: a[k] for k in ("format", "bytes", "metric", "value", "drop", "p50_ms", "p95_ms",
                                             "precision")} for a in r["artifacts"]],
            "target": r["target"],
            **({"pruning": {"value": p["value_after"], **{k: p[k] for k in (
                "method", "amount", "sparsity", "parameters_before", "parameters_after", "drop", "bytes", "p50_ms")
                if k in p}}} if (p := r.get("pruning")) else {}),
        }))
    else:
        print(_summary_table(r))
        print(f"bundle: {result.bundle}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from packager.distill import DistillOptions, check_distill_options, distill

    opts = DistillOptions(
        teacher=args.teacher, student=args.student, data=args.data, out=args.out, eval=args.eval,
        teacher_weights=args.teacher_weights, task=args.task, epochs=args.epochs, temperature=args.temperature,
        alpha=args.alpha, lr=args.lr, batch_size=args.batch_size, seed=args.seed, max_drop=args.max_drop,
        threads=args.threads)
    check_distill_options(opts)
    result = distill(opts, lambda m: print(m, file=sys.stderr, flush=True))
    r = result.report
    if args.json:
        print(json.dumps({"out": str(result.out), **r}))
        return 0
    t, st = r["teacher"], r["student"]
    print(f"{'model':<9}{'parameters':>12}{'fp32 ONNX bytes':>17}{r['metric']:>10}{'drop':>8}{'p50 ms':>9}")
    for role, m in (("teacher", t), ("student", st)):
        drop = f"{m['drop']:>8.3g}" if "drop" in m else f"{'-':>8}"
        print(f"{role:<9}{m['parameters']:>12,}{m['onnx_bytes']:>17,}{m['value']:>10.4g}{drop}{m['p50_ms']:>9.3f}")
    print(f"student/teacher: {st['parameters'] / t['parameters']:.3f}x parameters, "
          f"{st['onnx_bytes'] / t['onnx_bytes']:.3f}x bytes, {st['p50_ms'] / t['p50_ms']:.3f}x p50 latency")
    print(f"student: {result.out}")
    return 0


def _summary_table(r: dict[str, Any]) -> str:
    fp32 = r["fp32"]
    rows = [("fp32", fp32["bytes"], 1.0, fp32["value"], 0.0, fp32["p50_ms"], fp32["p95_ms"])]
    prune = r.get("pruning")
    if prune:  # drops are from the unpruned model, pruning's own included
        rows.append(("fp32 pruned", prune["bytes"], prune["bytes"] / fp32["bytes"], prune["value_after"],
                     prune["drop"], prune.get("p50_ms", math.nan), prune.get("p95_ms", math.nan)))
    rows += [(f"{a['format']} {a.get('precision', 'int8')}", a["bytes"], a["bytes"] / fp32["bytes"], a["value"],
              a["drop"], a["p50_ms"], a["p95_ms"]) for a in r["artifacts"]]
    lines = [f"{'model':<12}{'bytes':>12}{'x fp32':>8}{r['metric']:>11}{'drop':>10}{'p50 ms':>9}{'p95 ms':>9}"]
    lines += [f"{n:<12}{b:>12}{x:>8.3f}{v:>11.5g}{d:>10.3g}" + "".join(
        f"{'-':>9}" if math.isnan(t) else f"{t:>9.3f}" for t in (p50, p95)) for n, b, x, v, d, p50, p95 in rows]
    if prune and prune.get("method") == "channels":
        tuned = prune.get("finetune")
        lines.append(f"pruned {100 * prune['amount']:g}% of the channels: {prune['parameters_before']:,} -> "
                     f"{prune['parameters_after']:,} parameters; "
                     + (f"fine-tuned {tuned['epochs']} epochs" if tuned else "no fine-tune"))
    if (d := r.get("distillation")) and "teacher" in d:
        lines.append(f"distilled from {d['teacher'].get('model', '?')} "
                     f"({d['teacher'].get('parameters', '?')} parameters, {r['metric']} "
                     f"{d['teacher'].get('value', math.nan):.4g})")
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
    if m.preprocess is not None:
        p = m.preprocess
        print(f"  preprocessing of {p.input!r}: raw {p.layout} {p.dtype} -> (x * {p.scale:g} - mean {list(p.mean)}) / "
              f"std {list(p.std)}" + (f", {p.resize} resize" if p.resize else "") + f" -> {p.model_layout}")
    if m.labels is not None:
        first = ", ".join(m.labels.names[:5]) + (", ..." if len(m.labels.names) > 5 else "")
        print(f"  labels: {len(m.labels.names)} classes of {m.labels.output!r} ({first}); scores {m.labels.scores}")
    return 0


class _ProgressBar:
    """A progress bar on stderr for terminals; a line per quarter otherwise (logs, CI)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last: tuple[str, int] = ("", -1)

    def __call__(self, stage: str, done: int, total: int) -> None:
        quarter = 4 * done // max(total, 1)
        if self.tty:
            filled = 30 * done // max(total, 1)
            end = "\n" if done == total else ""
            print(f"\r{stage:<24} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end=end, file=sys.stderr,
                  flush=True)
        elif (stage, quarter) != self.last:
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)
        self.last = (stage, quarter)


def _connect(args: argparse.Namespace) -> Any:
    """An MqttClient connected to --broker, or None when only a mirror directory was asked for."""
    from agent.transport.mqtt import MqttClient, unique_client_id
    from packager.publish import topics_for

    if not args.broker:
        if getattr(args, "http_dir", None) is None and args.command in ("publish",):
            raise InputError("publish needs --broker and/or --http-dir")
        return None
    cert_file, key_file, password = _identity(args)
    client = MqttClient(args.broker, unique_client_id("packager"), prefix=topics_for(args.fleet),
                        ca_file=args.ca_file, cert_file=cert_file, key_file=key_file, key_password=password)
    return client.connect(timeout=15.0)


def _encrypt_keys(args: argparse.Namespace) -> int:
    from packager import confidential, fleet_ca, keystore, tuf_repo

    if not tuf_repo.metadata_dir(args.repo).is_dir():
        raise InputError(f"--repo {args.repo}: not a TUF repository")
    root_dir = args.root_key_dir or tuf_repo.default_root_key_dir(args.repo)
    if args.root_key_dir is not None and not root_dir.is_dir():
        raise InputError(f"--root-key-dir {root_dir}: no such directory")
    # only the packager's own key files: a device's or broker's --out placed under REPO keeps its plaintext key
    online = [*keystore.key_files(tuf_repo.keys_dir(args.repo)), fleet_ca.ca_key_path(args.repo),
              confidential.content_keys_dir(args.repo) / confidential.ESCROW_KEY]
    done = keystore.encrypt_plaintext_keys(online, "online")
    if root_dir.is_dir():
        done += keystore.encrypt_plaintext_keys(keystore.key_files(root_dir), "root")
    else:
        print(f"no root keys at {root_dir} (offline?): rerun with --root-key-dir where they are to encrypt them")
    for path in done:
        print(f"encrypted {path}")
    print(f"{len(done)} private key(s) encrypted; every other key was already encrypted")
    return 0


def _identity(args: argparse.Namespace) -> tuple[str | None, str | None, bytes | None]:
    """--cert-file/--key-file, checked, and the key's passphrase when it is encrypted (packager/keystore.py)."""
    from agent.transport.mqtt import split_broker_urls
    from packager import keystore

    cert, key = args.cert_file, args.key_file
    if cert is None and key is None:
        return None, None, None
    if cert is None or key is None:
        raise InputError("--cert-file and --key-file go together")
    if not all(u.startswith("mqtts://") for u in split_broker_urls(args.broker)):
        raise InputError("--cert-file needs mqtts:// broker URLs")
    try:
        pem = Path(key).read_bytes()
        Path(cert).read_bytes()
    except OSError as e:
        raise InputError(f"{e.filename}: cannot read it ({e.strerror})") from e
    return cert, key, keystore.passphrase() if keystore.is_encrypted(pem) else None


def _keys(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from packager import keystore, tuf_repo

    if args.keys_command == "rotate":
        _check_transport_args(args)
    if args.keys_command == "encrypt":
        return _encrypt_keys(args)
    if args.keys_command == "init":
        expiry = tuf_repo.Expiry(**{role: timedelta(days=getattr(args, f"{role}_expiry_days"))
                                    for role in ("root", "targets", "snapshot", "timestamp")})
        tuf_repo.init_repo(args.repo, args.root_key_dir, args.root_keys, args.root_threshold, expiry)
        key_dir = args.root_key_dir or tuf_repo.default_root_key_dir(args.repo)
        print(f"created TUF repository {args.repo}; provision devices with {tuf_repo.provisioning_root(args.repo)}")
        print(f"root keys are in {key_dir}: move them offline; they are needed only to rotate keys")
        if keystore.same_passphrases():
            print(f"packager: warning: the root keys have the online keys' passphrase: whoever holds "
                  f"{keystore.PASSPHRASE_ENV} can open them wherever they are; give them their own with "
                  f"{keystore.ROOT_PASSPHRASE_ENV} (docs/security.md)", file=sys.stderr)
        return 0
    tuf_repo.rotate_keys(args.repo, args.role, args.root_key_dir)
    print(f"rotated {args.role} keys; new root {tuf_repo.provisioning_root(args.repo)}")
    if args.broker or args.http_dir:
        from packager.publish import push, topics_for

        client = _connect(args)
        try:
            push(args.repo, client, topics_for(args.fleet), [], args.http_dir)
        finally:
            if client is not None:
                client.close()
        print("published the new metadata; devices follow the rotation on their next refresh")
    return 0


def _check_transport_args(args: argparse.Namespace) -> None:
    """Names and URLs checked before anything is signed, written or connected."""
    from packager import publish as pub

    pub.check_level_name("--fleet", args.fleet)
    if getattr(args, "group", None) is not None:
        pub.check_level_name("--group", args.group)
    if args.broker:
        pub.check_broker_url(args.broker)


def _publish(args: argparse.Namespace) -> int:
    from packager import publish as pub

    _check_transport_args(args)
    topics = pub.topics_for(args.fleet)
    if args.command == "publish" and not args.bundle.is_file():
        raise InputError(f"bundle {args.bundle}: no such file")
    if args.command == "publish" and args.shadow is not None and not args.shadow.is_file():
        raise InputError(f"--shadow {args.shadow}: no such file")
    if args.command in ("publish", "refresh"):
        from packager import keystore

        keystore.passphrase()  # asked for (or found missing) before connecting, not after the upload started
    client = _connect(args)
    try:
        if args.command == "publish":
            r = pub.publish(args.repo, args.bundle, args.group, client, topics, args.http_dir, _ProgressBar(),
                            shadow=args.shadow, encrypt=args.encrypt, no_encrypt=args.no_encrypt)
            where = ", ".join(w for w, on in (("broker", client), ("mirror", args.http_dir)) if on)
            sent = f"{r.stats.chunks_published} chunks sent, {r.stats.chunks_skipped} already there" if r.stats \
                else "no broker"
            whom = f"for group {args.group}" if args.group is not None else "for no group (a rollout deploys it)"
            print(f"published {r.bundle_target}{' encrypted' if args.encrypt else ''} {whom} ({r.sha256[:12]}) to "
                  f"{where}: {sent}; timestamp v{r.timestamp_version}")
            if r.shadow_target is not None:
                print(f"group {args.group} runs {r.shadow_target} in shadow")
        elif args.command == "refresh":
            changed, version = pub.refresh(args.repo, client, topics, args.http_dir, args.force_snapshot)
            print(f"re-signed {', '.join(changed)}; timestamp v{version}")
        else:
            removed, garbage = pub.unpublish(args.repo, args.bundles, client, topics, args.http_dir)
            print(f"unpublished {len(removed)} bundle(s); deleted {len(garbage)} unreferenced target(s)")
    finally:
        if client is not None:
            client.close()
    return 0


def _fleet(args: argparse.Namespace) -> int:
    from packager import publish as pub

    _check_transport_args(args)
    if getattr(args, "device", None) is not None:
        pub.check_level_name("--device", args.device)
    wait = getattr(args, "wait", None)
    if wait is not None and not (math.isfinite(wait) and wait > 0):
        raise InputError(f"--wait {wait:g}: must be a positive number of seconds")
    alarm = getattr(args, "error_rate_alarm", None)
    if alarm is not None and not (math.isfinite(alarm) and 0 <= alarm <= 1):
        raise InputError(f"--error-rate-alarm {alarm:g}: must be in [0, 1]")
    prefix = pub.topics_for(args.fleet).prefix
    from packager.devices import group_registry

    registry = group_registry(args.repo) if args.repo is not None else None
    client = _connect(args)
    try:
        if args.fleet_command == "status":
            from packager.fleet import status

            return status.run(client, prefix, wait=args.wait, group=args.group, as_json=args.json,
                              error_rate_alarm=args.error_rate_alarm, registry=registry)
        if args.fleet_command == "watch":
            from packager.fleet import watch

            return watch.run(client, prefix, group=args.group, error_rate_alarm=args.error_rate_alarm,
                             registry=registry)
        from packager.fleet import events

        return events.run(client, prefix, device=args.device, follow=args.follow, wait=args.wait,
                          as_json=args.json, registry=registry)
    finally:
        client.close()


def _dashboard(args: argparse.Namespace) -> int:
    from packager.dashboard.server import make_server
    from packager.publish import check_level_name

    server = make_server(args.listen, args.broker_ws, check_level_name("--fleet", args.fleet))
    print(f"dashboard on {server.url} (broker {args.broker_ws}, fleet {args.fleet}); Ctrl-C stops", flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return 0
    finally:
        server.server_close()
    return 0


def _rollout(args: argparse.Namespace) -> int:
    from packager.rollout import state as st

    st.check_name(args.name)
    if args.rollout_command == "start":
        return _rollout_start(args)
    state = st.load_existing(args.repo, args.name)
    if args.rollout_command == "status":
        from packager.rollout.controller import status_json

        doc = status_json(state, args.repo)
        if args.json:
            print(json.dumps(doc))
        else:
            print(_rollout_line(state))
            if doc["pending_request"]:
                note = "" if doc["controller_running"] else " (no controller is running: `rollout start` " \
                    "with the same arguments resumes it)"
                print(f"  pending request: {doc['pending_request']}{note}")
        return 0
    if state.finished:
        raise InputError(f"rollout {args.name!r} is already {state.status}")
    st.write_request(args.repo, args.name, args.rollout_command)
    running = st.controller_running(args.repo, args.name)
    if args.json:
        print(json.dumps({"name": args.name, "request": args.rollout_command, "controller_running": running}))
    else:
        print(f"requested {args.rollout_command} of rollout {args.name}" + (
            "" if running else "; no controller is running: it applies when `rollout start` resumes it"))
    return 0


def _rollout_line(state: Any) -> str:
    return (f"rollout {state.name}: {state.bundle_name} v{state.version} to group {state.group}, wave {state.wave}"
            f"/{len(state.waves)} ({state.percent:g}%): {state.status}" + (f" ({state.reason})" if state.reason
                                                                            else ""))


def _rollout_start(args: argparse.Namespace) -> int:
    from packager import publish as pub
    from packager.rollout.controller import Controller, prepare, status_json
    from packager.rollout.gates import parse_gates
    from packager.rollout.planner import parse_duration, parse_waves

    # everything checked before anything is signed, written or connected
    pub.check_level_name("--fleet", args.fleet)
    pub.check_level_name("--group", args.group)
    pub.check_broker_url(args.broker)
    parse_gates(args.gate)
    waves = parse_waves(args.waves)
    soak = parse_duration(args.soak)
    if args.min_devices < 0 or args.min_requests < 0:
        raise InputError("--min-devices and --min-requests must be 0 or more")
    if not (args.repo / "metadata").is_dir():
        raise InputError(f"--repo {args.repo}: not a TUF repository (`packager keys init` creates one)")
    from packager import keystore

    keystore.passphrase()  # the waves sign deployments: asked for now, not halfway through the rollout
    state = prepare(args.repo, args.name, version=args.bundle_version, group=args.group, fleet=args.fleet,
                    waves=waves, soak_s=soak, gate=args.gate, min_devices=args.min_devices,
                    min_requests=args.min_requests)
    pub.check_deployable(args.repo, args.group, state.bundle, args.no_encrypt)

    def emit(s: Any) -> None:
        print(json.dumps(status_json(s)) if args.json else _rollout_line(s), flush=True)

    client = _connect(args)
    try:
        return Controller(args.repo, state, client, emit=emit).run()
    finally:
        client.close()


def _ca(args: argparse.Namespace) -> int:
    from packager import fleet_ca, provision

    cmd = args.ca_command
    if cmd in ("issue", "acl"):
        provision.check_id("--fleet", args.fleet)
    if cmd in ("acl", "revoke", "list"):
        fleet_ca.require(args.repo)  # a missing CA is an error, not an empty answer
    if cmd == "init":
        fleet_ca.init_ca(args.repo)
        print(f"created the fleet CA {fleet_ca.ca_cert_path(args.repo)} (key encrypted, CRL "
              f"{fleet_ca.crl_path(args.repo)})")
    elif cmd == "issue":
        identity, cert, key = provision.issue_identity(args.repo, args.role, args.fleet, args.out, args.name)
        print(f"issued {identity}: {cert}, {key} (encrypted); use them as --cert-file/--key-file with --ca-file "
              f"{args.out / 'ca.pem'}")
        if args.role == "app":
            print("run `packager ca acl` again and reload the broker: the ACL names each app")
    elif cmd == "broker-cert":
        paths = provision.broker_files(args.repo, args.host, args.out)
        print(f"wrote {', '.join(str(p) for p in paths)}; mosquitto.conf:")
        print(provision.mosquitto_listener(8883, str(args.out.resolve()), "/etc/mosquitto/edgeship.acl"), end="")
    elif cmd == "acl":
        print(provision.acl_text(args.repo, args.fleet), end="")
    elif cmd == "revoke":
        try:
            serial = int(args.serial, 16)
        except ValueError as e:
            raise InputError(f"serial {args.serial!r}: expected hex digits") from e
        rec = provision.revoke_certificate(args.repo, serial)
        print(f"revoked {rec.identity} ({serial:x}); {_crl_advice(args.repo)}")
    else:
        for r in fleet_ca.issued(args.repo):
            print(f"{r.serial:x}  {r.role:<9} {r.identity}  issued {r.issued}" + (f"  REVOKED {r.revoked}"
                                                                                  if r.revoked else ""))
    return 0


def _crl_advice(repo: Path) -> str:
    from packager import fleet_ca

    return (f"copy {fleet_ca.crl_path(repo)} over the broker's crlfile, then restart Mosquitto: a SIGHUP makes 2.0 "
            "refuse new connections with the certificate but keeps the one already open (docs/security.md)")


def _grant(args: argparse.Namespace) -> int:
    from packager import publish as pub

    _check_transport_args(args)
    if not args.broker and args.http_dir is None:
        raise InputError("device grant needs --broker and/or --http-dir: the grants are pushed at once")
    client = _connect(args)
    try:
        changed, version = pub.grant(args.repo, args.device_id, client, pub.topics_for(args.fleet), args.http_dir)
    finally:
        if client is not None:
            client.close()
    what = ", ".join(changed) if changed else "nothing new (already granted, or no encrypted bundle for its group)"
    print(f"granted device {args.device_id}: {what}; pushed with timestamp v{version}")
    return 0


def _device(args: argparse.Namespace) -> int:
    import os
    from pathlib import PurePosixPath

    from packager import devices, provision

    if args.device_command == "add":
        broker = args.broker or os.environ.get("EDGESHIP_BROKER")
        if not broker:
            raise InputError("device add needs --broker mqtts://HOST:PORT (or EDGESHIP_BROKER)")
        p = provision.add_device(args.repo, args.device_id, args.group, args.out, broker, args.fleet,
                                 device_dir=PurePosixPath(args.device_dir), state_dir=PurePosixPath(args.state_dir),
                                 systemd_credentials=args.systemd_credentials)
        if p.created_ca:
            print(f"created the fleet CA in {args.repo / 'ca'}")
        if p.granted:
            print(f"granted {len(p.granted)} encrypted bundle(s) of group {args.group} to the device ("
                  f"{', '.join(p.granted)}); `packager device grant {args.device_id} --broker ...`, or the next "
                  "publish or refresh, pushes the grants")
        files = ", ".join(provision.FILES + ((provision.DROP_IN,) if args.systemd_credentials else ()))
        print(f"device {args.device_id} (group {args.group}, certificate {p.record.cert_serial:x}): {files} in "
              f"{p.out}; copy them to {args.device_dir} on the device (docs/security.md)")
        print("Mosquitto: no password file entry (use_identity_as_username: the certificate's CN is the user); "
              "the ACL's pattern lines already cover the device:")
        print("\n".join(line for line in provision.acl_text(args.repo, args.fleet).splitlines()
                        if line.startswith("pattern ")))
        return 0
    if args.device_command == "grant":
        return _grant(args)
    if args.device_command == "revoke":
        rec = provision.revoke_device(args.repo, args.device_id)
        print(f"revoked device {rec.device_id} (certificate {rec.cert_serial:x}); {_crl_advice(args.repo)}")
        return 0
    rows = devices.all_devices(args.repo)
    if args.json:
        print(json.dumps({"devices": [{"device_id": r.device_id, "group": r.group, "cert_serial": f"{r.cert_serial:x}",
                                       "added": r.added, "revoked": r.revoked} for r in rows]}))
    else:
        for r in rows:
            print(f"{r.device_id}  group {r.group}  certificate {r.cert_serial:x}  added {r.added}"
                  + (f"  REVOKED {r.revoked}" if r.revoked else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        commands = {"build": _build, "distill": _distill, "inspect": _inspect, "keys": _keys, "publish": _publish,
                    "refresh": _publish,
                    "unpublish": _publish, "fleet": _fleet, "rollout": _rollout,
                    "dashboard": _dashboard, "ca": _ca, "device": _device}
        return commands[args.command](args)
    except BundleRejected as e:
        print(f"packager: bundle rejected ({e.reason}): {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TransportError as e:
        print(f"packager: broker: {e}", file=sys.stderr)
        return EXIT_TRANSPORT
    except EdgeshipError as e:
        code = getattr(e, "exit_code", EXIT_BAD_INPUT)
        if args.command in ("build", "distill") and getattr(args, "json", False):
            print(json.dumps({"error": str(e), "exit_code": code}))
        print(f"packager: error: {e}", file=sys.stderr)
        return int(code)
    except RecursionError:
        # A guard, should a reader meet input nested deeper than Python recurses (JSON, protobuf).
        print("packager: error: input is nested too deeply to read", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("packager: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
