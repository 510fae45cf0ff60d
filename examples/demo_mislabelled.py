"""The demo's deliberately bad version: the digits CNN trained on labels shifted by one (`(y + 1) % 10`), the kind
of bug a data pipeline makes without a single error.

The model is as good as the real one at what it learned, so it builds, quantizes (int8 agrees with fp32, which is
what `packager build`'s gate compares), signs and deploys like any other, and it passes every check a device makes
on its own: its golden outputs are its own, its latency and error rate are the same. Only labelled feedback from
the field shows that it is wrong, and that is what the rollout's `accuracy` gate reads.

    python -m examples.demo_mislabelled --out DIR [--epochs E] [--seed S]

writes DIR/digits-mislabelled.pt2 (a `torch.export` program, like examples.digits.train's digits.pt2).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from examples.digits.data import load_splits
from examples.digits.train import export_program, train_model

log = logging.getLogger(__name__)

ARTIFACT = "digits-mislabelled.pt2"
DEFAULT_EPOCHS = 6


def shifted(y: np.ndarray) -> np.ndarray:
    """The bug: every label moved to the next digit."""
    return ((y + 1) % 10).astype(y.dtype)


def train_mislabelled(out_dir: Path, epochs: int = DEFAULT_EPOCHS, seed: int = 0) -> Path:
    """Train on the shifted labels and write the exported program; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_splits(seed)
    bad = {name: (x, shifted(y)) for name, (x, y) in splits.items()}
    model, acc_on_its_labels = train_model(epochs=epochs, seed=seed, splits=bad)
    x_eval, y_eval = splits["eval"]
    with torch.no_grad():
        pred = model(torch.from_numpy(x_eval)).argmax(dim=1).numpy()
    log.info("mislabelled digits: eval accuracy %.4f on its own (shifted) labels, %.4f on the true ones",
             acc_on_its_labels, float((pred == y_eval).mean()))
    path = out_dir / ARTIFACT
    tmp = out_dir / f".tmp-{ARTIFACT}"
    torch.export.save(export_program(model), str(tmp))
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo_mislabelled",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}")
    parser.add_argument("--seed", type=int, default=0, help="data split and init seed (default 0)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        train_mislabelled(args.out, epochs=args.epochs, seed=args.seed)
    except OSError as e:
        log.error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
