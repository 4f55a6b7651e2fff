"""NAD: Neural Attention Distillation (Li et al., ICLR 2021; ``bboylyg/NAD``; docs/defense_methods.md §7.3).

A teacher is the backdoored model fine-tuned on the clean images; the student (the backdoored model)
is then fine-tuned with cross-entropy plus the attention-map distance to the teacher at the model's
last three feature groups, weighted ``betas``. The reference code's schedules become step schedules
by the step rule, and its checkpointing by test metrics is not replicated: the final model is kept.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F

from bdbench.augment import Augment
from bdbench.schema import Positive
from bdbench.defenses.attention import at_loss, feature_taps, forward_with_features
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense
from bdbench.defenses.finetune import Schedule, finetune


def teacher_of(model, clean: CleanData, ctx: DefenseContext, schedule: Schedule, augment: Augment):
    """A frozen copy of the model fine-tuned on the clean images with cross-entropy only."""
    teacher = copy.deepcopy(model)
    report = finetune(teacher, clean, ctx, schedule, augment, desc="teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), report


@register_defense("nad")
class NAD(Defense):
    def __init__(self, *, augment: Augment, teacher: Schedule, student: Schedule, betas: list[float],
                 p: Positive, lr0: Positive | None) -> None:
        if len(betas) < 1:
            raise ValueError(f"nad betas={list(betas)!r}; valid: one weight per distilled feature group")
        # lr0, a named deviation: teacher and student start at lr0 instead of the code's 0.1
        self.augment, self.teacher, self.student = augment, teacher.starting_at(lr0), student.starting_at(lr0)
        self.betas, self.p = tuple(betas), p

    def needs(self) -> dict[str, int]:
        return {"groups": len(self.betas)}

    def repair(self, student, clean: CleanData, ctx: DefenseContext) -> dict:
        teacher, t_report = teacher_of(student, clean, ctx, self.teacher, self.augment)
        if len(self.betas) > len(student.groups):
            raise ValueError(f"nad betas={list(self.betas)!r}: {type(student).__name__} has {len(student.groups)} groups")
        k = len(self.betas)
        with feature_taps(student) as s_taps, feature_taps(teacher) as t_taps:
            def loss_fn(m, x, y):
                logits, fs = forward_with_features(m, s_taps, x, k)
                _, ft = forward_with_features(teacher, t_taps, x, k)
                return F.cross_entropy(logits, y) + sum(b * at_loss(s, t.detach(), self.p)
                                                        for b, s, t in zip(self.betas, fs, ft))

            s_report = finetune(student, clean, ctx, self.student, self.augment, loss_fn=loss_fn, desc="nad")
        return {"teacher": t_report, "student": s_report, "betas": list(self.betas), "groups": list(student.groups[-k:])}
