"""A BadNets-style attack whose trigger is a black-and-white checkerboard in the top-left corner."""

from __future__ import annotations

import torch

from attacks.base import StaticPoisonAttack


class Checkerboard(StaticPoisonAttack):
    """``size`` x ``size`` checkerboard (alternating 0 and 255) stamped at the top-left corner."""

    def __init__(self, *, target: int, poison_rate: float, size: int) -> None:
        super().__init__(target, poison_rate)
        if not 2 <= size <= 8:
            raise ValueError(f"attack.size={size}; valid: 2..8")
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
