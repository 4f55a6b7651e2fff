"""The classifier interface every model implements, and the model registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import nn

from bench.registry import Registry


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


KEEP = "bdbench_keep"  # the buffer name of a module's fixed 0/1 channel mask


def _apply_keep(module: nn.Module, _inputs, out: torch.Tensor) -> torch.Tensor:
    return out * getattr(module, KEEP).to(out.dtype).view(1, -1, *([1] * (out.dim() - 2)))


def channel_keep(module: nn.Module, channels: int) -> torch.Tensor:
    """A module's fixed 0/1 mask over its output channels, made on first use with the forward hook that applies it.

    A buffer, so it travels in the module's ``state_dict`` and is never trained: pruning is part of the weights a
    defense returns, and it silences channels no single parameter could (a residual block's output)."""
    if not hasattr(module, KEEP):
        param = next(module.parameters(), None)
        module.register_buffer(KEEP, torch.ones(channels, device=param.device if param is not None else None))
        module.register_forward_hook(_apply_keep)
    return getattr(module, KEEP)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The weights a defense returned, in the runner's own architecture: channel masks are the only entries they may
    add. Anything else that does not fit (a key, a shape) is refused, so no object a defense made is ever run."""
    for key, value in state.items():
        owner, _, name = key.rpartition(".")
        if name == KEEP and value.dim() == 1:
            try:
                channel_keep(model.get_submodule(owner), len(value))
            except AttributeError:
                raise ValueError(f"repaired weights: {key} names no module of {type(model).__name__}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ValueError(f"repaired weights do not fit {type(model).__name__}: {first}") from None
    return model


MODELS: Registry[ImageClassifier] = Registry("model", group="bdbench.models", builtins="bench.models")
register_model = MODELS.register


def create_model(name: str, **kwargs) -> ImageClassifier:
    return MODELS.create(name, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()
