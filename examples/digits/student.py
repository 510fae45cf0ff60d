"""A small student for :class:`examples.digits.model.DigitsCNN`, for `packager distill` (about 38k parameters,
under a fifth of the teacher's 218k): the same layout with half the convolution channels and a third of the
hidden units.

    packager distill --teacher DIR/digits.pt2 --student examples.digits.student:DigitsStudent \\
        --data DIR/train.npz --eval DIR/eval.npz --out DIR/student.pt2
"""

from __future__ import annotations

from examples.digits.model import NUM_CLASSES, DigitsCNN

HIDDEN = 64


# Named like a class: it is what `--student ...:DigitsStudent` builds, a DigitsCNN of its own size.
def DigitsStudent(num_classes: int = NUM_CLASSES) -> DigitsCNN:
    """Input float32 [B, 1, 8, 8] in [0, 1] (pixel / 16); output 10 logits [B, 10]."""
    return DigitsCNN(num_classes, channels=(16, 32), hidden=HIDDEN)
