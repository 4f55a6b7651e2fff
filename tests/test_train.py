"""The trainer's recipe keys do what their configs say."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from pathlib import Path
from torch import nn

from bdbench.augment import Augment
from bdbench.data import ImageSet
from bdbench.runner import poisoned_model
from bdbench.train import train
from bdbench.validate import build, validate
from conftest import configured


def test_onecycle_recipe_warms_up_peaks_early_and_ends_above_zero():
    recipe = configured("recipe", "recipe=onecycle")
    optimizer = recipe.optimizer([nn.Parameter(torch.zeros(1))])
    scheduler = recipe.scheduler(optimizer)
    lrs = []
    for _ in range(recipe.epochs):  # the trainer steps the schedule once per epoch
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = recipe.optimizer.keywords["lr"]
    assert lrs[0] == pytest.approx(peak / 25)
    assert max(lrs) == pytest.approx(peak, rel=1e-3) and lrs.index(max(lrs)) < 0.2 * recipe.epochs
    assert all(a > b for a, b in zip(lrs[lrs.index(max(lrs)):], lrs[lrs.index(max(lrs)) + 1:]))
    assert 0 < lrs[-1] < 0.01 * peak  # the last epoch still learns


@pytest.mark.parametrize("smoothing", [None, 0.1])
def test_label_smoothing_is_the_loss_the_trainer_minimizes(smoothing):
    """With a frozen linear model and one batch holding every image, the epoch's loss is the hand-computed one."""
    gen = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8, generator=gen),
                    torch.randint(0, 10, (64,), generator=gen))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    logits = model(data.x.float() / 255)
    recipe = configured("recipe", label_smoothing=smoothing, epochs=1, batch_size=64, scheduler=None,
                        optimizer=lambda params: torch.optim.SGD(params, lr=1e-30))
    history = train(model, data, configured("attack", "attack=none"), recipe, Augment(crop_padding=0, hflip=False),
                    torch.Generator().manual_seed(1))
    expected = F.cross_entropy(logits, data.y, label_smoothing=smoothing or 0.0).item()
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert smoothing is None or abs(expected - F.cross_entropy(logits, data.y).item()) > 1e-3


@pytest.mark.parametrize("attack", ["badnets", "wanet", "input_aware"])
def test_watching_test_accuracy_while_training_changes_no_weight(tiny_cfg, attack):
    """``monitor.test_every`` adds the time-to-accuracy curve to the history, reads the test set between epochs, and
    trains the very same model: weights bit for bit, the same undefended metrics, the last row's ACC theirs."""
    runs = {}
    for every in (None, 2):
        cfg = tiny_cfg(f"attack={attack}", "recipe.epochs=3", f"monitor.test_every={every or 'null'}",
                       *(["attack.mask_epochs=1", "attack.mask_steps_per_epoch=2"] if attack == "input_aware" else []))
        with open_dict(cfg):
            cfg.paths.cache += f"-{every}"  # two caches: the second model is trained, not loaded
        data = build(cfg.dataset).load(cfg.paths.data, "cpu", cfg.paths.cache)
        runs[every] = poisoned_model(validate(cfg, cfg.hydra.runtime.choices), data)
    (plain, _, plain_info), (watched, _, info) = runs[None], runs[2]
    for key, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[key]), key
    assert info["undefended"] == plain_info["undefended"]
    assert [("test_acc" in row) for row in info["history"]] == [False, True, True]  # epoch 2, and the last
    assert not any("test_acc" in row for row in plain_info["history"])
    last = info["history"][-1]
    assert last["test_acc"] == info["undefended"]["acc"] and last["test_asr"] == info["undefended"]["asr"]
    assert last["test_seconds"] > 0


class Killed(Exception):
    """Stands in for a sweep killed between two epochs."""


@pytest.mark.parametrize("attack", ["badnets", "wanet", "input_aware"])
def test_a_killed_training_resumes_where_it_stopped_and_ends_with_the_same_weights(tiny_cfg, attack, monkeypatch):
    """Killed after epoch 1 of 3, the next run restores model, optimizer, schedule, generator, batch order and the
    attack's own state (WaNet's generator, Input-aware's G, M, their optimizer and G's accumulated gradients) and
    trains epochs 2 and 3 only: the weights and metrics of an uninterrupted run, bit for bit."""
    extra = ["attack.mask_epochs=1", "attack.mask_steps_per_epoch=2"] if attack == "input_aware" else []
    runs = {}
    for name in ("straight", "killed"):
        cfg = tiny_cfg(f"attack={attack}", "recipe.epochs=3", *extra)
        with open_dict(cfg):
            cfg.paths.cache += f"-{name}"
        data = build(cfg.dataset).load(cfg.paths.data, "cpu", cfg.paths.cache)
        if name == "killed":
            with monkeypatch.context() as m:
                def kill(self, row, model):
                    if row["epoch"] == 2:
                        raise Killed
                m.setattr("bdbench.runner.EpochMonitor.__call__", kill)
                with pytest.raises(Killed):
                    poisoned_model(validate(cfg, cfg.hydra.runtime.choices), data)
            saved = list((Path(cfg.paths.cache) / "training").iterdir())
            assert len(saved) == 1 and json.loads((saved[0] / "manifest.json").read_text())["epochs"] == 1
        runs[name] = poisoned_model(validate(cfg, cfg.hydra.runtime.choices), data)
    (plain, _, plain_info), (resumed, _, info) = runs["straight"], runs["killed"]
    for key, value in plain.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert info["undefended"] == plain_info["undefended"]
    assert [row.get("resumed", False) for row in info["history"]] == [False, True, False]
    assert [row["loss"] for row in info["history"]] == [row["loss"] for row in plain_info["history"]]
    assert info["train_seconds"] >= info["history"][-1]["elapsed"] > info["history"][0]["elapsed"] > 0
    assert not any((Path(cfg.paths.cache) / "training").iterdir())  # the model is cached: its checkpoint is gone


ALLOCATE_AND_FREE = """
import resource, sys, torch
from bdbench.device import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
torch.ones(2**24).sum()  # 64 MB, above glibc's largest mmap threshold: a first allocation faults its pages in
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(2**24).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's: elsewhere retain_freed_memory() changes nothing and returns False")
def test_freed_tensor_memory_is_reused_instead_of_faulted_in_again():
    """A 64 MB tensor allocated and freed ten times: glibc maps fresh pages each time (16,384 page faults each),
    unless ``retain_freed_memory`` keeps them (what made a WRN-16-1 epoch at batch 512 take 158 s instead of 89)."""
    faults, pages = {}, 2**24 * 4 // 4096
    for mode in ("default", "retain"):
        out = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        faults[mode] = int(out[1])
        assert out[0] == ("True" if mode == "retain" else "None")
    assert faults["default"] >= 0.9 * 10 * pages  # every page of every allocation, again
    assert faults["retain"] <= 2.1 * pages  # at most the first allocations map pages; the rest reuse them
