"""The trainer's recipe keys do what their configs say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.augment import Augment
from bench.data import ImageSet
from bench.train import train
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
