"""Attention maps of the model's declared feature groups, shared by NAD and ARGD (docs/defense_methods.md §6.2, §7.3).

The taps are the outputs of ``model.groups`` (each model says which layers are its feature groups),
never a slice of ``children()``. AT with p = 2 (``at.py`` of the NAD and ARGD repositories): the
channel mean of |F|^p, normalised by its spatial L2 norm.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def attention(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """[B, C, H, W] -> [B, 1, H, W], each map with unit spatial L2 norm (+1e-6)."""
    am = feature.abs().pow(p).mean(1, keepdim=True)
    norm = am.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return am / (norm + 1e-6)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """MSE between the attention maps of two features (mean over B x H x W)."""
    return F.mse_loss(attention(student, p), attention(teacher, p))


@contextlib.contextmanager
def feature_taps(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs of the model's feature groups, refilled on every forward pass."""
    if not getattr(model, "groups", ()):
        raise TypeError(f"{type(model).__name__} declares no feature groups (``groups``); NAD and ARGD need them")
    features: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: features.append(o)) for m in model.group_modules()]
    try:
        yield features
    finally:
        for h in hooks:
            h.remove()


def forward_with_features(model: nn.Module, taps: list[torch.Tensor], x: torch.Tensor, last: int
                          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the last ``last`` group features of one forward pass."""
    taps.clear()
    logits = model(x)
    return logits, list(taps[-last:])
