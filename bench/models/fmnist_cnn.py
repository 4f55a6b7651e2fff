"""The small BN CNN for 28x28x1 inputs: WaNet's ``NetC_MNIST`` layout (docs/attack_methods.md §1.2)."""

from __future__ import annotations

import math

from torch import nn

from bdbench.models.base import ImageClassifier, register_model


@register_model("fmnist_cnn")
class FmnistCNN(ImageClassifier):
    """conv(32, s2) → [BN→ReLU→conv(64, s2)] → [BN→ReLU→conv(64, s2)] → FC 512 → dropout 0.3 → FC."""

    groups = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes: int, shape, mean, std, *, normalize: bool | None) -> None:
        super().__init__(num_classes, shape, mean, std, normalize)
        c, h, w = self.shape
        self.layer1 = nn.Sequential(nn.Conv2d(c, 32, 3, 2, 1), nn.ReLU(inplace=True))
        self.layer2 = nn.Sequential(nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.Conv2d(32, 64, 3, 2, 1, bias=False))
        self.layer3 = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.Conv2d(64, 64, 3, 2, 1, bias=False))
        side = lambda n: math.ceil(math.ceil(math.ceil(n / 2) / 2) / 2)  # three stride-2 convs
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side(h) * side(w), 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(512, num_classes),
        )

    def forward_normalized(self, x):
        return self.classifier(self.layer3(self.layer2(self.layer1(x))))

    def conv_bn_pairs(self):
        return [(self.layer1[0], self.layer2[0]), (self.layer2[2], self.layer3[0])]
