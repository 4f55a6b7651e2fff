"""Real-data checks (slow tier, ~6 min on 2 CPU cores): full Fashion-MNIST, fmnist_cnn, the reference
recipe. Clean accuracy >= 90 %; BadNets and Blended reach ASR >= 95 % within 2 points of it; FT at
10 images per class lowers BadNets ASR; a repeated cell trains nothing."""

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
            bdbench(tmp, "attack=badnets", "defense=ft", "budget=10"),
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


def test_ft_lowers_badnets_asr_and_poisoned_model_is_reused(grid):
    records, runs = grid
    ft = records[("badnets", "ft")]
    assert ft["metrics"]["asr"] < ft["undefended"]["asr"]
    assert ft["cache"]["hit"] and records[("badnets", "clp")]["cache"]["hit"]
    assert "pruned" in records[("badnets", "clp")]["defense"]
    assert (runs[1].stdout + runs[1].stderr).count("cache hit") == 1
