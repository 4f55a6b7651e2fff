"""Real-data checks (slow tier, ~30 min on 2 CPU cores): full Fashion-MNIST, fmnist_cnn, the reference
recipe with the data set's attack schedules (conf/attack_dataset/). Clean accuracy >= 90 %; BadNets and
Blended reach ASR >= 95 % and WaNet and Input-aware >= 90 % (issue 4), within 2 points of it; WaNet's
noise and Input-aware's cross-trigger accuracy stay within 5 points of the clean model's (Input-aware's does not
yet: that test fails, and says so); Fine-Pruning at 10 images per class takes at least 10 points off BadNets' ASR; a
repeated cell trains nothing."""

from __future__ import annotations

import json

import pytest

from conftest import fashion_mnist_available
from test_cli import bdbench

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST IDX files not found")]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faithful")
    runs = [bdbench(tmp, "-m", "attack=none,badnets,blended", "defense=none", "budget=10"),
            bdbench(tmp, "attack=badnets", "defense=fp", "budget=10"),
            bdbench(tmp, "attack=badnets", "defense=clp", "budget=0")]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp / "records").glob("*.json")]
    return {(r["cell"]["attack"], r["cell"]["defense"]): r for r in records}, runs


def test_clean_accuracy(grid):
    records, _ = grid
    assert records[("none", "none")]["metrics"]["acc"] >= 0.90


@pytest.mark.parametrize("attack", ["badnets", "blended"])
def test_attack_reaches_high_asr_at_clean_accuracy(grid, attack):
    records, _ = grid
    clean_acc = records[("none", "none")]["metrics"]["acc"]
    m = records[(attack, "none")]["metrics"]
    assert m["asr"] >= 0.95
    assert abs(m["acc"] - clean_acc) <= 0.02


def test_fine_pruning_lowers_badnets_asr_and_poisoned_model_is_reused(grid):
    """Before: FT at k = 10 with ``asr < undefended``, which a drop from 100 to 99.9 % passed (FT leaves BadNets at
    96-99 % on this data set). FP is the baseline that moves it here (published grid: 31-76 % at k = 10)."""
    records, runs = grid
    fp = records[("badnets", "fp")]
    assert fp["undefended"]["asr"] >= 0.95 and fp["metrics"]["asr"] <= fp["undefended"]["asr"] - 0.10
    assert fp["cache"]["hit"] and records[("badnets", "clp")]["cache"]["hit"]
    assert "pruned" in records[("badnets", "clp")]["defense"]
    assert (runs[1].stdout + runs[1].stderr).count("cache hit") == 1


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory, grid):
    tmp = tmp_path_factory.mktemp("dynamic")
    run = bdbench(tmp, "-m", "attack=wanet,input_aware", "defense=none", "budget=10", timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = {r["cell"]["attack"]: r for r in (json.loads(p.read_text()) for p in (tmp / "records").glob("*.json"))}
    return records, grid[0][("none", "none")]["metrics"]["acc"]


@pytest.mark.parametrize("attack", ["wanet", "input_aware"])
def test_dynamic_attack_reaches_its_asr_at_clean_accuracy(dynamic, attack):
    records, clean_acc = dynamic
    m = records[attack]["undefended"]  # the poisoned model's metrics, the attack's own included
    assert m["asr"] >= 0.90
    assert abs(m["acc"] - clean_acc) <= 0.02


@pytest.mark.parametrize("attack, own_metric", [
    ("wanet", "noise_acc"),
    ("input_aware", "cross_acc"),  # fails today, openly: 84.2-85.0 % (seeds 0-2), 6.3-7.1 points below clean
])
def test_dynamic_attack_keeps_its_noise_or_cross_accuracy(dynamic, attack, own_metric):
    records, clean_acc = dynamic
    assert records[attack]["undefended"][own_metric] >= clean_acc - 0.05
