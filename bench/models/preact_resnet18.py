"""PreAct-ResNet18 as in BackdoorBench ``models/preact_resnet.py`` (docs/attack_methods.md §1.2): the paper model."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from bdbench.models.base import ImageClassifier, register_model


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


@register_model("preact_resnet18")
class PreActResNet18(ImageClassifier):
    """Stem conv, 4 stages x 2 PreAct blocks (64/128/256/512), no final BN, average pool, linear."""

    groups = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int, shape, mean, std, *, normalize: bool | None) -> None:
        super().__init__(num_classes, shape, mean, std, normalize)
        self.conv1 = nn.Conv2d(self.shape[0], 64, 3, 1, 1, bias=False)
        widths, c_in, stages = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(PreActBlock(c_in, w, 1 if i == 0 else 2), PreActBlock(w, w, 1)))
            c_in = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward_normalized(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).flatten(1))

    def conv_bn_pairs(self):
        """Pairs by graph: the stem feeds layer1's first bn1; in each block conv1 feeds bn2.

        Other bn1s normalize a residual sum, which no single conv produces, so CLP skips them.
        """
        pairs = [(self.conv1, self.layer1[0].bn1)]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            pairs += [(block.conv1, block.bn2) for block in stage]
        return pairs
