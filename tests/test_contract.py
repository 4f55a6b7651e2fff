"""``bdbench.contract.check_defense``, the check a plugin's own tests call: it passes a defense that keeps the
contract and names the rule each broken one breaks."""

from __future__ import annotations

import pytest
import torch

from bdbench.contract import check_defense
from bdbench.validate import configured
from bdbench.defenses.base import Defense


class Tramples(Defense):
    def apply(self, model, clean, ctx):  # repairs the caller's model instead of its own copy
        with torch.no_grad():
            next(model.parameters()).zero_()
        self._last_report = {}
        return model

    def repair(self, model, clean, ctx):
        return {}


class Reports(Defense):
    def repair(self, model, clean, ctx):
        return {"scores": torch.ones(3)}  # a tensor a JSON record would hold as its repr


class Dice(Defense):
    def repair(self, model, clean, ctx):
        with torch.no_grad():
            next(model.parameters()).add_(torch.rand(1, generator=torch.Generator().manual_seed(int(torch.seed()))))
        return {}


class Grows(Defense):
    def repair(self, model, clean, ctx):
        model.extra = torch.nn.Linear(2, 2)
        return {}


def test_a_defense_that_keeps_the_contract_passes_and_its_report_comes_back():
    ft = configured("defense", "defense=ft", "defense.schedule.epochs=1", "defense.schedule.min_steps=2")
    assert check_defense(ft)["steps"] == 2


@pytest.mark.parametrize("defense, says", [
    (Tramples(), "changed the model it was given"),
    (Reports(), "report holds objects a JSON record cannot: ['report.scores: Tensor']"),
    (Dice(), "the same seed gave other weights"),
    (Grows(), "do not load into fmnist_cnn"),
])
def test_each_broken_rule_is_named(defense, says):
    with pytest.raises(AssertionError, match=says.replace("[", r"\[").replace("]", r"\]")):
        check_defense(defense)
