"""A small CNN for the 8x8 sklearn digits.

Only plain ops (Conv2d, ReLU, MaxPool2d, Linear, flatten) so that ``torch.export``, the ONNX dynamo exporter and
litert-torch all handle it. About 218k parameters: big enough that int8 weights dominate the file size.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE: tuple[int, int, int] = (1, 8, 8)
NUM_CLASSES = 10
# 192 rather than 128: graph overhead (per-channel scales, int32 biases, exporter metadata) is ~17 kB whatever
# the size, so more weight bytes are needed for int8 ONNX to come in under 0.27x the fp32 file.
HIDDEN = 192


class DigitsCNN(nn.Module):
    """Input float32 [B, 1, 8, 8] in [0, 1] (pixel / 16); output 10 logits [B, 10]."""

    def __init__(self, num_classes: int = NUM_CLASSES, *, channels: tuple[int, int] = (32, 64),
                 hidden: int = HIDDEN) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(channels[1] * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) in ``model``."""
    return sum(p.numel() for p in model.parameters())
