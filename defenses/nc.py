"""Neural Cleanse with unlearning (Wang et al., S&P 2019; BackdoorBench ``nc``; defenses.md §7.5).

Reverse every label's trigger, detect the target by MAD, then fine-tune on the clean images with a
share of them stamped with the detected trigger and kept at their true label, so the model unlearns
the trigger. When nothing is flagged the reversal's ``when_undetected`` decides (``skip``, BackdoorBench:
the model is returned unchanged); the record says which happened.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from bench.augment import Augment
from defenses.base import CleanData, Defense, DefenseContext, register_defense
from defenses.finetune import check_batchnorm, finetune
from defenses.reversal import TriggerReversal

@register_defense("nc")
class NeuralCleanse(Defense):
    def __init__(self, reversal: dict, augment: dict, unlearning_ratio: float = 0.2,
                 epochs: int = 100, batch_size: int = 256, min_steps: int = 300, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batchnorm: str = "train",
                 grad_clip: float | None = None) -> None:
        check_batchnorm(batchnorm)
        if not 0 <= unlearning_ratio <= 1:
            raise ValueError(f"nc unlearning_ratio={unlearning_ratio}; valid: a fraction in [0, 1]")
        self.reversal, self.augment = TriggerReversal(**reversal), Augment(**augment)
        self.unlearning_ratio = unlearning_ratio
        self.ft = dict(epochs=epochs, batch_size=batch_size, min_steps=min_steps, lr=lr, momentum=momentum,
                       weight_decay=weight_decay, batchnorm=batchnorm, grad_clip=grad_clip)
        self._report: dict = {}

    def apply(self, model, clean: CleanData, ctx: DefenseContext):
        start = time.perf_counter()
        model = copy.deepcopy(model).eval()
        rev = self.reversal(model, clean, self.augment, ctx)
        self._report = {**rev.report(), "unlearned": False}
        if rev.act:
            mask, pattern = rev.masks[rev.target].detach(), rev.patterns[rev.target].detach()

            def unlearning_loss(m, x, y):
                stamped = torch.rand(len(x), device=x.device) < self.unlearning_ratio
                x = torch.where(stamped[:, None, None, None], (1 - mask) * x + mask * pattern, x)
                return F.cross_entropy(m(x), y)

            self._report["finetune"] = finetune(model, clean, ctx, augment=self.augment, loss_fn=unlearning_loss,
                                                desc="nc unlearning", **self.ft)
            self._report["unlearned"] = True
        self._report["seconds"] = time.perf_counter() - start
        return model

    def report(self):
        return self._report
