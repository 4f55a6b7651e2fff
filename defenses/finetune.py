"""The fine-tuning loop that FT, and the later fine-tuning defenses, share.

Length is counted in steps, not epochs (defenses.md §1.2): ``steps = max(epochs * ceil(n / B),
min_steps)`` with ``B = min(batch_size, n)``, so one image per class still gets a real schedule.
Batches are re-drawn from the clean set with the data set's augmentation. BatchNorm runs in one mode
for every cell, whatever the model or batch: ``batchnorm=train`` (default), as every reference code
fine-tunes (BackdoorBench's trainer, NAD, ARGD, ANP, the AR authors' code call ``model.train()``), or the
named variant ``batchnorm=frozen`` (running statistics kept). ``grad_clip`` (a max gradient norm) is a
named variant too; null = none, as the references.
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


BATCHNORM = ("train", "frozen")


def check_batchnorm(mode: str) -> None:
    if mode not in BATCHNORM:
        raise ValueError(f"batchnorm={mode!r}; valid: {', '.join(BATCHNORM)}")


def set_train_mode(model: nn.Module, batchnorm: str) -> None:
    """``model.train()``, with BatchNorm layers back in eval mode under ``batchnorm=frozen``."""
    check_batchnorm(batchnorm)
    model.train()
    if batchnorm == "frozen":
        freeze_batchnorm(model)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Cutout (DeVries & Taylor): one ``size`` x ``size`` square per image, centre uniform, clipped at the border."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), generator=gen, device=gen.device).to(x.device)
    cx = torch.randint(0, w, (n, 1, 1), generator=gen, device=gen.device).to(x.device)
    rows, cols = torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]
    hole = ((rows - cy).abs() <= size // 2) & ((cols - cx).abs() <= size // 2)
    return x * (~hole)[:, None].to(x.dtype)


def piecewise_lr(piecewise: list[list[float]], steps: int) -> Callable[[int], float]:
    """A step-indexed factor for LambdaLR from [[start fraction, lr factor], ...] (epochs rescaled to steps)."""
    bounds = sorted((int(round(frac * steps)), factor) for frac, factor in piecewise)
    return lambda step: next(f for b, f in reversed(bounds) if step >= b)


def finetune(model: nn.Module, clean: CleanData, ctx: DefenseContext, *, epochs: int, batch_size: int,
             min_steps: int, lr: float, momentum: float, weight_decay: float, augment: Augment,
             batchnorm: str, grad_clip: float | None = None, nesterov: bool = False, schedule: str = "cosine",
             piecewise: list[list[float]] | None = None, cutout_size: int = 0,
             loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             params: list[torch.nn.Parameter] | None = None, after_step: Callable[[int, int], None] | None = None,
             desc: str = "finetune") -> dict:
    """SGD on augmented batches of ``clean`` with a per-step cosine or piecewise-constant schedule.

    ``params`` defaults to the model's; ``after_step(step, steps)`` runs after each optimizer step
    (e.g. a decoupled shrinkage). Returns what it ran.
    """
    if schedule not in ("cosine", "piecewise"):
        raise ValueError(f"schedule={schedule!r}; valid: cosine, piecewise")
    steps, batch = step_count(len(clean), epochs, batch_size, min_steps)
    optimizer = torch.optim.SGD(params if params is not None else model.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay, nesterov=nesterov)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if schedule == "cosine" else \
        torch.optim.lr_scheduler.LambdaLR(optimizer, piecewise_lr(piecewise or [[0.0, 1.0]], steps))
    gen = ctx.generator(desc)
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    set_train_mode(model, batchnorm)
    order = torch.empty(0, dtype=torch.long, device=ctx.device)
    for step in ctx.progress(range(steps), desc=desc):
        if len(order) < batch:  # a fresh permutation whenever the current one runs out
            order = torch.cat([order, torch.randperm(len(clean), generator=gen, device=ctx.device)])
        idx, order = order[:batch], order[batch:]
        x = augment(clean.x[idx], gen)
        if cutout_size:
            x = cutout(x, cutout_size, gen)
        with autocast(ctx.device, ctx.precision):
            loss = loss_fn(model, x, clean.y[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc} diverged: loss {float(loss)} at step {step} of {steps} (lr={lr}, "
                                     f"batch {batch}, batchnorm={batchnorm}, grad_clip={grad_clip})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step, steps)
    model.eval()
    return {"steps": steps, "batch_size": batch, "batchnorm": batchnorm, "grad_clip": grad_clip,
            "final_loss": float(loss.detach())}
