"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018; BackdoorBench ``fp``; docs/defense_methods.md §7.2).

Backdoor channels lie dormant on clean inputs: rank the last feature group's channels by their mean
activation on the clean images, mask the most dormant ones cumulatively (1 % of the layer per step)
while the clean accuracy on the augmented clean images stays within ``acc_ratio`` (relative) of the
original, then fine-tune with the masks fixed. BackdoorBench measures that accuracy on the test set;
we never do.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch

from bdbench.augment import Augment
from bdbench.device import autocast
from bdbench.schema import Fraction, PositiveInt, Range, Rate
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense
from bdbench.defenses.finetune import Schedule, finetune
from bdbench.defenses.guard import class_coverage, largest_passing_count
from bdbench.defenses.masks import coalition_logits, group_neurons, prefix_masks, prune_channels
from bdbench.defenses.reversal import carriers


@register_defense("fp")
class FinePruning(Defense):
    def __init__(self, *, augment: Augment, images_per_pass: dict[str, int], step_frac: Annotated[float, Range(gt=0, le=1)],
                 acc_ratio: Rate, max_frac: Fraction, copies: PositiveInt, finetune: bool, schedule: Schedule) -> None:
        self.augment, self.images_per_pass = augment, images_per_pass
        self.step_frac, self.acc_ratio, self.max_frac, self.copies = step_frac, acc_ratio, max_frac, copies
        self.finetune, self.schedule = finetune, schedule

    def needs(self) -> dict[str, int]:
        return {"groups": 1}

    def repair(self, model, clean: CleanData, ctx: DefenseContext) -> dict:
        neurons = group_neurons(model, model.groups[-1:])
        acts: list[torch.Tensor] = []
        hook = neurons.modules[0].register_forward_hook(lambda _m, _i, o: acts.append(o.float()))
        try:
            with torch.no_grad(), autocast(ctx.device, ctx.precision):
                model(clean.x)
        finally:
            hook.remove()
        activation = acts[0].relu().mean((0, 2, 3))  # what the classifier's pooling / linear layer sees
        order = activation.argsort()  # most dormant first
        step = max(1, math.ceil(self.step_frac * neurons.n))
        counts = torch.arange(0, math.floor(self.max_frac * neurons.n) + 1, step, device=ctx.device)
        aug = carriers(clean, self.augment, self.copies, len(clean) * self.copies, ctx.generator("fp"))
        logits = coalition_logits(model, neurons, prefix_masks(order, counts, neurons.n), aug.x,
                                  self.images_per_pass[ctx.device.type], ctx.precision)
        pred = logits.argmax(-1)
        acc = (pred == aug.y).float().mean(1)
        classes = class_coverage(pred, logits.shape[-1])
        p = largest_passing_count(counts, (acc >= (1 - self.acc_ratio) * acc[0]) & (classes >= classes[0]))
        prune_channels(neurons, order[:p])
        ft = finetune(model, clean, ctx, self.schedule, self.augment, desc="fp finetune") if self.finetune else None
        return {"layer": neurons.names[0], "neurons": neurons.n, "pruned": p, "pruned_fraction": p / neurons.n,
                "pruned_channels": neurons.describe(order[:p].tolist()), "acc_d0": float(acc[0]),
                "acc_d_pruned": float(acc[len(counts[counts <= p]) - 1]), "guard_mode": "acc_ratio",
                "guard_min": round(float((1 - self.acc_ratio) * acc[0]), 6),
                "guard_curve": [[int(c), round(float(a), 6)] for c, a in zip(counts, acc)],
                "guard_classes_min": int(classes[0]),
                "guard_classes_curve": [[int(c), int(n)] for c, n in zip(counts, classes)], "finetune": ft}
