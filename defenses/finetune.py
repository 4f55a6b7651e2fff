"""The fine-tuning loop that FT, and the later fine-tuning defenses, share.

Length is counted in steps, not epochs (defenses.md §1.2): ``steps = max(epochs * ceil(n / B),
min_steps)`` with ``B = min(batch_size, n)``, so one image per class still gets a real schedule.
Batches are re-drawn from the clean set with the data set's augmentation. BatchNorm keeps its
running statistics (eval mode) when batches are smaller than ``bn_min_batch``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.augment import Augment
from bench.device import autocast
from defenses.base import CleanData, DefenseContext


def step_count(n: int, epochs: int, batch_size: int, min_steps: int) -> tuple[int, int]:
    """(steps, batch) by the step rule; a batch never exceeds the clean set."""
    batch = min(batch_size, n)
    return max(epochs * math.ceil(n / batch), min_steps), batch


def freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def finetune(model: nn.Module, clean: CleanData, ctx: DefenseContext, *, epochs: int, batch_size: int,
             min_steps: int, lr: float, momentum: float, weight_decay: float, augment: Augment,
             bn_min_batch: int, loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             desc: str = "finetune") -> dict:
    """SGD with a per-step cosine schedule on augmented batches of ``clean``; returns what it ran."""
    steps, batch = step_count(len(clean), epochs, batch_size, min_steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen = ctx.generator(desc)
    bn_frozen = batch < bn_min_batch
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    model.train()
    if bn_frozen:
        freeze_batchnorm(model)
    order = torch.empty(0, dtype=torch.long, device=ctx.device)
    for _ in ctx.progress(range(steps), desc=desc):
        if len(order) < batch:  # a fresh permutation whenever the current one runs out
            order = torch.cat([order, torch.randperm(len(clean), generator=gen, device=ctx.device)])
        idx, order = order[:batch], order[batch:]
        x = augment(clean.x[idx], gen)
        with autocast(ctx.device, ctx.precision):
            loss = loss_fn(model, x, clean.y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    return {"steps": steps, "batch_size": batch, "bn_frozen": bn_frozen, "final_loss": float(loss.detach())}
