"""No attack: clean training, the reference for clean accuracy."""

from __future__ import annotations

import torch

from bdbench.attacks.base import Attack, register_attack


@register_attack("none")
class NoAttack(Attack):
    """Trains on clean data; there is no trigger, so ASR and RA are undefined (null in records)."""

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x
