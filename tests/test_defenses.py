"""FT's shared fine-tuning loop, CLP and the budget-0 synthesizer on hand-made cases."""

from __future__ import annotations

import re

import pytest
import torch

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bdbench.augment import Augment
from bdbench.models import create_model
from bdbench.validate import CONF_DIR
from conftest import configured
from bdbench.defenses.base import CleanData, DefenseContext
from bdbench.defenses.clp import CLP
from bdbench.defenses.finetune import cutout, finetune, step_count
from bdbench.defenses.synthesis import total_variation

NO_AUG = Augment(crop_padding=0, hflip=False)

CTX = DefenseContext(num_classes=10, input_shape=(1, 16, 16), device=torch.device("cpu"), seed=0,
                     progress=lambda it, **kw: it)


def schedule(**values):
    """BackdoorBench's fine-tuning schedule from conf/, with ``values`` changed."""
    return configured("defense.schedule", "defense=ft", **values)


def model():
    torch.manual_seed(0)
    return create_model("fmnist_cnn", num_classes=10, shape=(1, 16, 16), mean=[0.5], std=[0.5]).eval()


def test_step_rule():
    assert step_count(n=10, epochs=100, batch_size=256, min_steps=300) == (300, 10)      # k = 1
    assert step_count(n=100, epochs=100, batch_size=256, min_steps=300) == (300, 100)    # k = 10
    assert step_count(n=2500, epochs=100, batch_size=256, min_steps=300) == (1000, 256)  # BackdoorBench's 5 %


@pytest.mark.parametrize("size, side", [(3, 2), (4, 4), (16, 16)])
def test_cutout_blanks_the_hole_the_reference_code_blanks(size, side):
    """NAD's and ARGD's Cutout(1, size): rows and columns [c - size//2, c + size//2), clipped: a 2 x 2 hole for
    size 3. Every image loses side**2 pixels on every channel where its centre is far from the border."""
    x = torch.ones(500, 3, 32, 32)
    out = cutout(x, size, torch.Generator().manual_seed(0))
    holes = (out == 0).all(1)  # [N, H, W]: blanked on every channel
    assert torch.equal((out == 0).any(1), holes)
    ys, xs = holes.any(2).float().argmax(1), holes.any(1).float().argmax(1)  # the hole's top-left corner
    inside = (ys > 0) & (xs > 0) & (ys + side < 32) & (xs + side < 32)
    assert inside.sum() > 50 and (holes.sum((1, 2))[inside] == side * side).all()
    assert (holes.sum((1, 2)) <= side * side).all()


def test_clp_prunes_exactly_the_planted_outlier():
    m = model()
    conv, bn = m.conv_bn_pairs()[0]
    with torch.no_grad():
        conv.weight[5] *= 50  # channel 5's Lipschitz bound is now far above its layer's mean + 3 std
    repaired = CLP(u=3.0).apply(m, CleanData(torch.empty(0), torch.empty(0), "none"), CTX)
    r_conv, r_bn = repaired.conv_bn_pairs()[0]
    assert r_bn.weight[5] == 0 and r_bn.bias[5] == 0
    keep = torch.arange(len(bn.weight)) != 5
    assert torch.equal(r_bn.weight[keep], bn.weight[keep])
    assert bn.weight[5] != 0  # the input model is untouched


def test_clp_spares_a_model_without_outliers():
    m = model()
    with torch.no_grad():
        for conv, _ in m.conv_bn_pairs():
            conv.weight.copy_(torch.ones_like(conv.weight))  # every channel has the same bound
    clp = CLP(u=3.0)
    repaired = clp.apply(m, CleanData(torch.empty(0), torch.empty(0), "none"), CTX)
    assert clp.report()["pruned"] == 0 and clp.report()["channels"] == 32 + 64
    assert all(torch.equal(a, b) for a, b in zip(repaired.state_dict().values(), m.state_dict().values()))


def test_finetune_learns_in_train_mode_and_freezes_only_when_asked():
    """One BatchNorm policy for every cell: train mode by default (the references), ``frozen`` only by name."""
    x, y = torch.rand(10, 1, 16, 16), torch.arange(10)
    m = model()
    bn = m.conv_bn_pairs()[0][1]
    before = bn.running_mean.clone()
    report = finetune(m, CleanData(x, y, "real"), CTX, schedule(epochs=1, min_steps=60, lr=0.05, weight_decay=0.0), NO_AUG)
    assert report["steps"] == 60 and report["batchnorm"] == "train"
    assert not torch.equal(bn.running_mean, before)  # batch statistics were used and stored
    assert (m(x).argmax(1) == y).float().mean() == 1.0  # it did fit the ten images
    frozen = model()
    report = finetune(frozen, CleanData(x, y, "real"), CTX,
                      schedule(epochs=1, min_steps=5, lr=0.05, weight_decay=0.0, batchnorm="frozen"), NO_AUG)
    assert report["batchnorm"] == "frozen"
    assert torch.equal(frozen.conv_bn_pairs()[0][1].running_mean, before)


@pytest.mark.parametrize("policy", ["train", "frozen"])
@pytest.mark.parametrize("degenerate", [False, True])
def test_batchnorm_mode_does_not_depend_on_the_model(degenerate, policy):
    """Before, a channel with running variance ~0 switched a budget-1 cell from frozen to train mode, and
    that coin flip decided which cells diverged. The policy is the config's, whatever the statistics: every step
    runs BatchNorm in the mode the config names, with and without a degenerate channel."""
    m = model()
    if degenerate:
        with torch.no_grad():
            m.conv_bn_pairs()[0][1].running_var[3] = 0.0
    seen = []
    hook = m.conv_bn_pairs()[0][1].register_forward_pre_hook(lambda mod, _i: seen.append(mod.training))
    x, y = torch.rand(10, 1, 16, 16), torch.arange(10)
    finetune(m, CleanData(x, y, "real"), CTX, schedule(epochs=1, min_steps=3, weight_decay=0.0, batchnorm=policy),
             NO_AUG)
    hook.remove()
    assert seen[:3] == [policy == "train"] * 3


@pytest.mark.parametrize("name", ["ft", "ft_ar_control", "ft_nad_teacher", "fp", "nc", "nad", "argd", "anp",
                                  "ar_purification", "linf_pruning",
                                  "suspiciousness"])
def test_every_fine_tuning_config_trains_batchnorm_by_default(name):
    """Every BatchNorm policy a defense composes to (its schedules included) is train mode."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"defense={name}"])
    modes = re.findall(r"batchnorm: (\w+)", OmegaConf.to_yaml(cfg.defense))
    assert modes and set(modes) == {"train"}


def test_a_bad_batchnorm_mode_is_refused_before_compute():
    with pytest.raises(ValueError, match="batchnorm='eval'; valid: train, frozen"):
        finetune(model(), CleanData(torch.rand(2, 1, 16, 16), torch.arange(2), "real"), CTX,
                 schedule(batchnorm="eval"), NO_AUG)


def test_deepinversion_gives_labelled_images_in_range():
    short = configured("synthesis", per_class=2, iterations=3)
    long = configured("synthesis", per_class=2, iterations=60)
    short(model(), CTX)
    clean = long(model(), CTX)
    assert clean.x.shape == (20, 1, 16, 16) and clean.source == "synthetic"
    assert clean.x.min() >= 0 and clean.x.max() <= 1
    assert torch.equal(clean.y, torch.arange(10).repeat(2))
    assert long.stats["method"] == "deepinversion" and long.stats["best_loss"] < short.stats["best_loss"]
    assert all(p.requires_grad for p in model().parameters())  # the model is handed back trainable


def test_total_variation_by_hand():
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # right, down and diagonal neighbours each differ by 1 once
    assert total_variation(x).item() == 3.0


def test_divergence_says_how_batchnorm_ran():
    """A diverged cell's record keeps only the error: it must say whether the statistics were frozen."""
    x, y = torch.rand(10, 1, 16, 16), torch.arange(10)
    with pytest.raises(FloatingPointError, match=r"batch 10, batchnorm=frozen, grad_clip=None\)"):
        finetune(model(), CleanData(x, y, "real"), CTX,
                 schedule(epochs=1, min_steps=50, lr=1e8, weight_decay=0.0, batchnorm="frozen"), NO_AUG)


def test_long_phases_report_progress_in_a_log_file(capsys):
    """Off a terminal (a sweep's log), progress is a line every so often with a count and an ETA, not silence."""
    from bdbench.defenses.base import log_progress

    assert list(log_progress(range(4), "walks", None, every=0.0)) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("[progress] walks: 1/4 after ") and "ETA" in lines[0] and len(lines) == 3


def ar(*overrides: str, **values):
    return configured("defense", "defense=ar_purification", "defense.neuron_schedule.min_steps=20",
                      "defense.copies=2", *overrides, **values)


def test_ar_final_prune_zeroes_what_shrinkage_alone_took():
    """With no gradient (lr 0) shrinkage alone takes every infected channel to rho_end of its start. The cut-off was
    rho_end itself, so float rounding decided which of them were zeroed; apart from it, all of them are."""
    x = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    defense = ar("defense.neuron_schedule.lr=0", "defense.neuron_schedule.weight_decay=0")
    defense.apply(model(), CleanData(x, torch.arange(10).repeat(2), "real"), CTX)
    report = defense.report()
    assert report["final_ratios"] == pytest.approx([0.01] * report["infected"], rel=1e-3)
    assert report["final_pruned"] == report["infected"] > 0


def test_ar_cut_off_at_the_shrink_target_is_refused():
    with pytest.raises(ValueError, match=r"prune_below=0.01 with rho_end=0.01; valid: prune_below > rho_end"):
        ar(prune_below=0.01)
