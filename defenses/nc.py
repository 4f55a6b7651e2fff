"""Neural Cleanse with unlearning (Wang et al., S&P 2019; BackdoorBench ``nc``; docs/defense_methods.md §7.5).

Reverse every label's trigger, detect the target by MAD, then fine-tune on the clean images with a
share of them stamped with the detected trigger and kept at their true label, so the model unlearns
the trigger. When nothing is flagged the reversal's ``when_undetected`` decides (``skip``, BackdoorBench:
the model is returned unchanged); the record says which happened.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bdbench.augment import Augment
from bdbench.schema import Fraction
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense
from bdbench.defenses.finetune import Schedule, finetune
from bdbench.defenses.reversal import TriggerReversal


@register_defense("nc")
class NeuralCleanse(Defense):
    def __init__(self, *, reversal: TriggerReversal, augment: Augment, unlearning_ratio: Fraction,
                 schedule: Schedule) -> None:
        self.reversal, self.augment, self.unlearning_ratio, self.schedule = reversal, augment, unlearning_ratio, schedule

    def repair(self, model, clean: CleanData, ctx: DefenseContext) -> dict:
        rev = self.reversal(model, clean, self.augment, ctx)
        report = {**rev.report(), "unlearned": False}
        if rev.act:
            mask, pattern = rev.masks[rev.target].detach(), rev.patterns[rev.target].detach()

            def unlearning_loss(m, x, y):
                stamped = torch.rand(len(x), device=x.device) < self.unlearning_ratio
                x = torch.where(stamped[:, None, None, None], (1 - mask) * x + mask * pattern, x)
                return F.cross_entropy(m(x), y)

            report["finetune"] = finetune(model, clean, ctx, self.schedule, self.augment, loss_fn=unlearning_loss,
                                          desc="nc unlearning")
            report["unlearned"] = True
        return report
