"""What `--target` costs or buys: 7-bit vs 8-bit ONNX weights on the benchmark models, measured here.

    python benchmarks/target_bench.py [--out benchmarks/results/target.json] [--seeds N]

For digits (examples/digits), midcnn (examples/midcnn.py) and the foreign MobileNet-style graph the tests build
(tests/integration/foreign_onnx_models.py, prepared by packager/onnx_prepare.py), the fp32 ONNX model is quantized
with the build's first recipe (static QDQ, per-channel, min-max) twice: 7-bit weights (`--target any`/`x86-avx2`,
onnxruntime's reduce_range) and 8-bit (`--target x86-vnni`/`arm`). Each int8 model is scored on the evaluation
split two ways: with this host's int8 kernels, and on the emulation the build uses on saturating hosts (the QDQ
graph run op by op in float: what a non-saturating int8 kernel computes). On a host
with VNNI (or on Arm) the two agree; on an AVX2-only x86 host the 8-bit "host kernels" column shows saturation.

Figures: top-1 (%), top-1 agreement with fp32 (%), and the relative squared error of the logits against fp32
(||int8 - fp32||^2 / ||fp32||^2: finer than top-1, which moves by 1/360 per sample). Each model is trained with
`--seeds` seeds (default 3); the tables give every seed. Exit 0 (a measurement), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import load_average, machine_info, write_json

log = logging.getLogger("target_bench")


def _scores(path: Path, x: np.ndarray, y: np.ndarray, ref: np.ndarray | None, emulated: bool = False
            ) -> dict[str, float]:
    from agent.runtime.onnx_session import OnnxSession
    from packager.onnx_quant import emulation_session

    session = emulation_session(path) if emulated else OnnxSession(path)
    out = session.run({"x": x})[0].astype(np.float64)
    d: dict[str, float] = {"top1": float((out.argmax(1) == y).mean() * 100)}
    if ref is not None:
        d["agree"] = float((out.argmax(1) == ref.argmax(1)).mean() * 100)
        d["rel_sq_err"] = float(np.sum((out - ref) ** 2) / np.sum(ref**2))
    return d


def measure(name: str, fp32: Path, calib: np.ndarray, x: np.ndarray, y: np.ndarray, work: Path) -> dict[str, Any]:
    from agent.runtime.onnx_session import OnnxSession
    from packager import onnx_quant

    ref = OnnxSession(fp32).run({"x": x})[0].astype(np.float64)
    row: dict[str, Any] = {"fp32": _scores(fp32, x, y, None)}
    for bits, rr in ((7, True), (8, False)):
        recipe = onnx_quant.first_recipe(fp32, reduce_range=rr)
        q = work / f"{name}.w{bits}.onnx"
        onnx_quant.quantize(fp32, recipe, {"x": calib}, q)
        row[f"w{bits}"] = {"recipe": recipe.name, "host_kernels": _scores(q, x, y, ref),
                           "emulated": _scores(q, x, y, ref, emulated=True)}
    return row


def _digits(seed: int, work: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    from examples.digits.train import train_digits
    from packager.onnx_export import export_onnx
    from packager.torch_model import example_args, load_source

    paths = train_digits(work / f"digits-{seed}", seed=seed)
    c, e = np.load(paths["calib"]), np.load(paths["eval"])
    src = load_source(str(paths["exported_program"]), None)
    out = work / f"digits-{seed}.onnx"
    export_onnx(src.module, example_args(src, {"x": c["x"][:1]}), src.input_names, out)
    return out, c["x"], e["x"], e["y"]


def _midcnn(seed: int, work: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    import torch

    from examples.midcnn import train_midcnn
    from packager.onnx_export import export_onnx

    model, splits = train_midcnn(seed=seed)
    out = work / f"midcnn-{seed}.onnx"
    export_onnx(model, (torch.from_numpy(splits["eval"][0][:1]),), ["x"], out)
    return out, splits["calib"][0], splits["eval"][0], splits["eval"][1]


def _foreign(seed: int, work: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    import onnx

    from examples.digits.data import load_splits
    from packager.onnx_prepare import prepare
    from tests.integration.foreign_onnx_models import build_classifier, upsample

    s = load_splits(seed)
    raw = work / f"foreign-{seed}.raw.onnx"
    onnx.save(build_classifier(upsample(s["train"][0], 2), s["train"][1], seed=seed, width=32), str(raw))
    out = work / f"foreign-{seed}.onnx"
    prepare(raw, out)
    return out, upsample(s["calib"][0], 2), upsample(s["eval"][0], 2), s["eval"][1]


MODELS = {"digits": _digits, "midcnn": _midcnn, "foreign": _foreign}


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| model | seed | fp32 top-1 | 7-bit top-1 | 8-bit top-1 | 7-bit agree | 8-bit agree | 7-bit rel. sq. err "
             "| 8-bit rel. sq. err | 8-bit host kernels top-1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for seed, r in enumerate(rows):
            w7, w8 = r["w7"]["emulated"], r["w8"]["emulated"]
            lines.append(f"| {name} | {seed} | {r['fp32']['top1']:.2f} | {w7['top1']:.2f} | {w8['top1']:.2f} | "
                         f"{w7['agree']:.2f} | {w8['agree']:.2f} | {w7['rel_sq_err']:.2e} | {w8['rel_sq_err']:.2e} | "
                         f"{r['w8']['host_kernels']['top1']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/target.json"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", default=",".join(MODELS))
    args = p.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    if args.seeds < 1 or any(m not in MODELS for m in only):
        print(f"target_bench: --seeds >= 1, --only from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("packager", "torch", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0, load0 = time.perf_counter(), load_average()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="edgeship-target-") as td:
        for name in only:
            results[name] = []
            for seed in range(args.seeds):
                log.info("[%s] seed %d", name, seed)
                work = Path(td) / f"{name}-{seed}"
                work.mkdir()
                fp32, calib, x, y = MODELS[name](seed, work)
                results[name].append(measure(name, fp32, calib, x, y, work))
    print(table(results))
    write_json(args.out, {
        "benchmark": "target", "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/target_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "duration_seconds": round(time.perf_counter() - t0, 1), "machine": machine_info(),
        "load_average": {"start": load0, "end": load_average()}, "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
