"""SIG (Barni, Kallas and Tondi, ICIP 2019): a clean-label attack that adds a horizontal sinusoid to target-class
training images and keeps their labels (docs/attack_methods.md §8)."""

from __future__ import annotations

import math

import torch

from bdbench.attacks.base import register_attack
from bdbench.attacks.clean_label import CleanLabelAttack
from bdbench.schema import Count, NonNegative, Positive, Rate


@register_attack("sig")
class SIG(CleanLabelAttack):
    """``x' = floor(clip(x + delta * sin(2 pi j f / W), 0, 255))`` over column j, on every row and channel, as
    BackdoorBench's ``sigTriggerAttack`` computes it on uint8 images, on the target-class images ``CleanLabelAttack``
    draws and on every non-target test image.
    """

    def __init__(self, *, target: Count, poison_rate: Rate, delta: NonNegative, f: Positive,
                 checkpoint: str | None) -> None:
        super().__init__(target=target, poison_rate=poison_rate)
        self.delta, self.f, self.checkpoint = delta, f, checkpoint
        self.pattern: torch.Tensor | None = None

    def build(self, shape: tuple[int, int, int]) -> None:
        _, h, w = shape
        columns = torch.arange(w, dtype=torch.float64)
        row = (self.delta * torch.sin(2 * math.pi * columns * self.f / w)).float()
        self.pattern = row.expand(h, w).reshape(1, 1, h, w).contiguous()

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            self.build(tuple(x.shape[1:]))
        return (x.float() + self.pattern.to(x.device)).clamp(0, 255).floor().to(torch.uint8)

    def state_dict(self):
        return {**super().state_dict(), "pattern": self.pattern}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pattern = state["pattern"]
