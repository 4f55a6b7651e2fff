"""FT: fine-tune all parameters on the clean images (docs/defense_methods.md §7.1)."""

from __future__ import annotations

from bdbench.augment import Augment
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense
from bdbench.defenses.finetune import Schedule, finetune


@register_defense("ft")
class FineTuning(Defense):
    """Cross-entropy fine-tuning, BackdoorBench's schedule (lr 0.01, cosine) under the step rule."""

    def __init__(self, *, schedule: Schedule, augment: Augment) -> None:
        self.schedule, self.augment = schedule, augment

    def repair(self, model, clean: CleanData, ctx: DefenseContext) -> dict:
        return finetune(model, clean, ctx, self.schedule, self.augment, desc="ft")
