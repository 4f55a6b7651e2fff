"""SIG (Barni, Kallas and Tondi, ICIP 2019): a clean-label attack that adds a horizontal sinusoid to target-class
training images and keeps their labels (docs/attack_methods.md §8)."""

from __future__ import annotations

import math

import torch

from attacks.base import StaticPoisonAttack, register_attack
from bench.data import ImageSet
from bench.schema import Count, NonNegative, Positive, Rate


@register_attack("sig")
class SIG(StaticPoisonAttack):
    """``x' = floor(clip(x + delta * sin(2 pi j f / W), 0, 255))`` over column j, on every row and channel, as
    BackdoorBench's ``sigTriggerAttack`` computes it on uint8 images.

    Poisoning is clean-label: ``round(poison_rate * N)`` images drawn among the target class (BackdoorBench's rule:
    the rate is of the whole training set), labels unchanged; capped at the target-class images outside the defender
    pool, which the report says. At test time every non-target image gets the same signal.
    """

    clean_label = True

    def __init__(self, *, target: Count, poison_rate: Rate, delta: NonNegative, f: Positive,
                 checkpoint: str | None) -> None:
        super().__init__(target=target, poison_rate=poison_rate)
        self.delta, self.f, self.checkpoint = delta, f, checkpoint
        self.pattern: torch.Tensor | None = None
        self.requested = 0

    def build(self, shape: tuple[int, int, int]) -> None:
        _, h, w = shape
        columns = torch.arange(w, dtype=torch.float64)
        row = (self.delta * torch.sin(2 * math.pi * columns * self.f / w)).float()
        self.pattern = row.expand(h, w).reshape(1, 1, h, w).contiguous()

    def prepare(self, train: ImageSet, candidates: torch.Tensor, gen: torch.Generator) -> ImageSet:
        own = candidates[train.y[candidates].to(candidates.device) == self.target]
        self.requested = round(self.poison_rate * len(train))
        order = torch.randperm(len(own), generator=gen).to(own.device)
        self.poison_indices = own[order[:self.requested]].sort().values
        self.build(tuple(train.x.shape[1:]))
        x = train.x.clone()
        x[self.poison_indices] = self.poison(x[self.poison_indices])
        return ImageSet(x, train.y.clone())

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            self.build(tuple(x.shape[1:]))
        return (x.float() + self.pattern.to(x.device)).clamp(0, 255).floor().to(torch.uint8)

    def state_dict(self):
        return {**super().state_dict(), "pattern": self.pattern, "requested": self.requested}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pattern, self.requested = state["pattern"], state["requested"]

    def report(self):
        poisoned = int(self.poison_indices.numel())
        capped = poisoned < self.requested
        return {**super().report(), "clean_label": True, "requested": self.requested,
                **({"deviation": f"{poisoned} of {self.requested} requested: every target-class image outside the "
                                 f"defender pool"} if capped else {})}
