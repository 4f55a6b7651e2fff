"""The accuracy guard: a pruning is accepted only if the defender's own clean images still pass.

Checked on the augmented clean images (never the test set). With real images the guard is clean
accuracy within ``delta_acc`` of the original; on synthetic images (budget 0) the labels are only
synthesis targets, so it is top-1 agreement with the original model, at least ``min_agreement``. Every
mode also asks that the predictions still cover every class the unpruned model predicts on those images:
a pruning that sends everything to a few classes is a collapse, whatever its accuracy.
Coalitions are checked in batches (``coalition_logits``), so a whole pruning sweep is one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bdbench.defenses.base import CleanData
from bdbench.defenses.masks import Neurons, coalition_logits


@dataclass
class GuardResult:
    passes: torch.Tensor     # [G] bool
    acc: torch.Tensor        # [G] accuracy on the guard images
    agreement: torch.Tensor  # [G] top-1 agreement with the unpruned model
    classes: torch.Tensor    # [G] classes the predictions cover


class Guard:
    def __init__(self, model: nn.Module, neurons: Neurons, clean: CleanData, *, mode: str, delta_acc: float,
                 min_agreement: float, images_per_pass: int, precision: str = "fp32") -> None:
        if mode not in ("acc", "agreement", "both"):
            raise ValueError(f"guard mode={mode!r}; valid: acc, agreement, both")
        self.model, self.neurons, self.clean = model, neurons, clean
        self.mode = "agreement" if clean.source == "synthetic" else mode
        self.delta_acc, self.min_agreement = delta_acc, min_agreement
        self.images_per_pass, self.precision = images_per_pass, precision
        full = torch.ones(1, neurons.n, device=clean.x.device)
        self.reference = coalition_logits(model, neurons, full, clean.x, images_per_pass, precision)[0].argmax(1)
        self.acc0 = float((self.reference == clean.y).float().mean())
        self.classes0 = len(self.reference.unique())

    @property
    def minimum(self) -> float:
        """The value a pruning must reach: accuracy (modes acc, both) or agreement (mode agreement)."""
        return self.min_agreement if self.mode == "agreement" else self.acc0 - self.delta_acc

    def judge(self, logits: torch.Tensor) -> GuardResult:
        """Verdicts from coalition logits on the guard images, [G, N, K]."""
        pred = logits.argmax(-1)
        acc = (pred == self.clean.y).float().mean(1)
        agree = (pred == self.reference).float().mean(1)
        classes = class_coverage(pred, logits.shape[-1])
        ok_acc, ok_agree = acc >= self.acc0 - self.delta_acc - 1e-9, agree >= self.min_agreement
        passes = {"acc": ok_acc, "agreement": ok_agree, "both": ok_acc & ok_agree}[self.mode]
        return GuardResult(passes & (classes >= self.classes0), acc, agree, classes)

    def __call__(self, masks: torch.Tensor) -> GuardResult:
        return self.judge(coalition_logits(self.model, self.neurons, masks, self.clean.x, self.images_per_pass,
                                           self.precision))

    def report(self, counts: torch.Tensor | list[int], result: GuardResult, pruned: int) -> dict:
        """What a record says of the guard: every prefix it tried, the bar and the count kept."""
        counts = [int(c) for c in counts]
        value = result.agreement if self.mode == "agreement" else result.acc
        out = {"guard_mode": self.mode, "guard_min": round(self.minimum, 6),
               "guard_curve": [[c, round(float(v), 6)] for c, v in zip(counts, value)],
               "guard_classes_min": self.classes0,
               "guard_classes_curve": [[c, int(v)] for c, v in zip(counts, result.classes)], "pruned": pruned}
        if self.mode == "both":
            out.update(guard_agreement_min=self.min_agreement,
                       guard_agreement_curve=[[c, round(float(v), 6)] for c, v in zip(counts, result.agreement)])
        return out


def class_coverage(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How many classes each row of predictions [G, N] uses."""
    hits = torch.zeros(pred.shape[0], num_classes, dtype=torch.bool, device=pred.device)
    return hits.scatter_(1, pred, True).sum(1)


def longest_passing_prefix(passes: torch.Tensor) -> int:
    """How many leading entries pass (a sweep stops at the first failure)."""
    fails = (~passes).nonzero()
    return int(fails[0]) if len(fails) else len(passes)


def largest_passing_count(counts: torch.Tensor | list[int], passes: torch.Tensor) -> int:
    """The pruned count a sweep keeps: the largest count before the first failing one.

    ``counts[0]`` is 0, the unpruned model, which passes by construction; if it somehow does not,
    nothing is pruned. (Counting the unpruned model as a prefix and returning the prefix length gave the
    first *failing* count: ShapPruning pruned one channel more than its guard had passed.)
    """
    kept = longest_passing_prefix(passes)
    return int(counts[kept - 1]) if kept else 0
