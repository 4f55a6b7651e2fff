"""ShapPruning: Shapley values of channels under the reversed trigger (Guan et al., CVPR 2022; docs/defense_methods.md §2).

1. Reverse every label's trigger on the clean (or, at budget 0, synthetic) images; MAD picks the target.
   No label flagged: the reversal's ``when_undetected`` decides (``skip``: the model is returned unchanged).
2. Estimate each channel's Shapley value for the soft ASR of the reversed trigger by truncated
   Monte-Carlo removal walks (Neuron Shapley): a walk removes channels one by one and credits each with
   the drop it causes; once the soft ASR stays under ``tau_d`` for ``c_d`` steps the rest of the walk is
   discarded (marginal 0). Walks are epsilon-greedy: mostly the current top channels first.
   All prefixes of a walk chunk are scored in one batched forward pass (coalition masks). Walks stop when
   the estimate has converged: every one of the top ``k_max`` channels has a standard error of at most
   ``rse_tol`` times its value (after ``min_walks``), or at ``max_walks`` / ``max_evaluations``; the record says
   which. (A rule on the top set staying the same was met by construction: the exploit walks keep it.)
3. Prune the fewest channels, in rank order, that silence the reversed trigger (its hard ASR at most ``tau_asr``)
   under the accuracy guard; where no count the guard passes silences it, the outliers the guard passes (channels
   with a positive value above ``median + outlier_mads * MAD`` of the positive values). Never more than ``k_max``,
   floor(1 %) of the channels and at least one ("under 1 % of neurons"), unless ``exceed_k_max`` is set, and never
   a count the guard failed. No fine-tuning. The rule before (every outlier of all channels first, then more until
   silent, at most ceil(1 %)) is ``stop=outliers_first outliers_among=all k_max_rounding=ceil``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from bdbench.augment import Augment
from bdbench.schema import Fraction, NonNegative, Positive, PositiveInt
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense
from bdbench.defenses.guard import Guard, largest_passing_count
from bdbench.defenses.masks import (Neurons, coalition_logits, coalition_scorer, conv_neurons, prefix_masks,
                            prune_channels)
from bdbench.defenses.reversal import TriggerReversal, carriers

VALUES = ("soft_asr", "asr_minus_acc")
PLAYERS = ("all", "last_stage")
AMONG = ("positive", "all")
STOPS = ("fewest_silencing", "outliers_first")
ROUNDING = {"floor": math.floor, "ceil": math.ceil}


def robust_outliers(values: torch.Tensor, mads: float, among: str = "positive") -> torch.Tensor:
    """Indices of the values above ``median + mads * 1.4826 * MAD``, largest first; the median and MAD of the
    positive values only (``among="positive"``). Over all channels the mass of near-zero values makes the MAD tiny
    and flags dozens (so every cell pruned its maximum); a channel that does not carry the trigger has no positive
    value to be an outlier of."""
    pool = (values > 0).nonzero().squeeze(1) if among == "positive" else torch.arange(len(values), device=values.device)
    if len(pool) == 0:
        return pool
    part = values[pool]
    med = part.median()
    mad = 1.4826 * (part - med).abs().median()
    out = pool[part > med + mads * mad]
    return out[values[out].argsort(descending=True)]


def pruning_carriers(clean: CleanData, augment, num_classes: int, single: int, default: int, max_carriers: int,
                     gen: torch.Generator) -> CleanData:
    """ShapPruning's and ℓ∞ pruning's carriers: A = 16 augmentations per image with one image per class, 4 otherwise
    (docs/defense_methods.md §2.1), at most ``max_carriers``."""
    copies = single if len(clean) <= num_classes else default
    return carriers(clean, augment, copies, min(len(clean) * single, max_carriers), gen)


@register_defense("shap_pruning")
class ShapPruning(Defense):
    def __init__(self, *, reversal: TriggerReversal, augment: Augment, images_per_pass: dict[str, int],
                 players: Literal[PLAYERS], value: Literal[VALUES], lambda_acc: NonNegative, tau_d: Fraction,
                 c_d: PositiveInt, eps: Fraction, k_g_frac: Fraction, max_walks: PositiveInt,
                 max_evaluations: PositiveInt, min_walks: PositiveInt, rse_tol: Positive, outlier_mads: Positive,
                 outliers_among: Literal[AMONG], stop: Literal[STOPS], tau_asr: Fraction, delta_acc: Fraction,
                 min_agreement: Fraction, k_max_frac: Fraction, k_max_rounding: Literal[tuple(ROUNDING)],
                 exceed_k_max: bool, rounds: PositiveInt, copies_single: PositiveInt, copies: PositiveInt,
                 max_carriers: PositiveInt) -> None:
        self.reversal, self.augment, self.images_per_pass = reversal, augment, images_per_pass
        self.players, self.value, self.lambda_acc = players, value, lambda_acc
        self.tau_d, self.c_d, self.eps, self.k_g_frac = tau_d, c_d, eps, k_g_frac
        self.max_walks, self.max_evaluations, self.min_walks, self.rse_tol = max_walks, max_evaluations, min_walks, rse_tol
        self.outlier_mads, self.tau_asr, self.delta_acc, self.min_agreement = outlier_mads, tau_asr, delta_acc, min_agreement
        self.k_max_frac, self.exceed_k_max, self.rounds = k_max_frac, exceed_k_max, rounds
        self.outliers_among, self.stop, self.k_max_rounding = outliers_among, stop, k_max_rounding
        self.copies_single, self.copies, self.max_carriers = copies_single, copies, max_carriers

    def needs(self) -> dict[str, int]:
        return {"groups": 1} if self.players == "last_stage" else {}

    def repair(self, model, clean: CleanData, ctx: DefenseContext) -> dict:
        per_pass = self.images_per_pass[ctx.device.type]
        rev = self.reversal(model, clean, self.augment, ctx)
        neurons = conv_neurons(model)
        n = neurons.n
        k_max = max(1, ROUNDING[self.k_max_rounding](self.k_max_frac * n))
        if not rev.act:  # nothing flagged and when_undetected=skip: BackdoorBench returns the model unchanged
            return {**rev.report(), "neurons": n, "pruned": 0, "k_max": k_max}
        gen = ctx.generator("shap_pruning")
        aug = pruning_carriers(clean, self.augment, ctx.num_classes, self.copies_single, self.copies, self.max_carriers,
                               gen)
        bd_x = rev.stamp(aug.x[aug.y != rev.target])
        players = self._players(model, neurons)
        guard = Guard(model, neurons, aug, mode="acc", delta_acc=self.delta_acc, min_agreement=self.min_agreement,
                      images_per_pass=per_pass, precision=ctx.precision)
        base = torch.ones(n, device=ctx.device)
        pruned: list[int] = []
        rounds = []
        for _ in range(self.rounds):
            live = players[base[players] > 0]
            budget = k_max - len(pruned)
            phi, stats = self._shapley(model, neurons, live, base, bd_x, aug, rev.target, per_pass, ctx, gen,
                                       top=max(budget, 1))
            order = live[phi[live].argsort(descending=True)]
            outliers = robust_outliers(phi[live], self.outlier_mads, self.outliers_among)
            chosen, mitigation = self._mitigate(model, neurons, order, rev.target, len(outliers), budget, base,
                                                bd_x, guard, per_pass, ctx)
            rounds.append({**stats, "outliers": len(outliers), **mitigation,
                           "top_phi": [round(float(v), 4) for v in phi[order[:10]]]})
            if not chosen:
                break
            base[chosen] = 0
            pruned += chosen
        prune_channels(neurons, pruned)
        return {**rev.report(), "players": len(players), "neurons": n, **rounds[0]["guard"], "pruned": len(pruned),
                "pruned_fraction": len(pruned) / n, "pruned_channels": neurons.describe(pruned), "k_max": k_max,
                "exceed_k_max": self.exceed_k_max, "carriers": len(bd_x), "guard_acc0": guard.acc0,
                "value": self.value, "rounds": rounds, "images_per_pass": per_pass}

    def _players(self, model, neurons: Neurons) -> torch.Tensor:
        layer = neurons.layer_of()
        if self.players == "last_stage":
            last = model.groups[-1] + "."
            keep = torch.tensor([name.startswith(last) for name in neurons.names])[layer]
            return keep.nonzero().squeeze(1).to(next(model.parameters()).device)
        return torch.arange(neurons.n, device=next(model.parameters()).device)

    def _carrier_images(self, bd_x, aug) -> torch.Tensor:
        return torch.cat([bd_x, aug.x]) if self.value == "asr_minus_acc" else bd_x

    def _values(self, logits, n_bd: int, aug, target) -> tuple[torch.Tensor, torch.Tensor]:
        """(v(S), soft ASR) per coalition from its logits [G, N, K]: v is the soft ASR on the carriers (minus soft
        clean accuracy); truncation always looks at the soft ASR, whatever v is."""
        prob = logits.softmax(-1)
        soft_asr = prob[:, :n_bd, target].mean(1)
        if self.value == "soft_asr":
            return soft_asr, soft_asr
        soft_acc = prob[:, n_bd:].gather(-1, aug.y.expand(len(logits), -1)[..., None]).mean((1, 2))
        return soft_asr - self.lambda_acc * soft_acc, soft_asr

    def _shapley(self, model, neurons, live, base, bd_x, aug, target, per_pass, ctx, gen, top: int):
        """Truncated Monte-Carlo removal walks, epsilon-greedy, prefixes scored a chunk at a time, until the
        ``top`` leading estimates have converged. Returns (phi, what the walks did)."""
        n, dev = neurons.n, ctx.device
        x = self._carrier_images(bd_x, aug)
        chunk = max(1, per_pass // len(x))
        with coalition_scorer(model, neurons, x, per_pass, ctx.precision) as score:
            def values(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return self._values(score(masks), len(bd_x), aug, target)

            total, count = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
            squares = torch.zeros(n, device=dev)
            k_g = max(1, math.ceil(self.k_g_frac * n))
            v_full = float(values(base[None])[0][0])
            evals, walks, reason, rse = 0, 0, "max_walks", math.inf
            for walks in ctx.progress(range(1, self.max_walks + 1), desc="shap_pruning walks (at most)"):
                est = total / count.clamp_min(1)
                perm = live[torch.randperm(len(live), generator=gen, device=dev)]
                if walks > 1 and torch.rand(1, generator=gen, device=dev).item() >= self.eps:  # exploit
                    first = live[est[live].argsort(descending=True)[:k_g]]
                    rest = perm[~torch.isin(perm, first)]
                    perm = torch.cat([first[torch.randperm(len(first), generator=gen, device=dev)], rest])
                prev, below, j = v_full, 0, 0
                while j < len(perm):
                    counts = torch.arange(j + 1, min(j + chunk, len(perm)) + 1, device=dev)
                    masks = prefix_masks(perm, counts, n) * base
                    v_s, soft_asr = values(masks)
                    evals += len(v_s)
                    for v, a in zip(v_s.tolist(), soft_asr.tolist()):
                        total[perm[j]] += prev - v
                        squares[perm[j]] += (prev - v) ** 2
                        count[perm[j]] += 1
                        prev, j = v, j + 1
                        below = below + 1 if a <= self.tau_d else 0
                        if below >= self.c_d:  # discarded: the rest of the walk counts with marginal 0
                            count[perm[j:]] += 1
                            j = len(perm)
                            break
                if walks >= self.min_walks:
                    rse = self._top_rse(total, squares, count, live, top)
                    if rse <= self.rse_tol:
                        reason = "converged"
                        break
                if evals >= self.max_evaluations:  # a budget in work, not seconds: the same on any machine and load
                    reason = "max_evaluations"
                    break
            if walks < self.min_walks or reason != "converged":
                rse = self._top_rse(total, squares, count, live, top)
            return total / count.clamp_min(1), {"walks": walks, "evaluations": evals, "stop": reason,
                                                "converged": reason == "converged", "top_rse": round(rse, 4)}

    @staticmethod
    def _top_rse(total, squares, count, live, top: int) -> float:
        """The largest relative standard error, SE / |phi|, among the ``top`` leading estimates."""
        c = count[live].clamp_min(1)
        mean = total[live] / c
        var = (squares[live] / c - mean ** 2).clamp_min(0) * c / (c - 1).clamp_min(1)
        lead = mean.argsort(descending=True)[:top]
        se = (var[lead] / c[lead]).sqrt()
        return float((se / mean[lead].abs().clamp_min(1e-12)).max())

    def _mitigate(self, model, neurons, order, target, n_outliers, k_max, base, bd_x, guard, per_pass, ctx):
        """The fewest channels by rank that silence the reversed trigger, else the outliers, under the guard.

        Every prefix up to ``k_max`` (or the outlier count, with ``exceed_k_max``) is scored in one batched
        pass; the count kept is one the guard passed, as are all smaller ones. Pruning every outlier first
        cost accuracy where fewer channels already silenced the trigger (results/README.md).
        Returns the chosen channels and the record of the decision.
        """
        limit = min(len(order), max(k_max, n_outliers if self.exceed_k_max else 0, 0))
        counts = torch.arange(0, limit + 1, device=ctx.device)
        masks = prefix_masks(order, counts, neurons.n) * base
        logits = coalition_logits(model, neurons, masks, torch.cat([bd_x, guard.clean.x]), per_pass, ctx.precision)
        asr = (logits[:, :len(bd_x)].argmax(-1) == target).float().mean(1)
        verdict = guard.judge(logits[:, len(bd_x):])
        passing = largest_passing_count(counts, verdict.passes)
        if self.stop == "outliers_first":  # every outlier the guard passes, then more by rank until silent
            p, stop = min(passing, n_outliers, limit), "outliers"
            while p < passing and asr[p] > self.tau_asr:
                p, stop = p + 1, "silent"
        else:
            silent = [c for c in range(passing + 1) if asr[c] <= self.tau_asr]  # 0: the trigger never worked
            p, stop = (silent[0], "silent") if silent else (min(passing, n_outliers, limit), "outliers")
        return order[:p].tolist(), {"guard": guard.report(counts, verdict, p), "stop_rule": stop,
                                    "rev_asr_curve": [round(v, 4) for v in asr.tolist()]}
