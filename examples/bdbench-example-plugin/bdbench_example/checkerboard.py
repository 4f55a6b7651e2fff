"""A BadNets-style attack whose trigger is a black-and-white checkerboard in the top-left corner."""

from __future__ import annotations

from typing import Annotated

import torch

from bdbench.attacks.base import StaticPoisonAttack
from bdbench.schema import Count, Range, Rate


class Checkerboard(StaticPoisonAttack):
    """``size`` x ``size`` checkerboard (alternating 0 and 255) stamped at the top-left corner."""

    def __init__(self, *, target: Count, poison_rate: Rate, size: Annotated[int, Range(ge=2, le=8)]) -> None:
        super().__init__(target=target, poison_rate=poison_rate)
        self.size = size
        self.pattern: torch.Tensor | None = None

    def build(self, shape: tuple[int, int, int]) -> None:
        rows, cols = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
        self.pattern = (((rows + cols) % 2) * 255).to(torch.uint8)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            self.build(tuple(x.shape[1:]))
        x = x.clone()
        x[..., : self.size, : self.size] = self.pattern.to(x.device)
        return x

    def state_dict(self):
        return {**super().state_dict(), "pattern": self.pattern}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pattern = state["pattern"]
