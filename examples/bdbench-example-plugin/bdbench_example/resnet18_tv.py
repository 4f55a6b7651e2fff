"""torchvision's ResNet-18 as a bdbench model: the worked example of bdbench's model contract (docs/models.md).

The wrapper adds what the defenses need and torchvision's class does not say: the input normalization (bdbench's
models read [0, 1] pixels), the feature groups (attention taps for NAD and ARGD, the last one for FP, ShapPruning
and ℓ∞ pruning) and each BatchNorm with the conv it normalizes (CLP, the suspiciousness score, AR).
"""

from __future__ import annotations

from typing import Sequence

import torchvision
from torch import nn

from bdbench.models import ImageClassifier


class TorchvisionResNet18(ImageClassifier):
    """``torchvision.models.resnet18`` (no pretrained weights); ``small_inputs`` swaps its 7x7 stride-2 stem and
    max-pool for a 3x3 stride-1 conv, as CIFAR-sized ResNets do (a 32x32 image otherwise reaches layer4 at 1x1)."""

    groups = ("net.layer2", "net.layer3", "net.layer4")

    def __init__(self, num_classes: int, shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 normalize: bool | None = None, small_inputs: bool = True) -> None:
        super().__init__(num_classes, shape, mean, std, normalize)
        self.net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        if small_inputs:
            self.net.conv1 = nn.Conv2d(shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.net.maxpool = nn.Identity()
        elif shape[0] != 3:
            self.net.conv1 = nn.Conv2d(shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward_normalized(self, x):
        return self.net(x)

    def conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        pairs = [(self.net.conv1, self.net.bn1)]
        for layer in (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4):
            for block in layer:
                pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2)]
                if block.downsample is not None:
                    pairs.append((block.downsample[0], block.downsample[1]))
        return pairs
