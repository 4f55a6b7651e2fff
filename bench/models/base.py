"""The classifier interface every model implements, and the model registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import nn

from bdbench.registry import Registry


class ImageClassifier(nn.Module, ABC):
    """A classifier of float images in [0, 1], NCHW, that normalizes its input as its first op.

    Keeping normalization inside the model lets attacks, trigger reversal and synthesis work in
    pixel space, where triggers are defined. Each model declares:
      - ``groups``: names of the submodules whose outputs are its feature groups, shallow to deep
        (attention taps, feature hooks; the last is the last feature layer);
      - ``conv_bn_pairs()``: each BatchNorm with the conv whose output it normalizes, by graph.
    """

    groups: tuple[str, ...] = ()

    def __init__(self, num_classes: int, shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 normalize: bool | None) -> None:
        """``mean`` and ``std`` are the data set's; ``normalize=False`` makes the model read raw [0, 1] pixels, as
        the NAD/ARGD code trains its models (a checkpoint from it needs it); null = normalize, as BackdoorBench does."""
        super().__init__()
        self.num_classes = num_classes
        self.shape = tuple(shape)
        if normalize is False:
            mean, std = [0.0] * len(mean), [1.0] * len(std)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_normalized((x - self.mean) / self.std)

    @abstractmethod
    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalized images."""

    def conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        return []

    def group_modules(self) -> list[nn.Module]:
        return [self.get_submodule(name) for name in self.groups]


MODELS: Registry[ImageClassifier] = Registry("model", group="bdbench.models", builtins="bdbench.models")
register_model = MODELS.register


def create_model(name: str, **kwargs) -> ImageClassifier:
    return MODELS.create(name, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()
