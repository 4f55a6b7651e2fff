"""NAD: Neural Attention Distillation (Li et al., ICLR 2021; ``bboylyg/NAD``; defenses.md §7.3).

A teacher is the backdoored model fine-tuned on the clean images; the student (the backdoored model)
is then fine-tuned with cross-entropy plus the attention-map distance to the teacher at the model's
last three feature groups, weighted ``betas``. The reference code's schedules become step schedules
by the step rule, and its checkpointing by test metrics is not replicated: the final model is kept.
"""

from __future__ import annotations

import copy
import time

import torch.nn.functional as F

from bench.augment import Augment
from defenses.attention import at_loss, feature_taps, forward_with_features
from defenses.base import CleanData, Defense, DefenseContext, register_defense
from defenses.finetune import check_batchnorm, finetune


def teacher_of(model, clean: CleanData, ctx: DefenseContext, augment: Augment, **schedule):
    """A frozen copy of the model fine-tuned on the clean images with cross-entropy only."""
    teacher = copy.deepcopy(model)
    report = finetune(teacher, clean, ctx, augment=augment, desc="teacher", **schedule)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), report


@register_defense("nad")
class NAD(Defense):
    def __init__(self, augment: dict, teacher: dict, student: dict, betas: tuple[float, ...] = (500.0, 1000.0, 1000.0),
                 p: float = 2.0) -> None:
        if len(betas) < 1:
            raise ValueError(f"nad betas={list(betas)!r}; valid: one weight per distilled feature group")
        self.augment, self.teacher, self.student = Augment(**augment), dict(teacher), dict(student)
        self.betas, self.p = tuple(betas), p
        for schedule in (self.teacher, self.student):
            check_batchnorm(schedule["batchnorm"])
        self._report: dict = {}

    def apply(self, model, clean: CleanData, ctx: DefenseContext):
        start = time.perf_counter()
        student = copy.deepcopy(model)
        teacher, t_report = teacher_of(model, clean, ctx, self.augment, **self.teacher)
        if len(self.betas) > len(student.groups):
            raise ValueError(f"nad betas={list(self.betas)!r}: {type(model).__name__} has {len(student.groups)} groups")
        k = len(self.betas)
        with feature_taps(student) as s_taps, feature_taps(teacher) as t_taps:
            def loss_fn(m, x, y):
                logits, fs = forward_with_features(m, s_taps, x, k)
                _, ft = forward_with_features(teacher, t_taps, x, k)
                return F.cross_entropy(logits, y) + sum(b * at_loss(s, t.detach(), self.p)
                                                        for b, s, t in zip(self.betas, fs, ft))

            s_report = finetune(student, clean, ctx, augment=self.augment, loss_fn=loss_fn, desc="nad", **self.student)
        self._report = {"teacher": t_report, "student": s_report, "betas": list(self.betas),
                        "groups": list(student.groups[-k:]), "seconds": time.perf_counter() - start}
        return student

    def report(self):
        return self._report
