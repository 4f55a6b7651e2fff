"""Data-free synthesis for budget 0: DeepInversion (Yin et al., CVPR 2020; docs/defense_methods.md §1.4).

Inverts the suspect model from its BatchNorm statistics: Gaussian inputs in normalized space are
optimised with Adam so that the model predicts the requested classes, the images are smooth (TV
prior) and each BN layer sees the batch statistics it stored during training. Any defense that
needs inputs gets these at k = 0 unless it brings its own data-free method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.device import autocast
from bdbench.schema import Count, NonNegative, Positive, PositiveInt
from bdbench.defenses.base import CleanData, DefenseContext


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum of the L2 norms of the differences to the four neighbours (right, down, two diagonals)."""
    return (
        torch.norm(x[..., :, :-1] - x[..., :, 1:])
        + torch.norm(x[..., :-1, :] - x[..., 1:, :])
        + torch.norm(x[..., 1:, :-1] - x[..., :-1, 1:])
        + torch.norm(x[..., :-1, :-1] - x[..., 1:, 1:])
    )


class DeepInversion:
    """``__call__(model, ctx) -> CleanData`` with ``per_class`` synthetic images of every class."""

    def __init__(self, *, per_class: PositiveInt, iterations: PositiveInt, lr: Positive, jitter: Count,
                 tv_weight: NonNegative, bn_weight: NonNegative, l2_weight_no_bn: NonNegative) -> None:
        self.per_class, self.iterations, self.lr, self.jitter = per_class, iterations, lr, jitter
        self.tv_weight, self.bn_weight, self.l2_weight_no_bn = tv_weight, bn_weight, l2_weight_no_bn
        self.stats: dict = {}

    def __call__(self, model: nn.Module, ctx: DefenseContext) -> CleanData:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        bn_losses: list[torch.Tensor] = []

        def bn_hook(module: nn.BatchNorm2d, inputs, _output) -> None:
            x = inputs[0]
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            bn_losses.append(torch.norm(mean - module.running_mean) + torch.norm(var - module.running_var))

        hooks = [m.register_forward_hook(bn_hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        has_bn = bool(hooks)
        mean = getattr(model, "mean", torch.tensor(0.5)).to(ctx.device)
        std = getattr(model, "std", torch.tensor(0.5)).to(ctx.device)
        gen = ctx.generator("synthesis")
        y = torch.arange(ctx.num_classes, device=ctx.device).repeat(self.per_class)
        z = torch.randn(len(y), *ctx.input_shape, generator=gen, device=ctx.device).requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=self.lr)
        best_loss, best = float("inf"), z.detach().clone()
        try:
            for _ in ctx.progress(range(self.iterations), desc="synthesis"):
                dx, dy = (int(v) for v in torch.randint(-self.jitter, self.jitter + 1, (2,), generator=gen, device=ctx.device))
                z_jit = torch.roll(z, shifts=(dx, dy), dims=(2, 3))
                bn_losses.clear()
                with autocast(ctx.device, ctx.precision):
                    logits = model(z_jit * std + mean)  # the model normalizes again: it sees z_jit
                loss = F.cross_entropy(logits.float(), y) + self.tv_weight * total_variation(z_jit)
                if has_bn:
                    loss = loss + self.bn_weight * torch.stack(bn_losses).sum()
                else:
                    loss = loss + self.l2_weight_no_bn * z_jit.pow(2).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if loss.item() < best_loss:
                    best_loss, best = loss.item(), z.detach().clone()
        finally:
            for h in hooks:
                h.remove()
            for p in model.parameters():
                p.requires_grad_(True)
        images = (best * std + mean).clamp(0, 1)
        with torch.no_grad():
            agree = (model(images).argmax(1) == y).float().mean().item()
        self.stats = {"method": "deepinversion" if has_bn else "no_bn", "images": len(y),
                      "iterations": self.iterations, "best_loss": best_loss, "label_agreement": agree}
        return CleanData(images.detach(), y, source="synthetic")
