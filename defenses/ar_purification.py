"""Benign salience + Adaptive Regularization, BS+AR (Fan et al., arXiv 2208.06537; docs/defense_methods.md §5).

Two readings, both kept (the record says which ran):

- ``variant=code`` (default), the first author's code (``fmy266/wiper``): a salience per parameter of the
  purified layers (the classifier's last linear layer by default), an exponential moving average of
  ``-grad * theta`` warmed up over the clean images; a mask of the top-r most salient parameters with
  r growing from ``beta`` to 1 over training; fine-tuning with cross-entropy plus the AR penalty:
  ``alpha * |theta|`` for |theta| <= 1 or unmasked, ``alpha * exp(|theta| - 1)`` for masked |theta| > 1
  (``ar_sign=as_code`` keeps the code's ``-alpha * exp(-theta - 1)`` branch for theta < -1).
- ``variant=neuron``, docs/defense_methods.md §5.2: Taylor first-order salience per channel on the clean images, the lowest
  ``q`` of each scored layer marked infected, fine-tuning with a decoupled geometric shrinkage of the
  infected channels' parameters (``reg=adaptive``) or an L1 / adaptive-L2 penalty in the loss (the
  "common regularization" ablation), then the channels that shrank away are zeroed.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.augment import Augment
from bdbench.device import autocast
from bdbench.schema import Count, Fraction, NonNegative, PositiveInt, Range
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense
from bdbench.defenses.finetune import Schedule, finetune
from bdbench.defenses.masks import Neurons, conv_neurons, prune_channels

VARIANTS = ("code", "neuron")
REGS = ("adaptive", "l1", "adaptive_l2")
AR_SIGNS = ("symmetric", "as_code")


def ar_penalty(theta: torch.Tensor, mask: torch.Tensor, alpha: float, sign: str) -> torch.Tensor:
    """The code's adaptive regularization: L1 inside [-1, 1] (and wherever the mask is 0), exponential outside."""
    m = theta * mask
    big_pos, big_neg = m > 1, m < -1
    l1 = alpha * theta.abs()
    pos = alpha * torch.exp(theta - 1)
    neg = alpha * torch.exp(theta.abs() - 1) if sign == "symmetric" else -alpha * torch.exp(-theta - 1)
    return torch.where(big_pos, pos, torch.where(big_neg, neg, l1)).sum()


def last_linear(model: nn.Module) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


SALIENCES = ("taylor", "activation", "weight_grad")


@register_defense("ar_purification")
class ARPurification(Defense):
    def __init__(self, *, augment: Augment, variant: Literal[VARIANTS], layers: list[str], ema: Fraction,
                 beta: Fraction, alpha: NonNegative, ar_sign: Literal[AR_SIGNS], code_schedule: Schedule,
                 salience: Literal[SALIENCES], q: Annotated[float, Range(gt=0, le=1)], scored_groups: Count,
                 reg: Literal[REGS], rho_end: Annotated[float, Range(gt=0, lt=1)], l1_lambda: NonNegative,
                 neuron_schedule: Schedule, final_prune: bool, prune_below: Fraction, copies: PositiveInt) -> None:
        if final_prune and reg == "adaptive" and prune_below <= rho_end:
            raise ValueError(f"ar_purification prune_below={prune_below} with rho_end={rho_end}; valid: prune_below > "
                             "rho_end (shrinkage alone ends every infected channel at rho_end: a cut-off at or below it "
                             "prunes by the noise of the last steps)")
        self.augment, self.variant, self.layers = augment, variant, tuple(layers)
        self.ema, self.beta, self.alpha, self.ar_sign = ema, beta, alpha, ar_sign
        self.code_schedule, self.neuron_schedule = code_schedule, neuron_schedule
        self.salience, self.q, self.scored_groups, self.reg = salience, q, scored_groups, reg
        self.rho_end, self.l1_lambda, self.final_prune, self.copies = rho_end, l1_lambda, final_prune, copies
        self.prune_below = prune_below

    def needs(self) -> dict[str, int]:
        return {"groups": self.scored_groups}

    def repair(self, model, clean: CleanData, ctx: DefenseContext) -> dict:
        report = self._code(model, clean, ctx) if self.variant == "code" else self._neuron(model, clean, ctx)
        return {"variant": self.variant, **report}

    # -- variant=code ---------------------------------------------------------------------------
    def _code(self, model, clean, ctx) -> dict:
        names = [last_linear(model) if n == "last_linear" else n for n in self.layers]
        params = [p for n in names for p in model.get_submodule(n).parameters()]
        salience = [torch.zeros_like(p) for p in params]

        def accumulate() -> None:
            for s, p in zip(salience, params):
                if p.grad is not None:
                    s.mul_(self.ema).sub_((1 - self.ema) * p.grad * p.detach())

        # warm-up: one pass over the clean images accumulates salience, no optimizer step
        model.eval()
        batch = min(self.code_schedule.batch_size, len(clean))
        for idx in torch.arange(len(clean), device=ctx.device).split(batch):
            model.zero_grad(set_to_none=True)
            with autocast(ctx.device, ctx.precision):
                F.cross_entropy(model(clean.x[idx]), clean.y[idx]).backward()
            with torch.no_grad():
                accumulate()
        steps, _ = self.code_schedule.steps(len(clean))
        progress = {"step": 0}

        def loss_fn(m, x, y):
            ratio = self.beta + (1 - self.beta) * progress["step"] / steps
            penalty = x.new_zeros(())
            for s, p in zip(salience, params):
                k = max(1, int(round(ratio * s.numel())))
                threshold = s.flatten().kthvalue(s.numel() - k + 1).values
                penalty = penalty + ar_penalty(p, (s >= threshold).to(p.dtype), self.alpha, self.ar_sign)
            return F.cross_entropy(m(x), y) + penalty

        def after_step(step: int, _steps: int) -> None:
            with torch.no_grad():
                accumulate()
            progress["step"] = step + 1

        ft = finetune(model, clean, ctx, self.code_schedule, self.augment, loss_fn=loss_fn, after_step=after_step,
                      desc="ar purification")
        return {"layers": names, "finetune": ft, "ar_sign": self.ar_sign, "alpha": self.alpha, "beta": self.beta}

    # -- variant=neuron -------------------------------------------------------------------------
    def _scored(self, model, neurons: Neurons) -> list[int]:
        """Layers (mask points) inside the last ``scored_groups`` feature groups; all with ``scored_groups=0``."""
        if self.scored_groups == 0:
            return list(range(len(neurons.modules)))
        owners = [g for g in model.groups[-self.scored_groups:]]
        return [i for i, name in enumerate(neurons.names) if any(name.startswith(g + ".") for g in owners)]

    def _benign_salience(self, model, neurons: Neurons, clean: CleanData, ctx) -> torch.Tensor:
        """Per channel, over the augmented images: Taylor-FO |sum_hw h * dCE/dh| (``taylor``), the mean
        activation (``activation``) or sum |theta * dCE/dtheta| over its incoming parameters
        (``weight_grad``); L2-normalised per layer. BatchNorm is in eval mode, so the images are scored in
        batches of the schedule's size: 5 % of CIFAR-10 times 16 copies in one pass held 22 GB of activations."""
        x = self.augment(clean.x.repeat(self.copies, 1, 1, 1), ctx.generator("benign salience"))
        y = clean.y.repeat(self.copies)
        acts: list[torch.Tensor] = []

        def keep(_m, _i, out):
            out.retain_grad()
            acts.append(out)

        model.eval()
        model.zero_grad(set_to_none=True)
        sums: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(keep) for m in neurons.modules]
        try:
            for idx in torch.arange(len(x), device=x.device).split(self.neuron_schedule.batch_size):
                acts.clear()
                F.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()  # weight grads add up
                if self.salience == "weight_grad":
                    continue
                with torch.no_grad():  # no graph from one batch to the next: each batch's activations are freed
                    per_layer = [(a * a.grad).sum((2, 3)).abs().sum(0) if self.salience == "taylor"
                                 else a.relu().mean((2, 3)).sum(0) for a in acts]
                sums = per_layer if not sums else [s + t for s, t in zip(sums, per_layer)]
        finally:
            for h in hooks:
                h.remove()
        if self.salience == "weight_grad":
            sums = [sum((t * t.grad).abs().reshape(len(t), -1).sum(1) for t in self._layer_params(model, neurons, i))
                    for i in range(len(neurons.modules))]
        model.zero_grad(set_to_none=True)
        return torch.cat([s / s.norm().clamp_min(1e-12) for s in sums]).detach()

    @staticmethod
    def _layer_params(model, neurons: Neurons, layer: int) -> list[torch.Tensor]:
        """A layer's incoming conv weights (and bias) and its BN's scale and shift, channel first."""
        module = neurons.modules[layer]
        conv = next((c for c, bn in model.conv_bn_pairs() if bn is module), module)
        out = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
        return out + ([module.weight, module.bias] if module is not conv else [])

    def _channel_params(self, model, neurons: Neurons, layer: int, channel: int) -> list[tuple[torch.Tensor, int]]:
        """The incoming conv filter of a channel and its BN's scale and shift (Theta_k)."""
        return [(t, channel) for t in self._layer_params(model, neurons, layer)]

    def _neuron(self, model, clean, ctx) -> dict:
        neurons = conv_neurons(model)
        bs = self._benign_salience(model, neurons, clean, ctx)
        infected = []
        for layer in self._scored(model, neurons):
            start, size = neurons.offsets[layer], neurons.sizes[layer]
            low = bs[start:start + size].argsort()[:max(1, math.ceil(self.q * size))]
            infected += (low + start).tolist()
        theta = [(t, c) for i in infected for t, c in self._channel_params(model, neurons, *neurons.locate(i))]
        initial = [float(t[c].detach().norm()) for t, c in theta]
        steps, _ = self.neuron_schedule.steps(len(clean))
        rate = 1 - self.rho_end ** (1 / steps)
        scale0 = {id(t): float(t.detach().abs().mean()) for t, _ in theta}

        def loss_fn(m, x, y):
            loss = F.cross_entropy(m(x), y)
            if self.reg == "l1":
                loss = loss + self.l1_lambda * sum(t[c].abs().sum() for t, c in theta)
            elif self.reg == "adaptive_l2":
                loss = loss + self.l1_lambda * sum(t[c].pow(2).sum() / (2 * scale0[id(t)]) for t, c in theta)
            return loss

        def shrink(_step: int, _steps: int) -> None:
            if self.reg == "adaptive":  # decoupled, magnitude-proportional: every theta reaches rho_end at step T
                with torch.no_grad():
                    for t, c in theta:
                        t[c] *= 1 - rate

        ft = finetune(model, clean, ctx, self.neuron_schedule, self.augment, loss_fn=loss_fn, after_step=shrink,
                      desc="ar purification")
        final = [float(t[c].detach().norm()) for t, c in theta]
        ratios, k = [], 0  # each infected channel's parameter norm at the end over its start
        for i in infected:
            n_params = len(self._channel_params(model, neurons, *neurons.locate(i)))
            ratios.append(sum(final[k:k + n_params]) / max(sum(initial[k:k + n_params]), 1e-12))
            k += n_params
        zeroed = [i for i, r in zip(infected, ratios) if r < self.prune_below] if self.final_prune else []
        prune_channels(neurons, zeroed)
        return {"infected": len(infected), "infected_channels": neurons.describe(infected), "reg": self.reg,
                "salience": self.salience, "rate": rate, "steps": steps, "final_pruned": len(zeroed),
                "final_ratios": [round(r, 4) for r in ratios], "prune_below": self.prune_below, "finetune": ft}
