"""Backdoor suspiciousness score, BSS (arXiv 2311.07417; docs/defense_methods.md §4). Trigger-free.

Each conv channel gets three signals, standardised (robust z) within its layer and summed:
low activation on clean images (dormant, as Fine-Pruning assumes), a high channel Lipschitz bound
(CLP's weight signal) and low correlation with the other channels of its layer. Channels are
masked in order of the summed score, a chunk at a time, for as long as the clean images allow
(agreement with the original and clean accuracy), up to ``max_frac`` of all channels.
The abstract names the three signals; the formulas are ours (docs/defense_methods.md §4.1, all [I]).

Dead channels are not suspects: a channel whose BatchNorm running variance is at most its eps (it never
fired in training, poisoned images included) or, without a BatchNorm, whose activation is constant on the
clean images, is left out of the z-scores and ranked last. A correlation that cannot be computed (a
constant channel) is missing, not zero: it adds nothing to the score instead of the largest suspicion.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import nn

from bdbench.augment import Augment
from bdbench.device import autocast
from bdbench.schema import Fraction, PositiveInt, Range
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense
from bdbench.defenses.finetune import Schedule, finetune
from bdbench.defenses.guard import Guard, largest_passing_count
from bdbench.defenses.masks import Neurons, conv_neurons, prefix_masks, prune_channels
from bdbench.defenses.reversal import carriers

WEIGHTS = ("clp", "in_l2", "out_l2")


def robust_z(u: torch.Tensor) -> torch.Tensor:
    """Robust z-scores over the finite entries; NaN entries (missing signals) stay NaN."""
    med = u.nanmedian()
    return (u - med) / (1.4826 * (u - med).abs().nanmedian() + 1e-8)


def dead_channels(neurons: Neurons, maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, [C] bool: running variance <= eps at a BatchNorm mask point, else constant on the images."""
    out = []
    for module, a in zip(neurons.modules, maps):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
            out.append(module.running_var <= module.eps)
        else:
            out.append(a.transpose(0, 1).flatten(1).var(1) == 0)
    return out


@torch.no_grad()
def outgoing_norms(model: nn.Module, neurons: Neurons) -> list[torch.Tensor]:
    """Per mask point and channel: ``||W_next[:, k]||_2`` of the first conv or linear layer that runs after
    it (execution order; with residual branches that is one of its readers). A linear layer reading a
    flattened C x H x W map owns H*W columns per channel."""
    readers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    order: list[nn.Module] = []
    watched = {id(m) for m in [*readers, *neurons.modules]}
    hooks = [m.register_forward_hook(lambda m, _i, _o: order.append(m))
             for m in model.modules() if id(m) in watched]
    try:
        model(torch.zeros(1, *model.shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    out = []
    for module, c in zip(neurons.modules, neurons.sizes):
        start = next(i for i, m in enumerate(order) if m is module)
        reader = next((m for m in order[start + 1:] if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if reader is None or reader.weight.shape[1] % c:
            raise ValueError(f"suspiciousness weight=out_l2: no layer reads the {c} channels of {module}")
        w = reader.weight.detach()
        out.append(w.transpose(0, 1).reshape(c, -1).norm(dim=1) if isinstance(reader, nn.Conv2d)
                   else w.view(w.shape[0], c, -1).transpose(0, 1).reshape(c, -1).norm(dim=1))
    return out


def channel_weight_bounds(model: nn.Module, kind: str) -> list[torch.Tensor]:
    """Per conv (module order) and output channel: CLP's bound sigma_max(W_k * |gamma_k / sigma_k|), or the
    kernel's L2 norm times the same scale (``in_l2``). Convs without a BN use scale 1."""
    if kind == "out_l2":
        return outgoing_norms(model, conv_neurons(model))
    bn_of = {id(conv): bn for conv, bn in model.conv_bn_pairs()}
    out = []
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        bn = bn_of.get(id(conv)) if getattr(model, "neuron_point", "bn") == "bn" else None
        scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).abs() if bn is not None else torch.ones(
            conv.out_channels, device=conv.weight.device)
        w = conv.weight.detach().flatten(2)  # [C_out, C_in, kh*kw]
        norm = torch.linalg.matrix_norm(w, ord=2) if kind == "clp" else w.flatten(1).norm(dim=1)
        out.append(norm * scale.detach())
    return out


@torch.no_grad()
def activation_signals(model: nn.Module, neurons: Neurons, x: torch.Tensor, ctx: DefenseContext
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: mean activation of each channel (after the ReLU that follows a BN mask point), its mean
    absolute Pearson correlation with the layer's other channels over images x positions (NaN where no
    pair can be computed), and which channels are dead."""
    maps: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: maps.append(o.float())) for m in neurons.modules]
    try:
        with autocast(ctx.device, ctx.precision):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    mus, rhos = [], []
    dead = dead_channels(neurons, maps)
    for module, a in zip(neurons.modules, maps):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            a = a.relu()
        mus.append(a.abs().mean((0, 2, 3)))
        u = a.transpose(0, 1).flatten(1)  # [C, N*H*W]
        corr = torch.corrcoef(u).abs()  # NaN for a constant channel: its correlation is unknown
        corr.fill_diagonal_(float("nan"))
        rhos.append(corr.nanmean(1))  # NaN when no pair is defined
    return mus, rhos, dead


@register_defense("suspiciousness")
class Suspiciousness(Defense):
    def __init__(self, *, augment: Augment, images_per_pass: dict[str, int], alpha: list[float],
                 weight: Literal[WEIGHTS], weights_only: bool, chunk_frac: Annotated[float, Range(gt=0, le=1)],
                 max_frac: Fraction, min_agreement: Fraction, delta_acc: Fraction, copies: PositiveInt,
                 max_carriers: PositiveInt, finetune: bool,
                 schedule: Schedule) -> None:
        if len(alpha) != 3:
            raise ValueError(f"suspiciousness alpha={list(alpha)!r}; valid: three weights (activation, weight, correlation)")
        self.augment, self.images_per_pass = augment, images_per_pass
        self.alpha = (0.0, 1.0, 0.0) if weights_only else tuple(alpha)
        self.weight, self.weights_only, self.chunk_frac, self.max_frac = weight, weights_only, chunk_frac, max_frac
        self.min_agreement, self.delta_acc, self.copies, self.max_carriers = min_agreement, delta_acc, copies, max_carriers
        self.finetune, self.schedule = finetune, schedule

    def needs(self) -> dict[str, int]:
        return {"conv_bn_pairs": 1}

    def repair(self, model, clean: CleanData, ctx: DefenseContext) -> dict:
        per_pass = self.images_per_pass[ctx.device.type]
        aug = carriers(clean, self.augment, self.copies, min(len(clean) * self.copies, self.max_carriers),
                       ctx.generator("suspiciousness"))
        neurons = conv_neurons(model)
        mus, rhos, dead = activation_signals(model, neurons, aug.x, ctx)
        ws = channel_weight_bounds(model, self.weight)
        a_mu, a_w, a_rho = self.alpha
        nan = float("nan")
        scores = []
        for mu, w, rho, d in zip(mus, ws, rhos, dead):  # z-scores over the live channels of each layer
            signals = [a * robust_z(torch.where(d, nan, s)).nan_to_num(0.0) for a, s in
                       ((a_mu, -torch.log(mu + 1e-8)), (a_w, torch.log(w + 1e-8)), (a_rho, -rho))]
            scores.append(torch.where(d, -torch.inf, sum(signals)))
        score = torch.cat(scores)
        dead_all = torch.cat(dead)
        order = score.argsort(descending=True, stable=True)
        order = order[~dead_all[order]]  # a dead channel is never a candidate
        chunk = max(1, math.ceil(self.chunk_frac * neurons.n))
        counts = torch.arange(0, min(math.ceil(self.max_frac * neurons.n), len(order)) + 1, chunk, device=ctx.device)
        guard = Guard(model, neurons, aug, mode="both", delta_acc=self.delta_acc, min_agreement=self.min_agreement,
                      images_per_pass=per_pass, precision=ctx.precision)
        verdict = guard(prefix_masks(order, counts, neurons.n))
        p = largest_passing_count(counts, verdict.passes)
        prune_channels(neurons, order[:p])
        ft = finetune(model, clean, ctx, self.schedule, self.augment, desc="bss finetune") if self.finetune else None
        return {"neurons": neurons.n, **guard.report(counts, verdict, p), "pruned_fraction": p / neurons.n,
                "pruned_channels": neurons.describe(order[:p].tolist()), "chunk": chunk,
                "alpha": list(self.alpha), "weight": self.weight, "dead_channels": int(dead_all.sum()),
                "top_scores": [round(float(v), 3) for v in score[order[:10]]],
                "finetune": ft}
