"""The accuracy guard: a pruning is accepted only if the defender's own clean images still pass.

Checked on the augmented clean images (never the test set). With real images the guard is clean
accuracy within ``delta_acc`` of the original; on synthetic images (budget 0) the labels are only
synthesis targets, so it is top-1 agreement with the original model, at least ``min_agreement``.
Coalitions are checked in batches (``coalition_logits``), so a whole pruning sweep is one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from defenses.base import CleanData
from defenses.masks import Neurons, coalition_logits


@dataclass
class GuardResult:
    passes: torch.Tensor     # [G] bool
    acc: torch.Tensor        # [G] accuracy on the guard images
    agreement: torch.Tensor  # [G] top-1 agreement with the unpruned model


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

    def judge(self, logits: torch.Tensor) -> GuardResult:
        """Verdicts from coalition logits on the guard images, [G, N, K]."""
        pred = logits.argmax(-1)
        acc = (pred == self.clean.y).float().mean(1)
        agree = (pred == self.reference).float().mean(1)
        ok_acc, ok_agree = acc >= self.acc0 - self.delta_acc - 1e-9, agree >= self.min_agreement
        passes = {"acc": ok_acc, "agreement": ok_agree, "both": ok_acc & ok_agree}[self.mode]
        return GuardResult(passes, acc, agree)

    def __call__(self, masks: torch.Tensor) -> GuardResult:
        return self.judge(coalition_logits(self.model, self.neurons, masks, self.clean.x, self.images_per_pass,
                                           self.precision))


def longest_passing_prefix(passes: torch.Tensor) -> int:
    """How many leading entries pass (a sweep stops at the first failure)."""
    fails = (~passes).nonzero()
    return int(fails[0]) if len(fails) else len(passes)
