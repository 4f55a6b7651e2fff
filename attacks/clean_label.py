"""What clean-label attacks share: BackdoorBench's selection of the images they poison, and no label changed."""

from __future__ import annotations

import torch

from bdbench.attacks.base import StaticPoisonAttack
from bdbench.data import ImageSet


class CleanLabelAttack(StaticPoisonAttack):
    """Poisons ``round(poison_rate * N)`` images drawn among the target class (BackdoorBench's rule: the rate is of
    the whole training set) and keeps every label; capped at the target-class images outside the defender pool, which
    the report says. At test time every non-target image gets the trigger."""

    clean_label = True

    def __init__(self, *, target: int, poison_rate: float) -> None:
        super().__init__(target=target, poison_rate=poison_rate)
        self.requested = 0

    def select(self, train: ImageSet, candidates: torch.Tensor, gen: torch.Generator) -> None:
        own = candidates[train.y[candidates].to(candidates.device) == self.target]
        self.requested = round(self.poison_rate * len(train))
        order = torch.randperm(len(own), generator=gen).to(own.device)
        self.poison_indices = own[order[:self.requested]].sort().values
        self.build(tuple(train.x.shape[1:]))

    def prepare(self, train: ImageSet, candidates: torch.Tensor, gen: torch.Generator) -> ImageSet:
        self.select(train, candidates, gen)
        x = train.x.clone()
        x[self.poison_indices] = self.poison(x[self.poison_indices])
        return ImageSet(x, train.y.clone())

    def state_dict(self):
        return {**super().state_dict(), "requested": self.requested}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.requested = state["requested"]

    def report(self):
        poisoned = int(self.poison_indices.numel())
        capped = poisoned < self.requested
        return {**super().report(), "clean_label": True, "requested": self.requested,
                **({"deviation": f"{poisoned} of {self.requested} requested: every target-class image outside the "
                                 f"defender pool"} if capped else {})}
