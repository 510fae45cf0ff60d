"""A small student for :class:`examples.digits.model.DigitsCNN`, for `packager distill` (about 38k parameters,
under a fifth of the teacher's 218k): the same layout with half the convolution channels and a third of the
hidden units.

    packager distill --teacher DIR/digits.pt2 --student examples.digits.student:DigitsStudent \\
        --data DIR/train.npz --eval DIR/eval.npz --out DIR/student.pt2
"""

from __future__ import annotations

import torch
from torch import nn

from examples.digits.model import NUM_CLASSES

HIDDEN = 64


class DigitsStudent(nn.Module):
    """Input float32 [B, 1, 8, 8] in [0, 1] (pixel / 16); output 10 logits [B, 10]."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)
