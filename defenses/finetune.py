"""The fine-tuning loop that FT, and the later fine-tuning defenses, share.

One ``Schedule`` type describes every fine-tuning (FT, NC's unlearning, FP, NAD's and ARGD's teacher and
student, BS+AR, the optional fine-tuning after ℓ∞ and BSS pruning); ``conf/schedule`` holds the named ones.
Length is counted in steps, not epochs (docs/defense_methods.md §1.2): ``steps = max(epochs * ceil(n / B),
min_steps)`` with ``B = min(batch_size, n)``, so one image per class still gets a real schedule.
Batches are re-drawn from the clean set with the data set's augmentation. BatchNorm runs in one mode
for every cell, whatever the model or batch: ``batchnorm=train`` (default), as every reference code
fine-tunes (BackdoorBench's trainer, NAD, ARGD, ANP, the AR authors' code call ``model.train()``), or the
named variant ``batchnorm=frozen`` (running statistics kept). ``grad_clip`` (a max gradient norm) is a
named variant too; null = none, as the references.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.augment import Augment
from bdbench.device import autocast
from bdbench.schema import Count, Fraction, NonNegative, Positive, PositiveInt
from bdbench.train import BatchStream
from bdbench.defenses.base import CleanData, DefenseContext


def step_count(n: int, epochs: int, batch_size: int, min_steps: int) -> tuple[int, int]:
    """(steps, batch) by the step rule; a batch never exceeds the clean set."""
    batch = min(batch_size, n)
    return max(epochs * math.ceil(n / batch), min_steps), batch


BATCHNORM = ("train", "frozen")


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A fine-tuning schedule (``conf/schedule``): SGD, its length by the step rule, the learning-rate shape and
    the BatchNorm policy. Every fine-tuning defense (and each stage of one) takes one of these."""

    epochs: Count
    batch_size: PositiveInt
    min_steps: Count
    lr: Positive
    momentum: Fraction
    weight_decay: NonNegative
    nesterov: bool
    shape: Literal["cosine", "piecewise"]
    piecewise: list[list[float]] | None  # [[start fraction, lr factor], ...] when shape is piecewise
    cutout_size: Count
    batchnorm: Literal[BATCHNORM]
    grad_clip: Positive | None  # max gradient norm; null = none (the references)

    def steps(self, n: int) -> tuple[int, int]:
        return step_count(n, self.epochs, self.batch_size, self.min_steps)

    def starting_at(self, lr: float | None) -> "Schedule":
        """This schedule from learning rate ``lr`` (its shape unchanged); itself when ``lr`` is None."""
        return self if lr is None else dataclasses.replace(self, lr=lr)


def freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def set_train_mode(model: nn.Module, batchnorm: str) -> None:
    """``model.train()``, with BatchNorm layers back in eval mode under ``batchnorm=frozen``."""
    if batchnorm not in BATCHNORM:
        raise ValueError(f"batchnorm={batchnorm!r}; valid: {', '.join(BATCHNORM)}")
    model.train()
    if batchnorm == "frozen":
        freeze_batchnorm(model)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Cutout as DeVries & Taylor's and NAD's/ARGD's code compute it: one hole per image, centre (y, x) uniform,
    rows [y - size//2, y + size//2) and the same columns, clipped at the border. An odd ``size`` makes a hole of
    side size - 1 (``Cutout(1, 3)`` blanks 2 x 2 pixels), as in those codes."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), generator=gen, device=gen.device).to(x.device)
    cx = torch.randint(0, w, (n, 1, 1), generator=gen, device=gen.device).to(x.device)
    rows, cols = torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]
    half = size // 2
    hole = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
    return x * (~hole)[:, None].to(x.dtype)


def piecewise_lr(piecewise: list[list[float]], steps: int) -> Callable[[int], float]:
    """A step-indexed factor for LambdaLR from [[start fraction, lr factor], ...] (epochs rescaled to steps)."""
    bounds = sorted((int(round(frac * steps)), factor) for frac, factor in piecewise)
    return lambda step: next(f for b, f in reversed(bounds) if step >= b)


def finetune(model: nn.Module, clean: CleanData, ctx: DefenseContext, schedule: Schedule, augment: Augment, *,
             loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             params: list[torch.nn.Parameter] | None = None, after_step: Callable[[int, int], None] | None = None,
             desc: str = "finetune") -> dict:
    """SGD on augmented batches of ``clean`` under ``schedule``, in place.

    ``params`` defaults to the model's; ``after_step(step, steps)`` runs after each optimizer step
    (e.g. a decoupled shrinkage). Returns what it ran.
    """
    s = schedule
    steps, batch = s.steps(len(clean))
    optimizer = torch.optim.SGD(params if params is not None else model.parameters(), lr=s.lr, momentum=s.momentum,
                                weight_decay=s.weight_decay, nesterov=s.nesterov)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if s.shape == "cosine" else \
        torch.optim.lr_scheduler.LambdaLR(optimizer, piecewise_lr(s.piecewise or [[0.0, 1.0]], steps))
    gen = ctx.generator(desc)
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    set_train_mode(model, s.batchnorm)
    stream = BatchStream(len(clean), gen, ctx.device)
    for step in ctx.progress(range(steps), desc=desc):
        idx = stream.take(batch)
        x = augment(clean.x[idx], gen)
        if s.cutout_size:
            x = cutout(x, s.cutout_size, gen)
        with autocast(ctx.device, ctx.precision):
            loss = loss_fn(model, x, clean.y[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc} diverged: loss {float(loss.detach())} at step {step} of {steps} "
                                     f"(lr={s.lr}, batch {batch}, batchnorm={s.batchnorm}, grad_clip={s.grad_clip})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step, steps)
    model.eval()
    return {"steps": steps, "batch_size": batch, "batchnorm": s.batchnorm, "grad_clip": s.grad_clip,
            "final_loss": float(loss.detach())}
