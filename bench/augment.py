"""Batch-level augmentation on the device: per-sample random crop with zero padding and flips.

No PIL, no per-sample Python: one gather per batch, on uint8 or float images alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bdbench.schema import Count


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding) for every image of ``x`` [N, C, H, W], each with its own offset."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=gen, device=gen.device).to(x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_hflip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen, device=gen.device).to(x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@dataclass(frozen=True, kw_only=True)
class Augment:
    """The training augmentation of a data set: crop with ``crop_padding`` and, if allowed, a flip."""

    crop_padding: Count
    hflip: bool

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = random_crop(x, self.crop_padding, gen)
        return random_hflip(x, gen) if self.hflip else x
