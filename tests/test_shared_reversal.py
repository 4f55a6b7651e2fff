"""NC, ℓ∞ and ShapPruning reverse the same triggers on the same model and images: the runner reverses once
per (poisoned model, clean images, reversal config), keeps it in the verified cache, and hands it over."""

from __future__ import annotations

import torch

from bdbench import runner
from bdbench.runner import run_cell
from bdbench.validate import build, validate
from bdbench.defenses.base import CleanData, DefenseContext

SHORT = ["nc_reversal.steps=40", "defense.schedule.min_steps=5"]


def test_one_reversal_per_model_and_budget_and_the_same_numbers(tiny_cfg, choices):
    shrink = {"nc": ["defense.schedule.min_steps=5"], "linf_pruning": [], "shap_pruning": ["defense.max_walks=3",
                                                                                   "defense.min_walks=1"]}
    records = {}
    for name in ("nc", "linf_pruning", "shap_pruning"):
        cfg = tiny_cfg(f"defense={name}", "budget=2", "nc_reversal.steps=40", *shrink[name])
        records[name] = run_cell(cfg, choices(cfg))
    assert [records[n]["reversal"]["reused"] for n in ("nc", "linf_pruning", "shap_pruning")] == [False, True, True]
    assert len({r["reversal"]["key"] for r in records.values()}) == 1
    per_label = {n: r["defense"]["mask_l1_per_label"] for n, r in records.items()}
    assert per_label["nc"] == per_label["linf_pruning"] == per_label["shap_pruning"]

    # The same reversal as a defense computes alone (numbers unchanged by sharing).
    cfg = tiny_cfg("defense=nc", "budget=2", "nc_reversal.steps=40", "defense.schedule.min_steps=5")
    data = build(cfg.dataset).load(cfg.paths.data, "cpu", cfg.paths.cache)
    model, _, _ = runner.poisoned_model(validate(cfg, cfg.hydra.runtime.choices), data)
    real = data.budget(2, int(cfg.seed))
    clean = CleanData(real.x.float().div(255), real.y.clone(), "real")
    ctx = DefenseContext(num_classes=10, input_shape=tuple(data.spec.shape), device=torch.device("cpu"), seed=0,
                         progress=lambda it, **kw: it)
    alone = build(cfg.defense)
    alone.apply(model, clean, ctx)
    assert alone.report()["mask_l1_per_label"] == per_label["nc"]


def test_a_budget_of_its_own_gets_a_reversal_of_its_own(tiny_cfg, choices):
    a = run_cell(cfg := tiny_cfg("defense=linf_pruning", "budget=1", *SHORT[:1]), choices(cfg))
    b = run_cell(cfg := tiny_cfg("defense=linf_pruning", "budget=2", *SHORT[:1]), choices(cfg))
    assert a["reversal"]["key"] != b["reversal"]["key"] and not b["reversal"]["reused"]
