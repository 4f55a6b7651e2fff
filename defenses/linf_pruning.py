"""ℓ∞ neuron pruning (Cheng et al., arXiv 2002.12162; docs/defense_methods.md §3).

The backdoor shows as a bias in the ℓ∞ norm of last-layer activation maps. Reverse the trigger,
score each channel of the map the classifier head reads (post-activation, ``tap=head``) by how much
the reversed trigger raises the ℓ∞ norm of its map on clean images of other classes, and mask
channels in that order until the reversed trigger's ASR is at most ``tau_asr``, under the accuracy
guard. ``tap=group`` reads the last feature group's output as it is (pre-BN on a WRN, by magnitude),
``tap=all_channels`` every conv channel at its mask point: two named readings for comparison. ℓ1 and ℓ2 scores are computed the same
way and stored, for the comparison (``norm=l1, score=raw`` is Neural Cleanse's own neuron pruning).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from bdbench.augment import Augment
from bdbench.device import autocast
from bdbench.schema import Fraction, PositiveInt
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense
from bdbench.defenses.finetune import Schedule, finetune
from bdbench.defenses.guard import Guard, largest_passing_count
from bdbench.defenses.masks import (Neurons, coalition_logits, conv_neurons, group_neurons, head_neurons, prefix_masks,
                            prune_channels)
from bdbench.defenses.reversal import TriggerReversal
from bdbench.defenses.shap_pruning import pruning_carriers

NORMS = ("linf", "l1", "l2")
SCORES = ("diff", "raw")
TAPS = ("head", "group", "all_channels")


def map_norms(a: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image and channel norms of activation maps [N, C, H, W]: ℓ∞ = max|a|, ℓ1 = mean|a|, ℓ2 = rms.

    At the head's tap the map is post-ReLU, so |a| = a; at the other taps it reads a channel's magnitude."""
    flat = a.flatten(2).abs()
    return {"linf": flat.amax(2), "l1": flat.mean(2), "l2": flat.pow(2).mean(2).sqrt()}


@register_defense("linf_pruning")
class LinfPruning(Defense):
    def __init__(self, *, reversal: TriggerReversal, augment: Augment, images_per_pass: dict[str, int],
                 norm: Literal[NORMS], score: Literal[SCORES], tap: Literal[TAPS], last_k_groups: PositiveInt,
                 tau_asr: Fraction,
                 delta_acc: Fraction, min_agreement: Fraction, k_max_frac: Fraction, copies_single: PositiveInt,
                 copies: PositiveInt, max_carriers: PositiveInt, finetune: bool, schedule: Schedule) -> None:
        self.reversal, self.augment, self.images_per_pass = reversal, augment, images_per_pass
        self.norm, self.score, self.tap, self.last_k_groups = norm, score, tap, last_k_groups
        self.tau_asr, self.delta_acc, self.min_agreement, self.k_max_frac = tau_asr, delta_acc, min_agreement, k_max_frac
        self.copies_single, self.copies, self.max_carriers = copies_single, copies, max_carriers
        self.finetune, self.schedule = finetune, schedule

    def needs(self) -> dict[str, int]:
        return {"groups": self.last_k_groups} if self.tap == "group" else {}

    def repair(self, model, clean: CleanData, ctx: DefenseContext) -> dict:
        per_pass = self.images_per_pass[ctx.device.type]
        rev = self.reversal(model, clean, self.augment, ctx)
        if not rev.act:  # nothing flagged and when_undetected=skip: BackdoorBench returns the model unchanged
            return {**rev.report(), "pruned": 0}
        aug = pruning_carriers(clean, self.augment, ctx.num_classes, self.copies_single, self.copies, self.max_carriers,
                               ctx.generator("linf_pruning"))
        x = aug.x[aug.y != rev.target]
        bd_x = rev.stamp(x)
        neurons, relu = self._tap(model)
        scores = self._scores(model, neurons, relu, x, bd_x, ctx)
        order = scores[self.norm].argsort(descending=True)
        k_max = math.ceil(self.k_max_frac * neurons.n)
        guard = Guard(model, neurons, aug, mode="acc", delta_acc=self.delta_acc, min_agreement=self.min_agreement,
                      images_per_pass=per_pass, precision=ctx.precision)
        masks = prefix_masks(order, torch.arange(0, k_max + 1, device=ctx.device), neurons.n)
        logits = coalition_logits(model, neurons, masks, torch.cat([bd_x, aug.x]), per_pass, ctx.precision)
        asr = (logits[:, :len(bd_x)].argmax(-1) == rev.target).float().mean(1)
        verdict = guard.judge(logits[:, len(bd_x):])
        counts = torch.arange(0, k_max + 1, device=ctx.device)
        ok = counts <= largest_passing_count(counts, verdict.passes)  # a sweep stops at the first failure
        reached = (ok & (asr <= self.tau_asr)).nonzero()
        if len(reached):  # the smallest passing prefix that silences the reversed trigger
            p = int(reached[0])
        else:  # the guard binds first: the passing prefix with the lowest reversed ASR
            p = int(torch.where(ok, asr, torch.full_like(asr, math.inf)).argmin())
        prune_channels(neurons, order[:p])
        ft = finetune(model, clean, ctx, self.schedule, self.augment, desc="linf finetune") if self.finetune else None
        return {**rev.report(), "layers": neurons.names, "neurons": neurons.n,
                **guard.report(counts, verdict, p),
                "pruned_fraction": p / neurons.n, "pruned_channels": neurons.describe(order[:p].tolist()),
                "rev_asr_after": float(asr[p]), "rev_asr_curve": [round(v, 4) for v in asr.tolist()],
                "norm": self.norm, "score": self.score, "tap": self.tap, "tap_relu": relu,
                "top_channels": {k: neurons.describe(s.argsort(descending=True)[:10].tolist())
                                 for k, s in scores.items()},
                "finetune": ft}

    def _tap(self, model) -> tuple[Neurons, bool]:
        """The channels scored and pruned, and whether their maps are read through a ReLU."""
        if self.tap == "head":
            return head_neurons(model)
        if self.tap == "group":
            return group_neurons(model, model.groups[-self.last_k_groups:]), False
        return conv_neurons(model), False

    @torch.no_grad()
    def _scores(self, model, neurons, relu, x, bd_x, ctx) -> dict[str, torch.Tensor]:
        """Channel scores of every norm: mean over carriers of the triggered norm (minus the clean one)."""
        maps: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: maps.append(o.float().relu() if relu else o.float()))
                 for m in neurons.modules]
        try:
            with autocast(ctx.device, ctx.precision):
                model(torch.cat([x, bd_x]))
        finally:
            for h in hooks:
                h.remove()
        per_norm = [map_norms(a) for a in maps]
        out = {}
        for name in NORMS:
            values = torch.cat([p[name] for p in per_norm], dim=1)  # [2N, n]
            clean_, trig = values[:len(x)], values[len(x):]
            out[name] = (trig - clean_).mean(0) if self.score == "diff" else trig.mean(0)
        return out
