"""Head-only fine-tuning: retrain the classifier's last linear layer on the clean images, the rest frozen.

A cheap baseline (the "fine-tune the last layer" row of several papers) written against bdbench's public
interface: ``Defense``, ``CleanData``, ``DefenseContext`` and the shared fine-tuning loop.
"""

from __future__ import annotations

from torch import nn

from bdbench.augment import Augment
from bdbench.defenses.base import CleanData, Defense, DefenseContext
from bdbench.defenses.finetune import Schedule, finetune


class HeadFineTuning(Defense):
    """Every value comes from the config (``conf/defense/head_ft.yaml``); bdbench checks the config against
    these hints before any compute and times ``repair`` on a copy of the model."""

    def __init__(self, *, schedule: Schedule, augment: Augment) -> None:
        self.schedule, self.augment = schedule, augment

    def repair(self, model: nn.Module, clean: CleanData, ctx: DefenseContext) -> dict:
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        report = finetune(model, clean, ctx, self.schedule, self.augment, params=list(head.parameters()),
                          desc="head_ft")
        return {**report, "parameters": sum(p.numel() for p in head.parameters())}
