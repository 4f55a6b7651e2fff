"""BadNets (Gu et al., arXiv 1708.06733): a white square stamped in a corner (attacks.md §2)."""

from __future__ import annotations

from typing import Literal

import torch

from attacks.base import StaticPoisonAttack, register_attack
from bench.schema import Count, Pixel, PositiveInt, Rate

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


@register_attack("badnets")
class BadNets(StaticPoisonAttack):
    """``x' = (1 - M) * x + M * value`` with M a ``size``x``size`` square ``margin`` px from the corner.

    BackdoorBench's trigger is a 3x3 white square flush with the bottom-right corner of 32x32
    images; on 28x28 the same square sits at rows/cols 25-27 (our choice, spec §2.1).
    """

    def __init__(self, *, target: Count, poison_rate: Rate, size: PositiveInt, margin: Count,
                 corner: Literal[CORNERS], value: Pixel) -> None:
        super().__init__(target=target, poison_rate=poison_rate)
        self.size, self.margin, self.corner, self.value = size, margin, corner, value
        self.mask: torch.Tensor | None = None

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        side = min(shape[1:])
        if self.size + self.margin > side:
            raise ValueError(f"attack.size={self.size} with attack.margin={self.margin} does not fit {shape[1]}x"
                             f"{shape[2]} images; valid: size + margin <= {side}")

    def build(self, shape: tuple[int, int, int]) -> None:
        _, h, w = shape
        mask = torch.zeros(1, 1, h, w, dtype=torch.bool)
        top = h - self.margin - self.size if self.corner.startswith("bottom") else self.margin
        left = w - self.margin - self.size if self.corner.endswith("right") else self.margin
        mask[..., top : top + self.size, left : left + self.size] = True
        self.mask = mask

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            self.build(tuple(x.shape[1:]))
        mask = self.mask.to(x.device)
        return torch.where(mask, torch.full_like(x, self.value), x)

    def state_dict(self):
        return {**super().state_dict(), "mask": self.mask}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.mask = state["mask"]
