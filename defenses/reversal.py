"""Neural Cleanse trigger reversal for all labels at once, with MAD target detection (docs/defense_methods.md §1.3).

For each label t a mask m_t [1, H, W] and a pattern p_t [C, H, W] (both tanh-parametrised in pixel
space) are optimised so that ``(1 - m) * x + m * p`` is classified as t with the smallest ``|m|_1``.
All labels share one batch with per-row targets, so K labels cost one forward-backward per step;
each label keeps its own cost schedule and stops on its own (BackdoorBench's ``nc`` logic).
The label whose mask is abnormally small (MAD anomaly index > 2) is the detected target. When no label
is flagged, ``when_undetected=skip`` (BackdoorBench) tells the defense to return the model unchanged;
``force`` acts on the most anomalous label anyway, a named variant. One rule for NC, ℓ∞ and ShapPruning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.augment import Augment
from bdbench.device import autocast
from bdbench.schema import Fraction, Positive, PositiveInt, Range
from bdbench.defenses.base import CleanData, DefenseContext


UNDETECTED = ("skip", "force")


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (1 - mask) * x + mask * pattern


def mad_anomaly(norms: torch.Tensor) -> torch.Tensor:
    """Anomaly index ``(median - n_t) / (1.4826 * MAD)``: large for labels with unusually small masks."""
    med = norms.median()
    mad = 1.4826 * (norms - med).abs().median()
    return (med - norms) / mad.clamp_min(1e-12)


@dataclass
class Reversal:
    """Reversed triggers of every label and the detection outcome."""

    masks: torch.Tensor      # [K, 1, H, W] in [0, 1]
    patterns: torch.Tensor   # [K, C, H, W] in [0, 1]
    l1: torch.Tensor         # [K] mask L1 norms
    rev_asr: torch.Tensor    # [K] stamped clean images of other classes classified as t
    anomaly: torch.Tensor    # [K] MAD anomaly index
    target: int
    detected: bool
    steps: int
    when_undetected: str

    @property
    def act(self) -> bool:
        """Whether a defense should act on ``target``: flagged by MAD, or forced by config."""
        return self.detected or self.when_undetected == "force"

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the detected target's reversed trigger on ``x``."""
        return stamp(x, self.masks[self.target], self.patterns[self.target])

    def report(self) -> dict[str, Any]:
        return {"detected_target": self.target, "detected": self.detected, "when_undetected": self.when_undetected,
                "acted": self.act,
                "rev_asr": float(self.rev_asr[self.target]), "mask_l1": float(self.l1[self.target]),
                "mask_l1_per_label": [round(float(v), 2) for v in self.l1],
                "anomaly_index": [round(float(v), 3) for v in self.anomaly], "reversal_steps": self.steps}


def carriers(clean: CleanData, augment: Augment, copies: int, limit: int, gen: torch.Generator) -> CleanData:
    """Up to ``limit`` augmented copies of the clean images (at most ``copies`` of each). Where ``limit`` cuts,
    every class keeps as many as the others (+-1), its distinct images before their repeats: the clean images
    come sorted by class, so a plain cut would keep the first classes only (at 250 per class, 256 carriers were
    class 0 and six images of class 1)."""
    reps = max(1, min(copies, math.ceil(limit / max(len(clean), 1))))
    x, y = clean.x.repeat(reps, 1, 1, 1), clean.y.repeat(reps)
    x = augment(x, gen)
    if limit < len(y):
        rank = (F.one_hot(y).cumsum(0) - 1).gather(1, y[:, None]).squeeze(1)  # place within its class
        keep = (rank * (int(y.max()) + 1) + y).argsort(stable=True)[:limit].sort().values  # round robin
        x, y = x[keep], y[keep]
    return CleanData(x, y, clean.source)


class TriggerReversal:
    """``__call__(model, clean, augment, ctx) -> Reversal``; configured by ``nc_reversal`` (conf/config.yaml,
    BackdoorBench's ``nc`` config), shared by NC, ℓ∞ pruning and ShapPruning."""

    def __init__(self, *, steps: PositiveInt, lr: Positive, betas: list[float], init_cost: Positive,
                 cost_multiplier: Annotated[float, Range(gt=1)], patience: PositiveInt, asr_threshold: Fraction,
                 early_stop_threshold: Fraction, early_stop_patience: PositiveInt, check_every: PositiveInt,
                 copies: PositiveInt, max_carriers: PositiveInt, batch_per_label: PositiveInt | None,
                 mad_threshold: Positive, when_undetected: Literal[UNDETECTED]) -> None:
        self.steps, self.lr, self.betas = steps, lr, tuple(betas)
        self.init_cost, self.cost_multiplier, self.patience = init_cost, cost_multiplier, patience
        self.asr_threshold = asr_threshold
        self.early_stop_threshold, self.early_stop_patience = early_stop_threshold, early_stop_patience
        self.check_every, self.copies, self.max_carriers = check_every, copies, max_carriers
        self.batch_per_label, self.mad_threshold, self.when_undetected = batch_per_label, mad_threshold, when_undetected

    def __call__(self, model: nn.Module, clean: CleanData, augment: Augment, ctx: DefenseContext) -> Reversal:
        if ctx.reversal is not None:  # the runner's shared one: the same computation, made once
            return ctx.reversal
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return self._reverse(model, clean, augment, ctx)
        finally:
            for p in params:
                p.requires_grad_(True)

    def _reverse(self, model, clean, augment, ctx) -> Reversal:
        K, (C, H, W), dev = ctx.num_classes, ctx.input_shape, ctx.device
        gen = ctx.generator("reversal")
        pool = carriers(clean, augment, self.copies, self.max_carriers, gen).x
        b = min(self.batch_per_label or len(pool), len(pool))
        init = lambda *shape: torch.atanh((torch.rand(*shape, generator=gen, device=dev) - 0.5) * 1.98)
        mask_logit = init(K, 1, H, W).requires_grad_(True)
        pattern_logit = init(K, C, H, W).requires_grad_(True)
        opt = torch.optim.Adam([mask_logit, pattern_logit], lr=self.lr, betas=self.betas)
        labels = torch.arange(K, device=dev)
        cost = torch.full((K,), self.init_cost, device=dev)
        up = torch.zeros(K, dtype=torch.long, device=dev)
        down = torch.zeros_like(up)
        up_flag = torch.zeros(K, dtype=torch.bool, device=dev)
        down_flag = torch.zeros_like(up_flag)
        best_l1 = torch.full((K,), math.inf, device=dev)
        early_best = torch.full((K,), math.inf, device=dev)
        early_count = torch.zeros_like(up)
        best_mask = torch.zeros(K, 1, H, W, device=dev)
        best_pattern = torch.zeros(K, C, H, W, device=dev)
        active = torch.ones(K, dtype=torch.bool, device=dev)
        hits = torch.zeros(K, device=dev)
        step = 0
        for step in ctx.progress(range(1, self.steps + 1), desc="nc reversal"):
            act = active.nonzero().squeeze(1)
            idx = torch.randint(0, len(pool), (len(act), b), generator=gen, device=dev)
            m = (torch.tanh(mask_logit[act]) + 1) / 2
            p = (torch.tanh(pattern_logit[act]) + 1) / 2
            x = stamp(pool[idx], m[:, None], p[:, None]).flatten(0, 1)
            target = act.repeat_interleave(b)
            with autocast(dev, ctx.precision):
                logits = model(x).float()
            ce = F.cross_entropy(logits, target, reduction="none").view(len(act), b).mean(1)
            l1 = m.flatten(1).sum(1)
            loss = (ce + cost[act] * l1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                hits[act] += (logits.argmax(1) == target).float().view(len(act), b).mean(1)
            if step % self.check_every:
                continue
            with torch.no_grad():  # one check: the cost schedule and early stop of every active label
                asr = hits / self.check_every
                hits.zero_()
                ok = asr >= self.asr_threshold
                cur_m, cur_p = (torch.tanh(mask_logit) + 1) / 2, (torch.tanh(pattern_logit) + 1) / 2
                cur_l1 = cur_m.flatten(1).sum(1)
                improved = active & ok & (cur_l1 < best_l1)
                best_l1 = torch.where(improved, cur_l1, best_l1)
                best_mask[improved], best_pattern[improved] = cur_m[improved], cur_p[improved]
                up = torch.where(ok, up + 1, torch.zeros_like(up))
                down = torch.where(ok, torch.zeros_like(down), down + 1)
                raise_cost, lower_cost = active & (up >= self.patience), active & (down >= self.patience)
                cost = torch.where(raise_cost, cost * self.cost_multiplier, cost)
                cost = torch.where(lower_cost, cost / self.cost_multiplier, cost)
                up_flag |= raise_cost
                down_flag |= lower_cost
                up[raise_cost] = 0
                down[lower_cost] = 0
                seen = best_l1 < math.inf
                stalled = seen & (best_l1 >= self.early_stop_threshold * early_best)
                early_count = torch.where(stalled, early_count + 1, torch.zeros_like(early_count))
                early_best = torch.minimum(early_best, best_l1)
                active &= ~(up_flag & down_flag & (early_count >= self.early_stop_patience))
            if not active.any():
                break
        with torch.no_grad():
            final_m, final_p = (torch.tanh(mask_logit) + 1) / 2, (torch.tanh(pattern_logit) + 1) / 2
            found = best_l1 < math.inf  # a label that never reached the ASR threshold keeps its last trigger
            masks = torch.where(found[:, None, None, None], best_mask, final_m)
            patterns = torch.where(found[:, None, None, None], best_pattern, final_p)
            l1 = masks.flatten(1).sum(1)
            rev_asr = torch.stack([self._asr(model, clean, masks[t], patterns[t], t, ctx) for t in labels.tolist()])
            anomaly = mad_anomaly(l1)
            flagged = (anomaly > self.mad_threshold) & (l1 < l1.median())
            detected = bool(flagged.any())
            target = int(torch.where(flagged, anomaly, torch.full_like(anomaly, -math.inf)).argmax()) if detected \
                else int(anomaly.argmax())
        return Reversal(masks, patterns, l1, rev_asr, anomaly, target, detected, step, self.when_undetected)

    @staticmethod
    def _asr(model, clean: CleanData, mask, pattern, t: int, ctx) -> torch.Tensor:
        keep = clean.y != t
        if not keep.any():
            return torch.tensor(0.0, device=ctx.device)
        with autocast(ctx.device, ctx.precision):
            pred = model(stamp(clean.x[keep], mask, pattern)).argmax(1)
        return (pred == t).float().mean()
