"""Train :class:`DigitsCNN` on sklearn digits and write the artifacts ``packager build`` consumes.

``python -m examples.digits.train --out DIR [--epochs E] [--seed S] [--shift-labels K]`` writes into DIR:

- ``digits.pt2``: ``torch.export`` program (dynamic batch dimension), saved with ``torch.export.save``
- ``digits_state_dict.pt``: ``model.state_dict()`` via ``torch.save``
- ``digits.torchscript.pt``: ``torch.jit.trace`` of the eval-mode model
- ``calib.npz`` / ``eval.npz``: keys ``x`` (float32 [N, 1, 8, 8]) and ``y`` (int64 [N])

``--shift-labels K`` trains on the labels moved by K digits (``(y + K) % 10``; the data files keep the true ones):
the demo's deliberately bad version, a data-pipeline bug that raises no error. Such a model builds, quantizes
(int8 agrees with its own fp32 model, which is what ``packager build``'s gate compares), signs and passes every check
a device makes on its own; only labelled feedback from the field shows that it is wrong.

Every file is written to a temporary name in DIR and renamed into place, so an interrupted run never leaves a
half-written file under a final name. Progress goes to stderr through logging.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from examples.digits.data import Split, load_splits
from examples.digits.model import INPUT_SHAPE, DigitsCNN

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 15
BATCH_SIZE = 32
LEARNING_RATE = 2e-3
NUM_THREADS = 2
MAX_EXPORT_BATCH = 1024

ARTIFACT_NAMES: dict[str, str] = {
    "exported_program": "digits.pt2",
    "state_dict": "digits_state_dict.pt",
    "torchscript": "digits.torchscript.pt",
    "calib": "calib.npz",
    "eval": "eval.npz",
}


def _write_atomic(final: Path, serialize: Callable[[io.BytesIO], None]) -> Path:
    """Serialize into memory, write to a temporary file next to ``final``, fsync, then rename onto ``final``.

    Serializing to a buffer (not to the temporary path) keeps the bytes independent of the file name: torch.save
    otherwise records the file's stem inside the archive, which would make artifact hashes vary run to run.
    """
    buf = io.BytesIO()
    serialize(buf)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{final.name}", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary shareable artifacts
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _save_npz(buf: io.BytesIO, x: np.ndarray, y: np.ndarray) -> None:
    np.savez(buf, x=x, y=y)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def export_program(model: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` the eval-mode model with a dynamic batch dimension (static batch 1 if that fails)."""
    model.eval()
    example = torch.zeros((2, *INPUT_SHAPE), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch raises a variety of types for constraint violations
        log.warning("dynamic-batch export failed (%s); exporting with static batch 1", e)
        return torch.export.export(model, (example[:1],))


def train_model(
    epochs: int = DEFAULT_EPOCHS, seed: int = 0, splits: dict[str, Split] | None = None
) -> tuple[DigitsCNN, float]:
    """Train a fresh :class:`DigitsCNN` deterministically; return it (in eval mode) and its eval accuracy.

    ``splits`` defaults to ``load_splits(seed)``.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(NUM_THREADS)
    if splits is None:
        splits = load_splits(seed)
    x_train, y_train = (torch.from_numpy(a) for a in splits["train"])
    x_eval, y_eval = splits["eval"]

    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        scheduler.step()
        acc = evaluate(model, x_eval, y_eval)
        log.info("epoch %d/%d loss %.4f eval_acc %.4f", epoch, epochs, total / len(order), acc)
    model.eval()
    return model, evaluate(model, x_eval, y_eval)


def shifted(y: np.ndarray, k: int) -> np.ndarray:
    """Every label moved k digits on (k = 1: each digit called the next one)."""
    return ((y + k) % 10).astype(y.dtype)


def train_digits(out_dir: Path, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                 shift_labels: int = 0) -> dict[str, Path]:
    """Train :class:`DigitsCNN` and write its artifacts into ``out_dir`` (created if missing).

    Returns the written paths keyed like :data:`ARTIFACT_NAMES` (``exported_program``, ``state_dict``,
    ``torchscript``, ``calib``, ``eval``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    splits = load_splits(seed)
    taught = {name: (x, shifted(y, shift_labels)) for name, (x, y) in splits.items()}
    model, acc = train_model(epochs=epochs, seed=seed, splits=taught)
    train_seconds = time.perf_counter() - start

    paths = {key: out_dir / name for key, name in ARTIFACT_NAMES.items()}
    program = export_program(model)
    _write_atomic(paths["exported_program"], lambda buf: torch.export.save(program, buf))
    _write_atomic(paths["state_dict"], lambda buf: torch.save(model.state_dict(), buf))
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros((1, *INPUT_SHAPE), dtype=torch.float32))
    _write_atomic(paths["torchscript"], lambda buf: torch.jit.save(traced, buf))
    for key in ("calib", "eval"):
        x, y = splits[key]
        _write_atomic(paths[key], functools.partial(_save_npz, x=x, y=y))
    # Make the renames durable too.
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

    log.info(
        "digits: eval_acc %.4f (on the labels it was taught) train %.1fs total %.1fs epochs %d seed %d -> %s",
        acc,
        train_seconds,
        time.perf_counter() - start,
        epochs,
        seed,
        out_dir,
    )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.digits.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}")
    parser.add_argument("--seed", type=int, default=0, help="data split and init seed (default 0)")
    parser.add_argument("--shift-labels", type=int, default=0, metavar="K",
                        help="train on labels moved K digits on (a deliberately wrong model; default 0)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if not 0 <= args.shift_labels <= 9:
        parser.error("--shift-labels must be 0..9")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        train_digits(args.out, epochs=args.epochs, seed=args.seed, shift_labels=args.shift_labels)
    except OSError as e:
        log.error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
