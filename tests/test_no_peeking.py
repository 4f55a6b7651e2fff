"""A defense gets the model, k clean images per class and the context: nothing that reveals the test
set, the trigger, the target label or the poisoned indices (checked on what ``apply`` receives)."""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from bdbench.attacks.base import Attack
from bdbench.data import DataBundle, ImageSet
from bdbench.validate import build
from bdbench.defenses.base import CleanData, Defense, DefenseContext

SEEN: dict = {}


class SpyDefense(Defense):
    """Records what it is handed (instantiated by ``_target_: test_no_peeking.SpyDefense``)."""

    def repair(self, model, clean, ctx):
        SEEN.update(model=model, clean=clean, ctx=ctx)
        return {}


def test_apply_takes_only_model_clean_and_context():
    assert list(inspect.signature(Defense.apply).parameters) == ["self", "model", "clean", "ctx"]
    fields = {f.name for f in dataclasses.fields(DefenseContext)}
    assert fields == {"num_classes", "input_shape", "device", "seed", "precision", "progress", "shared"}
    assert {f.name for f in dataclasses.fields(CleanData)} == {"x", "y", "source"}


def test_what_the_defense_receives_reveals_no_secret(tiny_cfg, choices):
    from bdbench import runner

    cfg = tiny_cfg("attack=badnets", "attack.target=3", "budget=5", "worker.isolation=none")  # inspected in-process
    cfg.defense = {"_target_": "test_no_peeking.SpyDefense"}
    captured = {}
    real_poisoned_model = runner.poisoned_model

    def keep(*args, **kwargs):
        model, attack, info = real_poisoned_model(*args, **kwargs)
        captured["attack"] = attack
        return model, attack, info

    runner.poisoned_model = keep
    try:
        runner.run_cell(cfg, {**choices(cfg), "defense": "none"})
    finally:
        runner.poisoned_model = real_poisoned_model
    attack = captured["attack"]
    data = build(cfg.dataset).load(cfg.paths.data)
    clean, ctx, model = SEEN["clean"], SEEN["ctx"], SEEN["model"]

    # The clean images are exactly the budget drawn from the defender pool: no poisoned index, no test image.
    idx = data.budget_indices(5, seed=0)
    assert torch.equal(clean.x, data.train.x[idx].float() / 255) and torch.equal(clean.y, data.train.y[idx])
    assert not set(idx.tolist()) & set(attack.poison_indices.tolist())
    assert (clean.y == 3).sum() == 5  # target-class images are ordinary clean images, 5 like every class
    # They are a copy, not a view into the training set (no way back to the other images).
    assert clean.x.untyped_storage().nbytes() == clean.x.numel() * clean.x.element_size()

    # The context holds public facts only, and a seed of its own, not the cell's (test_isolation.py: one-way)
    assert (ctx.num_classes, ctx.input_shape) == (10, (1, 16, 16)) and ctx.seed not in range(2**20)
    secrets = (Attack, ImageSet, DataBundle)
    for value in vars(ctx).values():
        assert not isinstance(value, secrets)

    # The model is a plain module: no attribute anywhere points at the attack or a data set, and it
    # is a copy, so the runner's own model (used for the undefended metrics) cannot be changed.
    for module in model.modules():
        for value in vars(module).values():
            assert not isinstance(value, secrets)
    assert isinstance(model, nn.Module) and not any(v is attack.apply_trigger for v in vars(model).values())
    assert "target" not in vars(model) and "poison_indices" not in dict(model.named_buffers())
