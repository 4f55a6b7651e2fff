"""A compact BN CNN for 32x32x3 inputs that trains in minutes on two CPU cores (no reference numbers)."""

from __future__ import annotations

from torch import nn

from bdbench.models.base import ImageClassifier, register_model
from bdbench.schema import PositiveInt


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


@register_model("cifar_cnn")
class CifarCNN(ImageClassifier):
    """Three stages of two conv-BN-ReLU (widths 32, 64, 128) with max-pooling, global pool, linear."""

    groups = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes: int, shape, mean, std, *, normalize: bool | None, width: PositiveInt) -> None:
        super().__init__(num_classes, shape, mean, std, normalize)
        c = self.shape[0]
        self.layer1 = _stage(c, width)
        self.layer2 = _stage(width, 2 * width)
        self.layer3 = _stage(2 * width, 4 * width)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward_normalized(self, x):
        return self.classifier(self.layer3(self.layer2(self.layer1(x))))

    def conv_bn_pairs(self):
        return [(s[i], s[i + 1]) for s in (self.layer1, self.layer2, self.layer3) for i in (0, 3)]
