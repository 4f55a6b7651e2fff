"""The test-set oracle (bench/oracle.py): BackdoorBench's ANP choice measured beside a cell, never as its result."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from bdbench.oracle import apply_step, select
from bdbench.reproduction import source_table
from bdbench.runner import cell_path, run_cell
from conftest import configured

UNDEFENDED = {"acc": 0.90, "asr": 0.95, "ra": 0.04}
# metrics by the number of zeroed rows of the stand-in's weight: what each step of the ladder would measure
MEASURED = {1: {"acc": 0.88, "asr": 0.60, "ra": 0.3}, 2: {"acc": 0.85, "asr": 0.20, "ra": 0.7},
            4: {"acc": 0.50, "asr": 0.00, "ra": 0.5}}
LADDER = [{"setting": {"threshold": 0.0}, "zero": {"weight": [0]}},
          {"setting": {"threshold": 0.05}, "zero": {"weight": [1]}},
          {"setting": {"threshold": 0.1}, "zero": {"weight": [2, 3]}}]


def stand_in() -> nn.Module:
    model = nn.Linear(1, 4, bias=False)
    nn.init.ones_(model.weight)
    return model


def by_zeros(seen: list[int]):
    def evaluate(model: nn.Module) -> dict:
        zeros = int((model.weight == 0).all(1).sum())
        seen.append(zeros)
        return {**MEASURED[zeros], "collapsed": False}

    return evaluate


def test_the_choice_is_the_lowest_asr_within_the_accuracy_ratio():
    """Steps are cumulative (1, 2, 4 rows zeroed); 0.85 is within 10 % of 0.90 (5.6 %), 0.50 is not (44 %): the
    step at 0.05 wins though the last has ASR 0. DER by hand: (0.75 - 0.05 + 1) / 2 = 0.85."""
    seen: list[int] = []
    model = stand_in()
    chosen = select(model, LADDER, UNDEFENDED, 0.1, by_zeros(seen))
    assert seen == [1, 2, 4]
    assert chosen["chosen"] == {"threshold": 0.05}
    assert chosen["metrics"] == pytest.approx({"acc": 0.85, "asr": 0.20, "ra": 0.7, "der": 0.85})
    assert [row["threshold"] for row in chosen["ladder"]] == [0.0, 0.05, 0.1]
    assert (model.weight == 1).all()  # the model it was given is untouched


def test_no_step_within_the_ratio_keeps_the_undefended_model():
    chosen = select(stand_in(), LADDER, UNDEFENDED, 0.02, by_zeros([]))  # 0.88 is 2.2 % below 0.90
    assert chosen["chosen"] is None
    assert chosen["metrics"] == pytest.approx({**UNDEFENDED, "der": 0.5})


def test_a_step_must_lower_asr_below_the_undefended_models():
    flat = {1: {"acc": 0.90, "asr": 0.95, "ra": 0.0}}
    chosen = select(stand_in(), LADDER[:1], UNDEFENDED, 0.1, lambda m: flat[int((m.weight == 0).all(1).sum())])
    assert chosen["chosen"] is None


@pytest.mark.parametrize("step, message", [({"zero": {"bias": [0]}}, "does not have"),
                                           ({"zero": {"weight": [4]}}, "rows 4..4 of 'weight' \\(4 rows\\)")])
def test_a_step_naming_what_the_model_lacks_is_an_error(step, message):
    with pytest.raises(ValueError, match=message):
        apply_step(stand_in(), step)


def test_anp_ladder_prunes_what_backdoorbenchs_written_masks_prune():
    """BackdoorBench writes masks with four decimals and prunes those at most each threshold, 0 to 0.9 by 0.05:
    0.04999 and 0.05004 are both 0.0500; 0.70004 is 0.7000, pruned at 0.7; 0.95 and 1 never."""
    anp = configured("defense", "defense=anp")
    masks = {"a": torch.tensor([0.0, 0.04999, 0.05004, 0.7, 0.70004, 0.95, 1.0]), "b": torch.tensor([0.2, 0.9001])}
    ladder = anp.ladder(masks)
    assert [s["setting"]["threshold"] for s in ladder] == [round(0.05 * i, 2) for i in range(19)]
    steps = {s["setting"]["threshold"]: s["zero"] for s in ladder if s["zero"]}
    assert steps == {0.0: {"a.weight": [0]}, 0.05: {"a.weight": [1, 2]}, 0.2: {"b.weight": [0]},
                     0.7: {"a.weight": [3, 4]}}


def test_the_oracle_is_measured_beside_the_cell_and_changes_nothing(tiny_cfg, choices):
    """The same cell with and without the oracle: one identity, the same metrics; the oracle's choice is its rule
    applied to its own ladder, and the candidates stay out of the record."""
    overrides = ("attack=badnets", "defense=anp", "defense.steps=200", "defense.mask_lr=1.0", "budget=4")
    plain = tiny_cfg(*overrides)
    measured = tiny_cfg(*overrides, "oracle.acc_ratio=0.1")
    assert cell_path(plain, choices(plain)) == cell_path(measured, choices(measured))
    without = run_cell(plain, choices(plain))
    path = cell_path(measured, choices(measured))
    path.unlink()
    record = run_cell(measured, choices(measured))
    assert "oracle" not in without and "candidates" not in without["defense"]
    assert "candidates" not in record["defense"]
    assert record["metrics"] == without["metrics"]
    oracle, u = record["oracle"], record["undefended"]
    assert [row["threshold"] for row in oracle["ladder"]] == [round(0.05 * i, 2) for i in range(19)]
    within = [row for row in oracle["ladder"] if abs(row["acc"] - u["acc"]) / u["acc"] < 0.1 and row["asr"] < u["asr"]]
    best = min(within, key=lambda row: row["asr"], default=None)
    assert oracle["chosen"] == ({"threshold": best["threshold"]} if best else None)
    assert oracle["metrics"]["asr"] == (best or u)["asr"] and oracle["metrics"]["acc"] == (best or u)["acc"]
    assert best is not None and oracle["ladder"][-1]["asr"] < u["asr"]  # the ladder really prunes the model
    assert record["timings"]["oracle"] > 0


def test_a_reproduction_row_marked_oracle_reads_the_oracles_choice():
    """A damaged ANP cell (its own threshold) and the oracle's choice on the same cells, side by side."""
    cells = pd.DataFrame([{"model": "wrn16_1", "attack": "badnets", "budget": 250, "defense": "anp", "seed": s,
                           "status": "damaged", "acc": 0.40, "asr": 0.01, "oracle_acc": 0.80 + 0.02 * s,
                           "oracle_asr": 0.05, "undefended_acc": 0.86, "undefended_asr": 0.95, "model_key": f"m{s}"}
                          for s in (0, 1)])
    block = {"match": {"model": "wrn16_1", "attack": "badnets", "budget": 250},
             "rows": [{"defense": "none", "acc": 91.32, "asr": 95.03}, {"defense": "anp", "acc": 84.17, "asr": 0.73},
                      {"defense": "anp", "oracle": True, "acc": 84.17, "asr": 0.73}]}
    table = source_table(block, cells).set_index("defense")
    anp = table.loc["anp"]  # the cells' own result, at ANP's fixed threshold
    assert anp["bdbench ACC / ASR"] == "40.0 ± 0.0 / 1.0 ± 0.0" and anp["n"] == "2/2 (2 damaged)"
    oracle = table.loc["anp (oracle: threshold on test ASR)"]
    assert oracle["bdbench ACC / ASR"] == "81.0 ± 1.4 / 5.0 ± 0.0" and oracle["n"] == "2/2"
    assert oracle["verdict"] == "agrees"  # ACC 81 - 86 = -5.0 vs -7.15, ASR 5 - 95 = -90.0 vs -94.3


PUBLISHED = sorted((Path(__file__).resolve().parent.parent / "results").glob("*/anp_oracle/records/*.json"))


@pytest.mark.parametrize("path", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_each_published_oracle_is_its_rule_applied_to_its_ladder(path):
    """A reader can recompute every published oracle choice from its own record: the ladder has BackdoorBench's 19
    thresholds, its 0.2 step is the cell's own result (the same pruning), and the choice is the rule's."""
    record = json.loads(path.read_text())
    oracle, u = record["oracle"], record["undefended"]
    ladder = {row["threshold"]: row for row in oracle["ladder"]}
    assert list(ladder) == [round(0.05 * i, 2) for i in range(19)] and oracle["acc_ratio"] == 0.1
    assert ladder[0.2]["asr"] == pytest.approx(record["metrics"]["asr"], abs=2e-4)  # masks below 0.2 vs at most 0.2
    within = [row for row in oracle["ladder"] if abs(row["acc"] - u["acc"]) / u["acc"] < 0.1 and row["asr"] < u["asr"]]
    best = min(within, key=lambda row: row["asr"])  # the first of equals, as the code's strict < keeps
    assert oracle["chosen"] == {"threshold": best["threshold"]}
    assert (oracle["metrics"]["acc"], oracle["metrics"]["asr"]) == (best["acc"], best["asr"])
