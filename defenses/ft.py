"""FT: fine-tune all parameters on the clean images (defenses.md §7.1)."""

from __future__ import annotations

import copy

from bench.augment import Augment
from defenses.base import CleanData, Defense, DefenseContext, register_defense
from defenses.finetune import check_batchnorm, finetune


@register_defense("ft")
class FineTuning(Defense):
    """Cross-entropy fine-tuning, BackdoorBench's schedule (lr 0.01, cosine) under the step rule."""

    def __init__(self, epochs: int, batch_size: int, min_steps: int, lr: float, momentum: float,
                 weight_decay: float, augment: dict, batchnorm: str, grad_clip: float | None) -> None:
        check_batchnorm(batchnorm)
        self.kwargs = dict(epochs=epochs, batch_size=batch_size, min_steps=min_steps, lr=lr, momentum=momentum,
                           weight_decay=weight_decay, augment=Augment(**augment), batchnorm=batchnorm,
                           grad_clip=grad_clip)
        self._report: dict = {}

    def apply(self, model, clean: CleanData, ctx: DefenseContext):
        model = copy.deepcopy(model)
        self._report = finetune(model, clean, ctx, desc="ft", **self.kwargs)
        return model

    def report(self):
        return self._report
