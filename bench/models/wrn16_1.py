"""WRN-16-1, the student of NAD and ARGD (``bboylyg/NAD`` ``models/wresnet.py``; docs/defense_methods.md §1.1).

Zagoruyko & Komodakis' wide ResNet with pre-activation blocks: a 16-channel stem conv, three groups of
(depth - 4) / 6 blocks at 16k, 32k and 64k channels (strides 1, 2, 2), a final BN-ReLU, global average
pooling and a linear layer. 560 conv channels at depth 16, width 1 (1x1 shortcuts included).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch.nn.functional as F
from torch import nn

from bdbench.models.base import ImageClassifier, register_model
from bdbench.schema import PositiveInt, Range


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; where the width or stride changes, the shortcut is a 1x1 conv of
    the pre-activated input, else the input itself (as the NAD code)."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


@register_model("wrn16_1")
class WideResNet(ImageClassifier):
    groups = ("block1", "block2", "block3")

    def __init__(self, num_classes: int, shape, mean, std, *, normalize: bool | None,
                 depth: Annotated[int, Range(ge=10)], widen: PositiveInt,
                 drop_rate: Annotated[float, Range(ge=0, lt=1)]) -> None:
        super().__init__(num_classes, shape, mean, std, normalize)
        if (depth - 4) % 6:
            raise ValueError(f"model.depth={depth}; valid: 6n + 4 (10, 16, 22, 28, 40, ...)")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(self.shape[0], widths[0], 3, 1, 1, bias=False)
        groups = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [WideBlock(widths[i] if b == 0 else widths[i + 1], widths[i + 1], stride if b == 0 else 1, drop_rate)
                      for b in range(n)]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # the NAD code's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_normalized(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1))

    def conv_bn_pairs(self):
        """By graph: the stem feeds block1's first bn1, each block's conv1 feeds its bn2; the other BNs
        normalize residual sums, which no single conv produces."""
        pairs = [(self.conv1, self.block1[0].bn1)]
        for group in (self.block1, self.block2, self.block3):
            pairs += [(block.conv1, block.bn2) for block in group]
        return pairs
