"""Fast checks of the example models and data (examples/): shapes, determinism, masks, parameter budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from examples.bert_encoder import HIDDEN, PAD_ID, TinyBertEncoder, make_tiny_bert, random_token_batch
from examples.digits.data import load_splits
from examples.digits.model import DigitsCNN
from examples.digits.train import ARTIFACT_NAMES, train_digits
from examples.midcnn import MidResNet, digits32_splits


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return load_splits(seed=0)


@pytest.fixture(scope="module")
def bert() -> TinyBertEncoder:
    return make_tiny_bert(seed=0)


def test_load_splits_shapes_dtypes_and_range(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    assert {name: len(y) for name, (_, y) in splits.items()} == {"train": 1077, "calib": 360, "eval": 360}
    for x, y in splits.values():
        assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and x.shape[0] == y.shape[0]
        assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
        assert x.min() >= 0.0 and x.max() <= 1.0


def test_load_splits_are_disjoint(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    # The 1797 digits images are all distinct, so disjoint rows means disjoint samples.
    rows = {name: {r.tobytes() for r in x} for name, (x, _) in splits.items()}
    assert sum(len(r) for r in rows.values()) == 1797
    assert not rows["train"] & rows["calib"]
    assert not rows["train"] & rows["eval"]
    assert not rows["calib"] & rows["eval"]


def test_load_splits_are_stratified(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    for name in ("calib", "eval"):
        counts = np.bincount(splits[name][1], minlength=10)
        assert counts.min() >= 34 and counts.max() <= 38, (name, counts)


def test_load_splits_is_deterministic(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    again = load_splits(seed=0)
    for name, (x, y) in splits.items():
        np.testing.assert_array_equal(again[name][0], x)
        np.testing.assert_array_equal(again[name][1], y)
    assert not np.array_equal(load_splits(seed=1)["eval"][1], splits["eval"][1])


def test_digits_cnn_size_and_output() -> None:
    model = DigitsCNN().eval()
    assert 100_000 <= _n_params(model) <= 250_000
    with torch.no_grad():
        out = model(torch.rand(5, 1, 8, 8))
    assert out.shape == (5, 10) and out.dtype == torch.float32


def test_train_digits_writes_artifacts_atomically(tmp_path: Path) -> None:
    paths = train_digits(tmp_path, epochs=1)
    assert {p.name for p in paths.values()} == set(ARTIFACT_NAMES.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ARTIFACT_NAMES.values())  # no temp files left
    for key in ("calib", "eval"):
        with np.load(paths[key]) as npz:
            assert set(npz.files) == {"x", "y"} and npz["x"].shape == (360, 1, 8, 8)
    program = torch.export.load(paths["exported_program"])
    assert program.module()(torch.rand(3, 1, 8, 8)).shape == (3, 10)  # dynamic batch
    state = torch.load(paths["state_dict"], weights_only=True)
    DigitsCNN().load_state_dict(state)


def test_mid_resnet_size_and_output() -> None:
    model = MidResNet().eval()
    assert _n_params(model) >= 1_000_000
    with torch.no_grad():
        out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 10)


def test_digits32_splits_upsample() -> None:
    up = digits32_splits(seed=0)
    small = load_splits(seed=0)
    for name, (x, y) in up.items():
        assert x.dtype == np.float32 and x.shape == (len(small[name][1]), 1, 32, 32)
        np.testing.assert_array_equal(y, small[name][1])
        assert x.min() >= -1e-6 and x.max() <= 1.0 + 1e-6


def test_random_token_batch_shapes_padding_and_determinism() -> None:
    batch = random_token_batch(8, seq_len=32, seed=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (8, 32) and ids.dtype == mask.dtype == np.int64
    assert (mask == 0).any() and set(np.unique(mask)) <= {0, 1}
    assert (ids[mask == 0] == PAD_ID).all() and (ids[mask == 1] != PAD_ID).all()
    assert ids.max() < 8000
    again = random_token_batch(8, seq_len=32, seed=3)
    np.testing.assert_array_equal(again["input_ids"], ids)


def test_tiny_bert_output_shape(bert: TinyBertEncoder) -> None:
    batch = {k: torch.from_numpy(v) for k, v in random_token_batch(3, seq_len=16).items()}
    with torch.no_grad():
        out = bert(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (3, HIDDEN) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _n_params(bert) > 4_000_000


def test_tiny_bert_is_seed_deterministic(bert: TinyBertEncoder) -> None:
    other = make_tiny_bert(seed=0)
    for (name, a), (_, b) in zip(bert.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(make_tiny_bert(seed=1).token_embedding.weight, bert.token_embedding.weight)


def test_tiny_bert_padding_does_not_change_embedding(bert: TinyBertEncoder) -> None:
    batch = random_token_batch(4, seq_len=32, seed=7)
    ids, mask = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
    with torch.no_grad():
        padded = bert(ids, mask)
        # Whatever sits in the padded positions is ignored...
        noisy = ids.clone()
        noisy[mask == 0] = 1234
        assert torch.allclose(bert(noisy, mask), padded, atol=1e-5)
        # ...and each sentence alone, unpadded, embeds the same as in the padded batch.
        for row in range(ids.shape[0]):
            length = int(mask[row].sum())
            alone = bert(ids[row : row + 1, :length], mask[row : row + 1, :length])
            assert torch.allclose(alone[0], padded[row], atol=1e-5), row
        # Unmasking the padding does change it: the mask is actually used.
        assert not torch.allclose(bert(noisy, torch.ones_like(mask)), padded, atol=1e-3)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    from examples.digits.train import _write_atomic

    def boom(buf: object) -> None:
        raise RuntimeError("interrupted")

    (tmp_path / "digits.pt2").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        _write_atomic(tmp_path / "digits.pt2", boom)
    assert [p.name for p in tmp_path.iterdir()] == ["digits.pt2"]
    assert (tmp_path / "digits.pt2").read_bytes() == b"old"


# --- the demo (examples/demo*.py) -------------------------------------------------------------------------------


def test_demo_devices_fill_one_wave_each() -> None:
    from examples.demo_fleet import DEVICES, WAVES, wave_of

    assert sorted(wave_of(d) for d in DEVICES) == list(range(1, len(WAVES) + 1))


def test_mislabelled_labels_are_all_wrong_and_still_every_digit() -> None:
    from examples.digits.train import shifted

    y = np.arange(10, dtype=np.int64).repeat(3)
    assert (shifted(y, 0) == y).all()
    bad = shifted(y, 1)
    assert bad.dtype == y.dtype and not (bad == y).any() and sorted(set(bad.tolist())) == list(range(10))


def _gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still alive (not a zombie) after up to `timeout` s."""
    import time

    import psutil

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def _read_pid(path: Path, timeout: float = 10.0) -> int:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.endswith("\n"):
            return int(text)
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written")


def test_children_stop_all_stops_stubborn_children_and_their_groups(tmp_path: Path) -> None:
    """A child that ignores SIGTERM is SIGKILLed after the timeout; a child that exited leaving a process behind in
    its group (as a daemon's helper would) has that process stopped too; the order is latest first."""
    import time

    from examples.demo_procs import Children

    children = Children(stop_timeout=1.0)
    plain = children.start("plain", ["sleep", "60"])
    stubborn = children.start("stubborn", ["sh", "-c", "trap '' TERM; sleep 60"])  # sleep inherits the ignore
    grand = tmp_path / "grandchild.pid"
    children.start("leader", ["sh", "-c", f"sleep 60 & echo $! > {grand}.tmp && mv {grand}.tmp {grand}"])
    grandchild = _read_pid(grand)
    deadline = time.monotonic() + 10
    while "leader" in children.running and time.monotonic() < deadline:  # exits at once (not reaped: no wait())
        time.sleep(0.02)
    assert children.running == ["plain", "stubborn"]
    assert _gone([grandchild], timeout=0) == [grandchild]  # its background sleep stays in its process group
    children.stop_all()
    assert _gone([plain.pid, stubborn.pid, grandchild]) == []
    assert plain.returncode == -15 and stubborn.returncode == -9
    assert children.running == [] and children.pids() == []
    children.stop_all()  # twice is harmless


def test_children_run_streams_output_and_checks_the_status(capsys: pytest.CaptureFixture[str]) -> None:
    from examples.demo_procs import Children, StepFailed

    with Children() as children:
        code, out = children.run(["sh", "-c", "echo one; echo two; exit 3"], ok=(3,))
        assert (code, out) == (3, "one\ntwo\n")
        assert capsys.readouterr().out == "one\ntwo\n"
        with pytest.raises(StepFailed, match="exit status 3"):
            children.run(["sh", "-c", "exit 3"])
        assert children.pids() == []  # finished steps are forgotten


_INTERRUPTED_SCRIPT = """
import sys
from examples.demo_procs import Children, Interrupted, stop_signals_raise

with stop_signals_raise():
    children = Children(stop_timeout=5.0)
    try:
        children.start("background", ["sh", "-c", "sleep 60 & exec sleep 60"])
        children.run(["sh", "-c", "echo running; sleep 60 & exec sleep 60"])
    except Interrupted as e:
        print(f"interrupted by {e}", flush=True)
        sys.exit(130)
    finally:
        children.stop_all()
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_mid_step_leaves_no_process_behind(sig: str) -> None:
    """The demo's pattern (examples/demo.py main) in a real process: a background child and a foreground step, each
    with a child of its own; the signal arrives while the step runs; every one of the five processes is gone."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_SCRIPT], cwd=repo, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "running\n"
        deadline = time.monotonic() + 10
        while len(psutil.Process(proc.pid).children(recursive=True)) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        descendants = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(descendants) == 4, descendants  # per child: a sleep in the background and the shell exec'd as one
        proc.send_signal(getattr(signal, sig))
        rest, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and rest == f"interrupted by {sig}\n"
    assert _gone(descendants) == []
