"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021; ``csdongxian/ANP_backdoor``; docs/defense_methods.md §7.4).

Every BatchNorm channel gets a mask m in [0, 1] on its scale and, while perturbed, multiplicative noise
on scale and shift bounded by ``eps``. Each step draws random noise, takes one signed-gradient step that
makes the noise as harmful as possible, then moves the masks to keep the model right both with and
without the noise. Channels that are sensitive to such perturbation (backdoor channels) end with small
masks and are pruned: their BN scale is zeroed, as in the reference code. The masks and noise are
``torch.nn.utils.parametrize`` parametrizations on a working copy; the defense's own copy is pruned.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bdbench.augment import Augment
from bdbench.schema import Fraction, NonNegative, Positive, PositiveInt
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense
from bdbench.defenses.finetune import BATCHNORM, set_train_mode
from bdbench.defenses.reversal import carriers

SELECT = ("threshold", "sweep")


class _Scale(nn.Module):
    """weight * (mask + noise) while perturbed, weight * mask otherwise."""

    def __init__(self, n: int, device: torch.device) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.ones(n, device=device))
        self.noise = nn.Parameter(torch.zeros(n, device=device))
        self.perturbed = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * (self.mask + self.noise) if self.perturbed else w * self.mask


class _Shift(nn.Module):
    """bias * (1 + noise) while perturbed."""

    def __init__(self, n: int, device: torch.device) -> None:
        super().__init__()
        self.noise = nn.Parameter(torch.zeros(n, device=device))
        self.perturbed = False

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b * (1 + self.noise) if self.perturbed else b


def batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


@register_defense("anp")
class ANP(Defense):
    def __init__(self, *, augment: Augment, eps: NonNegative, alpha: Fraction, steps: PositiveInt,
                 batch_size: PositiveInt, anp_steps: PositiveInt, mask_lr: Positive, momentum: Fraction,
                 threshold: Fraction, select: Literal[SELECT], sweep_thresholds: list[float], sweep_delta_acc: Fraction,
                 copies: PositiveInt, batchnorm: Literal[BATCHNORM], candidates: list[float]) -> None:
        self.augment, self.eps, self.alpha, self.steps, self.batch_size = augment, eps, alpha, steps, batch_size
        self.anp_steps, self.mask_lr, self.momentum, self.threshold = anp_steps, mask_lr, momentum, threshold
        self.select, self.sweep_thresholds, self.sweep_delta_acc = select, tuple(sweep_thresholds), sweep_delta_acc
        self.copies, self.batchnorm, self.candidates = copies, batchnorm, tuple(candidates)
        if len(candidates) != 3 or not 0 <= candidates[0] <= candidates[1] <= 1 or candidates[2] <= 0:
            raise ValueError(f"defense.candidates={list(candidates)}: invalid; valid: [lowest, highest, step] with "
                             f"0 <= lowest <= highest <= 1 and step > 0")

    def needs(self) -> dict[str, int]:
        return {"batchnorms": 1}

    def repair(self, model, clean: CleanData, ctx: DefenseContext) -> dict:
        masks = self._optimize(copy.deepcopy(model), clean, ctx)
        threshold = self.threshold
        sweep = None
        if self.select == "sweep":
            threshold, sweep = self._sweep(model, masks, clean, ctx)
        self._prune(model, masks, threshold)
        flat = torch.cat(list(masks.values()))
        return {"threshold": threshold, "select": self.select, "sweep": sweep, "neurons": len(flat),
                "pruned": int((flat < threshold).sum()), "pruned_fraction": float((flat < threshold).float().mean()),
                "mask_quantiles": [round(float(q), 3) for q in
                                   flat.quantile(torch.tensor([0.0, 0.01, 0.05, 0.5], device=flat.device))],
                "steps": self.steps, "batch_size": min(self.batch_size, len(clean)), "batchnorm": self.batchnorm,
                "candidates": self.ladder(masks)}

    def _optimize(self, model: nn.Module, clean: CleanData, ctx) -> dict[str, torch.Tensor]:
        """The reference loop: random noise, one signed ascent step, a mask step on the mixed loss."""
        scales, shifts = {}, {}
        for name, bn in batchnorms(model):
            scales[name], shifts[name] = _Scale(bn.num_features, ctx.device), _Shift(bn.num_features, ctx.device)
            parametrize.register_parametrization(bn, "weight", scales[name])
            parametrize.register_parametrization(bn, "bias", shifts[name])
        for p in model.parameters():
            p.requires_grad_(False)
        mask_params = [s.mask for s in scales.values()]
        noise_params = [s.noise for s in scales.values()] + [s.noise for s in shifts.values()]
        for p in mask_params + noise_params:
            p.requires_grad_(True)
        mask_opt = torch.optim.SGD(mask_params, lr=self.mask_lr, momentum=self.momentum)
        noise_opt = torch.optim.SGD(noise_params, lr=self.eps / self.anp_steps)
        batch = min(self.batch_size, len(clean))
        gen = ctx.generator("anp")
        set_train_mode(model, self.batchnorm)
        modules = list(scales.values()) + list(shifts.values())

        def perturb(on: bool) -> None:
            for m in modules:
                m.perturbed = on

        for _ in ctx.progress(range(self.steps), desc="anp"):
            idx = torch.randint(0, len(clean), (batch,), generator=gen, device=ctx.device)
            x, y = self.augment(clean.x[idx], gen), clean.y[idx]
            with torch.no_grad():
                for p in noise_params:
                    p.uniform_(-self.eps, self.eps, generator=gen)
            for _ in range(self.anp_steps):
                perturb(True)
                noise_opt.zero_grad(set_to_none=True)
                (-F.cross_entropy(model(x), y)).backward()
                with torch.no_grad():
                    for p in noise_params:
                        p.grad.sign_()
                noise_opt.step()
                with torch.no_grad():
                    for p in noise_params:
                        p.clamp_(-self.eps, self.eps)
            mask_opt.zero_grad(set_to_none=True)
            perturb(True)
            loss_rob = F.cross_entropy(model(x), y)
            perturb(False)
            loss_nat = F.cross_entropy(model(x), y)
            (self.alpha * loss_nat + (1 - self.alpha) * loss_rob).backward()
            mask_opt.step()
            with torch.no_grad():
                for p in mask_params:
                    p.clamp_(0, 1)
        return {name: s.mask.detach().clone() for name, s in scales.items()}

    @staticmethod
    @torch.no_grad()
    def _prune(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float) -> nn.Module:
        for name, bn in batchnorms(model):
            bn.weight[masks[name] < threshold] = 0
        return model.eval()

    def ladder(self, masks: dict[str, torch.Tensor]) -> list[dict]:
        """BackdoorBench's threshold ladder (bdbench.oracle): at each threshold the channels whose mask, written with
        four decimals as its mask_values.txt, is at most the threshold; each step names only the channels it adds."""
        lo, hi, step = self.candidates
        written = {name: (m.double() * 1e4).round() / 1e4 for name, m in masks.items()}
        done = {name: torch.zeros_like(m, dtype=torch.bool) for name, m in masks.items()}
        ladder = []
        for t in (round(lo + i * step, 10) for i in range(round((hi - lo) / step) + 1)):
            zero = {}
            for name, m in written.items():
                now = m <= t
                zero[f"{name}.weight"] = (now & ~done[name]).nonzero().flatten().tolist()
                done[name] |= now
            ladder.append({"setting": {"threshold": round(t, 3)}, "zero": {k: v for k, v in zero.items() if v}})
        return ladder

    @torch.no_grad()
    def _sweep(self, model, masks, clean, ctx) -> tuple[float, list]:
        """The largest threshold whose accuracy on the augmented clean images stays within the delta."""
        aug = carriers(clean, self.augment, self.copies, len(clean) * self.copies, ctx.generator("anp sweep"))
        lo, hi, step = self.sweep_thresholds
        accs, best = [], 0.0
        acc0 = float((model.eval()(aug.x).argmax(1) == aug.y).float().mean())
        for t in torch.arange(lo, hi + 1e-9, step).tolist():
            acc = float((self._prune(copy.deepcopy(model), masks, t)(aug.x).argmax(1) == aug.y).float().mean())
            accs.append((round(t, 3), round(acc, 4)))
            if acc >= acc0 - self.sweep_delta_acc:
                best = t
        return best, accs
