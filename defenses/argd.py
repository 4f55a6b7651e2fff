"""ARGD: Attention Relation Graph Distillation (Xia et al., IJCAI 2022; ``BililiCode/ARGD``; docs/defense_methods.md §6).

NAD aligns attention maps of the same layer; ARGD aligns a graph of them: vertices are the attention
maps of three feature groups (weighted 2000/5000/2000 as in the code), edges are the normalised
distances between maps of different groups, and a global term aligns every student map with every
teacher map through SemCKD-style cross-layer attention. In the authors' code that cross-layer module
is never given to the optimiser, so it stays at its random initialisation with BatchNorm on batch
statistics: ``train_arg_module=false`` (default) reproduces that, ``true`` trains it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.augment import Augment
from bdbench.schema import NonNegative, Positive, PositiveInt
from bdbench.defenses.attention import attention, feature_taps, forward_with_features
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense
from bdbench.defenses.clp import CLP
from bdbench.defenses.finetune import Schedule, finetune
from bdbench.defenses.nad import teacher_of

TEACHERS = ("finetune", "clp")


def edge_distances(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per pair of groups (1,2), (2,3), (1,3): per-sample squared distance of their maps, the larger map
    average-pooled to the smaller one's size, clamped at 1e-12 and divided by its batch maximum."""
    out = []
    for i, j in ((0, 1), (1, 2), (0, 2)):
        a, b = maps[i], maps[j]
        if a.shape[-2:] != b.shape[-2:]:
            big, small = (a, b) if a.shape[-1] * a.shape[-2] > b.shape[-1] * b.shape[-2] else (b, a)
            a, b = F.adaptive_avg_pool2d(big, small.shape[-2:]), small
        d = (a - b).pow(2).flatten(1).sum(1).clamp_min(1e-12)
        out.append(d / d.max())
    return out


class CrossLayerAttention(nn.Module):
    """SemCKD-style alignment of every student group map with every teacher group map (docs/defense_methods.md §6.2)."""

    def __init__(self, groups: int, dim: int) -> None:
        super().__init__()
        self.dim, self.groups = dim, groups
        self.query = nn.ModuleList(nn.Sequential(nn.Linear(1, dim), nn.BatchNorm1d(dim)) for _ in range(groups))
        self.key = nn.ModuleList(nn.Sequential(nn.Linear(1, dim), nn.BatchNorm1d(dim), nn.ReLU()) for _ in range(groups))
        self.bilinear = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim * groups), nn.BatchNorm1d(dim * groups))
                                      for _ in range(groups))
        self.p_t = nn.Parameter(torch.empty(groups, dim))
        self.p_s = nn.Parameter(torch.empty(groups, dim))
        nn.init.xavier_normal_(self.p_t)
        nn.init.xavier_normal_(self.p_s)

    def forward(self, a_s: list[torch.Tensor], a_t: list[torch.Tensor]) -> torch.Tensor:
        b, g = a_s[0].shape[0], self.groups
        q = torch.stack([self.query[i](a_t[i].mean((2, 3))) for i in range(g)], 1)  # [B, g_t, d]
        keys = torch.stack([self.bilinear[j](self.key[j](a_s[j].mean((2, 3)))).view(b, g, self.dim)
                            for j in range(g)], 2)  # [B, g_t, g_s, d]: K_{j,i}
        logits = (keys * q[:, :, None]).sum(-1) + self.p_t @ self.p_s.T  # [B, g_t, g_s]
        alpha = (logits / math.sqrt(self.dim)).softmax(-1)
        loss = a_s[0].new_zeros(())
        for i in range(g):
            v_t = F.normalize(a_t[i].pow(2).flatten(1), dim=1)
            for j in range(g):
                v_s = F.normalize(F.adaptive_avg_pool2d(a_s[j].pow(2), a_t[i].shape[-2:]).flatten(1), dim=1)
                loss = loss + (alpha[:, i, j] * (v_s - v_t).pow(2).mean(1)).mean()
        return loss


@register_defense("argd")
class ARGD(Defense):
    def __init__(self, *, augment: Augment, teacher_schedule: Schedule, student: Schedule,
                 vertex_weights: list[float], w_vertex: NonNegative, w_edge: NonNegative, w_global: NonNegative,
                 train_arg_module: bool, teacher: Literal[TEACHERS], clp_teacher: CLP, lr0: Positive | None,
                 p: Positive, arg_dim: PositiveInt) -> None:
        if len(vertex_weights) != 3:
            raise ValueError(f"argd vertex_weights={list(vertex_weights)!r}; valid: three weights")
        # lr0, a named deviation: teacher and student start at lr0 instead of the code's 0.1
        teacher_schedule, student = teacher_schedule.starting_at(lr0), student.starting_at(lr0)
        self.augment, self.teacher_schedule, self.student, self.clp_teacher = augment, teacher_schedule, student, clp_teacher
        self.vertex_weights, self.w_vertex, self.w_edge, self.w_global = tuple(vertex_weights), w_vertex, w_edge, w_global
        self.train_arg_module, self.teacher, self.p, self.arg_dim = train_arg_module, teacher, p, arg_dim

    def _teacher(self, model, clean, ctx):
        if self.teacher == "clp":  # a data-free teacher (extension for budget 0)
            teacher = self.clp_teacher.apply(model, clean, ctx)
            for q in teacher.parameters():
                q.requires_grad_(False)
            return teacher.eval(), {"clp": self.clp_teacher.report()}
        return teacher_of(model, clean, ctx, self.teacher_schedule, self.augment)

    def needs(self) -> dict[str, int]:
        return {"groups": 3, **({"conv_bn_pairs": 1} if self.teacher == "clp" else {})}

    def repair(self, student, clean: CleanData, ctx: DefenseContext) -> dict:
        if len(student.groups) < 3:
            raise ValueError(f"argd needs three feature groups; {type(student).__name__} declares {len(student.groups)}")
        teacher, t_report = self._teacher(student, clean, ctx)
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            torch.manual_seed(ctx.seed)  # the cross-layer module's fixed random initialisation
            arg = CrossLayerAttention(3, self.arg_dim).to(ctx.device).train()
        arg.requires_grad_(self.train_arg_module)
        params = list(student.parameters()) + (list(arg.parameters()) if self.train_arg_module else [])
        terms = {"vertex": 0.0, "edge": 0.0, "global": 0.0}
        with feature_taps(student) as s_taps, feature_taps(teacher) as t_taps:
            def loss_fn(m, x, y):
                logits, fs = forward_with_features(m, s_taps, x, 3)
                with torch.no_grad():
                    _, ft = forward_with_features(teacher, t_taps, x, 3)
                a_s = [attention(f, self.p) for f in fs]
                a_t = [attention(f, self.p) for f in ft]
                vertex = sum(w * F.mse_loss(s, t) for w, s, t in zip(self.vertex_weights, a_s, a_t))
                edge = sum(F.mse_loss(s, t) for s, t in zip(edge_distances(a_s), edge_distances(a_t))) / 3
                glob = arg(a_s, a_t)
                terms.update(vertex=float(vertex.detach()), edge=float(edge.detach()), **{"global": float(glob.detach())})
                return F.cross_entropy(logits, y) + self.w_vertex * vertex + self.w_edge * edge + self.w_global * glob

            s_report = finetune(student, clean, ctx, self.student, self.augment, loss_fn=loss_fn, params=params,
                                desc="argd")
        return {"teacher": t_report, "teacher_kind": self.teacher, "student": s_report,
                "train_arg_module": self.train_arg_module, "last_terms": terms, "groups": list(student.groups[-3:])}
