"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018; BackdoorBench ``fp``; defenses.md §7.2).

Backdoor channels lie dormant on clean inputs: rank the last feature group's channels by their mean
activation on the clean images, mask the most dormant ones cumulatively (1 % of the layer per step)
while the clean accuracy on the augmented clean images stays within ``acc_ratio`` (relative) of the
original, then fine-tune with the masks fixed. BackdoorBench measures that accuracy on the test set;
we never do.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from bench.augment import Augment
from bench.device import autocast
from defenses.base import CleanData, Defense, DefenseContext, register_defense
from defenses.finetune import check_batchnorm, finetune
from defenses.guard import class_coverage, largest_passing_count
from defenses.masks import coalition_logits, group_neurons, prefix_masks, prune_channels
from defenses.reversal import carriers


@register_defense("fp")
class FinePruning(Defense):
    def __init__(self, augment: dict, images_per_pass: dict, step_frac: float = 0.01, acc_ratio: float = 0.1,
                 max_frac: float = 0.9, copies: int = 4, finetune: bool = True, epochs: int = 100,
                 batch_size: int = 256, min_steps: int = 300, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 5e-4, batchnorm: str = "train",
                 grad_clip: float | None = None) -> None:
        check_batchnorm(batchnorm)
        if not 0 < acc_ratio < 1:
            raise ValueError(f"fp acc_ratio={acc_ratio}; valid: a fraction in (0, 1)")
        self.augment, self.images_per_pass = Augment(**augment), images_per_pass
        self.step_frac, self.acc_ratio, self.max_frac, self.copies = step_frac, acc_ratio, max_frac, copies
        self.finetune = finetune
        self.ft = dict(epochs=epochs, batch_size=batch_size, min_steps=min_steps, lr=lr, momentum=momentum,
                       weight_decay=weight_decay, batchnorm=batchnorm, grad_clip=grad_clip)
        self._report: dict = {}

    def apply(self, model, clean: CleanData, ctx: DefenseContext):
        start = time.perf_counter()
        model = copy.deepcopy(model).eval()
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
        ft = finetune(model, clean, ctx, augment=self.augment, desc="fp finetune", **self.ft) if self.finetune else None
        self._report = {"layer": neurons.names[0], "neurons": neurons.n, "pruned": p, "pruned_fraction": p / neurons.n,
                        "pruned_channels": neurons.describe(order[:p].tolist()), "acc_d0": float(acc[0]),
                        "acc_d_pruned": float(acc[len(counts[counts <= p]) - 1]), "guard_mode": "acc_ratio",
                        "guard_min": round(float((1 - self.acc_ratio) * acc[0]), 6),
                        "guard_curve": [[int(c), round(float(a), 6)] for c, a in zip(counts, acc)],
                        "guard_classes_min": int(classes[0]),
                        "guard_classes_curve": [[int(c), int(n)] for c, n in zip(counts, classes)], "finetune": ft,
                        "seconds": time.perf_counter() - start}
        return model

    def report(self):
        return self._report
