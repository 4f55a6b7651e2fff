"""Head-only fine-tuning: retrain the classifier's last linear layer on the clean images, the rest frozen.

A cheap baseline (the "fine-tune the last layer" row of several papers) written against bdbench's public
interface: ``Defense``, ``CleanData``, ``DefenseContext`` and the shared fine-tuning loop.
"""

from __future__ import annotations

import copy

from torch import nn

from bench.augment import Augment
from defenses.base import CleanData, Defense, DefenseContext
from defenses.finetune import check_batchnorm, finetune


class HeadFineTuning(Defense):
    def __init__(self, *, epochs: int, batch_size: int, min_steps: int, lr: float, momentum: float,
                 weight_decay: float, augment: dict, batchnorm: str, grad_clip: float | None) -> None:
        check_batchnorm(batchnorm)
        self.schedule = dict(epochs=epochs, batch_size=batch_size, min_steps=min_steps, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, batchnorm=batchnorm, grad_clip=grad_clip)
        self.augment = Augment(**augment)
        self._report: dict = {}

    def apply(self, model: nn.Module, clean: CleanData, ctx: DefenseContext) -> nn.Module:
        model = copy.deepcopy(model)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        self._report = finetune(model, clean, ctx, augment=self.augment, params=list(head.parameters()),
                                desc="head_ft", **self.schedule)
        self._report["parameters"] = sum(p.numel() for p in head.parameters())
        return model

    def report(self) -> dict:
        return self._report
