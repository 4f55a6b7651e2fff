"""The shared pruning machinery on hand-made cases: masks, batched coalitions, MAD, reversal, Shapley."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import itertools
import math

import pytest
import torch
from torch import nn

from bdbench.augment import Augment
from bdbench.models import create_model, list_models
from conftest import configured
from bdbench.validate import build
from bdbench.defenses.base import CleanData, DefenseContext
from bdbench.defenses import shap_pruning
from bdbench.defenses.guard import Guard, longest_passing_prefix
from bdbench.defenses.masks import (ResumedForward, coalition_logits, conv_neurons, group_neurons, head_neurons, masked,
                            prefix_masks, prune_channels, pruned_count)
from bdbench.defenses.reversal import carriers, mad_anomaly
from bdbench.defenses.shap_pruning import robust_outliers
from bdbench.defenses.suspiciousness import activation_signals, channel_weight_bounds

NO_AUG = Augment(crop_padding=0, hflip=False)
CTX = DefenseContext(num_classes=10, input_shape=(1, 16, 16), device=torch.device("cpu"), seed=0,
                     progress=lambda it, **kw: it)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return create_model("fmnist_cnn", num_classes=10, shape=(1, 16, 16), mean=[0.5], std=[0.5]).eval()


def outputs(model, neurons, x):
    """The mask points' outputs as the next layer sees them (a later hook sees the masked output)."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o.clone())) for m in neurons.modules]
    model(x)
    for h in hooks:
        h.remove()
    return seen


def test_neurons_are_every_conv_channel_after_its_batchnorm():
    model = cnn()
    neurons = conv_neurons(model)
    assert neurons.sizes == [32, 64, 64] and neurons.n == 160
    assert neurons.modules[0] is model.layer2[0] and neurons.modules[2] is model.layer3[2]  # last conv: no BN
    assert neurons.locate(40) == (1, 8) and neurons.describe([40]) == ["layer3.0:8"]


def test_masks_zero_exactly_the_chosen_channels_and_restore_them():
    model, x = cnn(), torch.rand(4, 1, 16, 16)
    neurons = conv_neurons(model)
    clean = outputs(model, neurons, x)
    mask = torch.ones(1, neurons.n)
    mask[0, [3, 40, 159]] = 0
    with masked(neurons, mask):
        hit = outputs(model, neurons, x)
    assert hit[0][:, 3].abs().sum() == 0 and hit[1][:, 8].abs().sum() == 0 and hit[2][:, 63].abs().sum() == 0
    assert torch.equal(hit[0][:, :3], clean[0][:, :3])  # everything upstream of a mask is untouched
    assert torch.equal(hit[0][:, 4:], clean[0][:, 4:])  # the other channels of the layer too
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, neurons, x), clean))  # hooks removed


def test_permanent_prune_survives_copies_and_training():
    model = cnn()
    neurons = conv_neurons(model)
    prune_channels(neurons, [3, 40])
    copied = copy.deepcopy(model).train()
    opt = torch.optim.SGD(copied.parameters(), lr=0.5)
    x = torch.rand(16, 1, 16, 16)
    for _ in range(3):
        opt.zero_grad()
        copied(x).logsumexp(1).mean().backward()
        opt.step()
    seen = outputs(copied.eval(), conv_neurons(copied), x)
    assert seen[0][:, 3].abs().sum() == 0 and seen[1][:, 8].abs().sum() == 0
    assert pruned_count(conv_neurons(copied)) == 2


def test_batched_and_sequential_coalitions_agree():
    model, x = cnn(), torch.rand(9, 1, 16, 16)
    neurons = conv_neurons(model)
    masks = (torch.rand(37, neurons.n, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    batched = coalition_logits(model, neurons, masks, x, images_per_pass=4096)
    sequential = coalition_logits(model, neurons, masks, x, images_per_pass=len(x))
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-5)
    with masked(neurons, masks[5:6]):
        torch.testing.assert_close(batched[5], model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_batched_coalitions_agree_with_sequential_on_every_model(name):
    """Residual models included: a skip path from the stem must see every coalition's copy of the images."""
    shape = (1, 16, 16) if name == "fmnist_cnn" else (3, 32, 32)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, shape=shape, mean=[0.5] * shape[0], std=[0.5] * shape[0]).eval()
    neurons, x = conv_neurons(model), torch.rand(3, *shape)
    masks = (torch.rand(4, neurons.n, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    batched = coalition_logits(model, neurons, masks, x, images_per_pass=len(masks) * len(x))
    torch.testing.assert_close(batched, coalition_logits(model, neurons, masks, x, images_per_pass=len(x)),
                               rtol=1e-4, atol=1e-4)


def removal_walks(n: int, walks: int, steps: int) -> torch.Tensor:
    """Masks as ShapPruning's walks make them: each walk removes one more channel per step, in a random order."""
    gen = torch.Generator().manual_seed(2)
    return torch.cat([prefix_masks(torch.randperm(n, generator=gen), torch.arange(1, steps + 1), n)
                      for _ in range(walks)])


@pytest.mark.parametrize("name", list_models())
def test_a_resumed_forward_gives_a_full_passs_logits_bit_for_bit_on_every_model(name):
    """Each pass after the first serves the module calls that end before the newly removed channel from the last
    pass: the logits must be exactly those of a full pass, and most passes must have reused something."""
    shape = (1, 16, 16) if name == "fmnist_cnn" else (3, 32, 32)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, shape=shape, mean=[0.5] * shape[0], std=[0.5] * shape[0]).eval()
    neurons, x = conv_neurons(model), torch.rand(5, *shape)
    masks = removal_walks(neurons.n, 3, 12)
    masks = torch.cat([masks, masks[-1:]])  # the same mask twice: everything is served, the logits still exact
    with ResumedForward(model, neurons, x) as resumed:
        for mask in masks:
            assert torch.equal(resumed(mask), coalition_logits(model, neurons, mask[None], x, len(x))[0])
    assert resumed.calls == len(masks) and resumed.reused_calls >= len(masks) - 3


@pytest.mark.parametrize("name", list_models())
def test_masks_on_a_feature_group_resume_from_the_groups_own_blocks(name):
    """FP's sweep masks the last group's output: every block inside that group ends before the mask applies, so a
    pass after the first computes only the head; ``coalition_logits`` resumes where one coalition fills a pass."""
    shape = (1, 16, 16) if name == "fmnist_cnn" else (3, 32, 32)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, shape=shape, mean=[0.5] * shape[0], std=[0.5] * shape[0]).eval()
    neurons, x = group_neurons(model, model.groups[-1:]), torch.rand(4, *shape)
    masks = prefix_masks(torch.randperm(neurons.n, generator=torch.Generator().manual_seed(3)), torch.arange(0, 9),
                         neurons.n)
    one_a_pass = coalition_logits(model, neurons, masks, x, images_per_pass=len(x))
    torch.testing.assert_close(one_a_pass, coalition_logits(model, neurons, masks, x, images_per_pass=4096),
                               rtol=1e-4, atol=1e-5)
    computed = []
    for block in neurons.modules[0].children():  # counts the blocks' real computations, not served outputs
        block.forward = (lambda block, forward: lambda *a: computed.append(block) or forward(*a))(block, block.forward)
    per_pass = []
    with ResumedForward(model, neurons, x, ahead=masks) as resumed:
        for mask, expected in zip(masks, one_a_pass):
            computed.clear()
            assert torch.equal(resumed(mask), expected)
            per_pass.append(len(computed))
    blocks = len(list(neurons.modules[0].children()))
    # The first pass computes the group's blocks, later ones serve them. The second may compute a BN again whose
    # output an in-place ReLU changed after it was kept (fmnist_cnn's, cifar_cnn's); once that ReLU is served too,
    # nothing writes into the BN's new output, and from the third pass on no block of the group runs.
    assert per_pass[0] == blocks and per_pass[1] < blocks and per_pass[2:] == [0] * (len(masks) - 2)


class InPlace(nn.Module):
    """Outputs changed in place after they were kept: the stem's by ``add_``, the BN's (a mask point's) by an
    in-place ReLU, as torchvision's blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.scale = nn.Identity()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def forward(self, x):
        out = self.scale(self.conv1(x))  # Identity returns its input: conv1's and its kept outputs are one tensor
        out.add_(1)
        out = self.relu(self.bn1(out))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.fc(out.mean((2, 3)))


def test_a_resumed_forward_never_serves_an_output_changed_in_place_since():
    torch.manual_seed(0)
    model = InPlace().eval()
    for bn in (model.bn1, model.bn2):
        bn.bias.data.uniform_(-1, 1)
    neurons, x = conv_neurons(model), torch.rand(4, 1, 8, 8)
    with ResumedForward(model, neurons, x) as resumed:
        for mask in removal_walks(neurons.n, 4, 6):
            assert torch.equal(resumed(mask), coalition_logits(model, neurons, mask[None], x, len(x))[0])


@pytest.mark.parametrize("name", list_models())
def test_head_tap_is_the_map_the_classifier_reads(name):
    """ℓ∞ pruning read WRN-16-1's block3 output, before the final BN and ReLU: pruning a channel there is not removing
    a feature the head reads. Pruning channel c at the head tap must equal zeroing the head's weights for channel c."""
    shape = (1, 16, 16) if name == "fmnist_cnn" else (3, 32, 32)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, shape=shape, mean=[0.5] * shape[0], std=[0.5] * shape[0]).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # BNs that move the map off zero
        bn.bias.data.uniform_(-1, 1)
    neurons, relu = head_neurons(model)
    assert relu == (name == "wrn16_1") and neurons.names == (["bn"] if name == "wrn16_1" else [model.groups[-1]])
    x, c = torch.rand(3, *shape), 5
    pruned = copy.deepcopy(model)
    prune_channels(head_neurons(pruned)[0], [c])
    head = next(m for m in model.modules() if isinstance(m, nn.Linear))
    per_channel = head.in_features // neurons.sizes[0]  # pooled: 1 input per channel; flattened: H x W
    with torch.no_grad():
        head.weight[:, c * per_channel:(c + 1) * per_channel] = 0
    torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)


def test_prefix_masks_remove_leading_neurons_of_the_order():
    masks = prefix_masks(torch.tensor([2, 0, 3]), [0, 1, 3], n=5)
    assert masks.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 1, 1], [0, 1, 0, 0, 1]]
    assert longest_passing_prefix(torch.tensor([True, True, False, True])) == 2


def test_mad_flags_a_planted_outlier():
    norms = torch.tensor([40.0, 42.0, 38.0, 41.0, 39.0, 43.0, 2.0, 40.0, 37.0, 44.0])
    anomaly = mad_anomaly(norms)
    assert anomaly.argmax() == 6 and anomaly[6] > 2 and (anomaly[torch.arange(10) != 6] < 2).all()
    assert robust_outliers(torch.tensor([0.0, 0.01, -0.01, 0.02, 0.9, 0.0, 0.5]), 3.5).tolist() == [4, 6]


def test_outliers_are_judged_among_positive_values_only():
    """Over all channels, a mass of values near zero made the MAD tiny: every small positive value was an outlier
    (on WRN-16-1, dozens of 560 channels), so the rule always pruned its maximum. Among the positive values only
    the two that stand out are."""
    phi = torch.cat([torch.zeros(40), torch.tensor([0.02, 0.03, 0.025, 0.035, 0.03, 0.02, 0.028, 0.9, 0.6])])
    assert robust_outliers(phi, 3.5).tolist() == [47, 48]
    assert robust_outliers(-phi.abs(), 3.5).tolist() == []  # nothing carries the trigger: nothing to prune


class PatchBackdoor(nn.Module):
    """Logits of a fixed random linear map, plus a large bonus for class 6 when the 2x2 top-left patch is
    bright: a model whose only backdoor the reversal can find with a 4-pixel mask."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 10)
        torch.nn.init.normal_(self.linear.weight, std=1.0, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        patch = x[:, :, :2, :2].mean((1, 2, 3))
        logits = self.linear(nn.functional.avg_pool2d(x, 4).flatten(1))  # smooth: natural triggers are large
        return logits + 40 * torch.sigmoid(30 * (patch - 0.8))[:, None] * (torch.arange(10) == 6)


def test_reversal_finds_and_detects_the_planted_target():
    blocks = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = 0.7 * nn.functional.interpolate(blocks, scale_factor=4)  # varied images, none bright enough to trigger
    y = PatchBackdoor()(x).argmax(1)
    assert len(y.unique()) >= 5
    reversal = configured("nc_reversal", steps=400, batch_per_label=16, check_every=5)
    rev = reversal(PatchBackdoor(), CleanData(x, y, "real"), NO_AUG, CTX)
    assert rev.target == 6 and rev.detected
    assert rev.l1[6] < 0.5 * rev.l1.median() and rev.rev_asr[6] > 0.9
    assert rev.masks[6, 0, :2, :2].mean() > rev.masks[6, 0, 4:, 4:].mean()  # the mask sits on the patch


class FourChannels(nn.Module):
    """Four neurons after a BN, pooled into two logits: small enough for exact Shapley values."""

    groups = ("bn",)

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 0.5, -0.3, 2.0]).view(4, 1, 1, 1))
            self.conv.bias.zero_()
            self.head.weight.copy_(torch.tensor([[0.2, -0.1, 0.3, 0.0], [1.5, 0.8, -0.4, 1.1]]))
            self.head.bias.copy_(torch.tensor([0.5, -0.5]))
        self.eval()

    def conv_bn_pairs(self):
        return [(self.conv, self.bn)]

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_shapley_estimate_matches_exact_values_of_a_tiny_model():
    model, n = FourChannels(), 4
    neurons = conv_neurons(model)
    bd_x = torch.rand(6, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    subsets = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)))  # every coalition, as a mask
    value = coalition_logits(model, neurons, subsets, bd_x, 4096).softmax(-1)[..., 1].mean(1)
    v = {tuple(int(b) for b in s.tolist()): float(val) for s, val in zip(subsets, value)}
    exact = torch.zeros(n)
    for i in range(n):
        for s in v:
            if s[i] == 0:
                with_i = s[:i] + (1,) + s[i + 1:]
                size = sum(s)
                exact[i] += math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n) * (v[with_i] - v[s])
    shap = configured("defense", "defense=shap_pruning", augment=NO_AUG, images_per_pass={"cpu": 4096}, tau_d=-1.0,
                      eps=1.0, max_walks=3000, min_walks=3000, max_evaluations=10**9, rse_tol=0.0)
    ctx = DefenseContext(num_classes=2, input_shape=(1, 3, 3), device=torch.device("cpu"), seed=0,
                         progress=lambda it, **kw: it)
    phi, stats = shap._shapley(model, neurons, torch.arange(n), torch.ones(n), bd_x,
                               CleanData(bd_x, torch.zeros(6, dtype=torch.long), "real"), 1, 4096, ctx,
                               torch.Generator().manual_seed(0), top=1)
    assert stats["walks"] == 3000
    torch.testing.assert_close(phi, exact, atol=0.01, rtol=0)
    assert abs(phi.sum() - (v[(1, 1, 1, 1)] - v[(0, 0, 0, 0)])) < 1e-4  # efficiency: a walk removes everyone


def test_outgoing_weight_norms_by_hand():
    """BSS weight=out_l2: each channel's column norm in the layer that reads it (the linear layer after the
    flatten owns H*W columns per channel)."""
    model = cnn()
    norms = channel_weight_bounds(model, "out_l2")
    assert [len(n) for n in norms] == [32, 64, 64]
    torch.testing.assert_close(norms[0][3], model.layer2[2].weight[:, 3].norm())  # BN layer2[0] -> conv layer2[2]
    torch.testing.assert_close(norms[1][7], model.layer3[2].weight[:, 7].norm())
    fc = model.classifier[1].weight  # 64 channels x 2 x 2 positions after three stride-2 convs on 16 x 16
    torch.testing.assert_close(norms[2][5], fc[:, 5 * 4:(5 + 1) * 4].norm())


def dead_channel_model() -> nn.Module:
    """``cnn()`` whose first conv's channel 3 never fires: a bias far below zero before the ReLU, and the
    BatchNorm after it saw variance 0 in training, as a channel that never fired on any training image."""
    model = cnn()
    with torch.no_grad():
        model.layer1[0].bias[3] = -1e3
        model.layer2[0].running_var[3] = 0.0
        model.layer2[0].running_mean[3] = 0.0
        model.layer2[0].bias[3] = 0.5  # a constant, positive output: "active" by the activation signal alone
    return model


def test_suspiciousness_never_ranks_a_dead_channel():
    """Before: a Lipschitz bound of ~1/sqrt(eps) and a NaN correlation turned into 0 put dead channels first."""
    model = dead_channel_model()
    x = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    clean = CleanData(x, model(x).argmax(1), "real")
    bss = configured("defense", "defense=suspiciousness", augment=NO_AUG, images_per_pass={"cpu": 4096},
                     alpha=(1.0, 1.0, 1.0), weight="clp", chunk_frac=0.005, max_frac=0.05, min_agreement=0.0,
                     delta_acc=1.0, copies=1)
    repaired = bss.apply(model, clean, CTX)
    report = bss.report()
    assert report["dead_channels"] == 1
    assert "layer2.0:3" not in report["pruned_channels"] and report["pruned"] == 8  # 5 % of 160, all live
    neurons = conv_neurons(model)
    mus, rhos, dead = activation_signals(model, neurons, x, CTX)
    assert dead[0][3] and dead[0].sum() == 1 and torch.isnan(rhos[0][3])  # missing, not zero
    assert not torch.isnan(rhos[0][torch.arange(32) != 3]).any()
    assert repaired is not model


def mitigation_case(monkeypatch, passes: list[bool], n_outliers: int, k_max: int, silent_from: int | None = None,
                    **options):
    """ShapPruning's decision on crafted coalition logits: prefix c passes the guard iff ``passes[c]``, and the
    reversed trigger stays at 100 % until ``silent_from`` channels are pruned (never, by default)."""
    model, n = FourChannels(), 4
    neurons = conv_neurons(model)
    x = torch.rand(10, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    guard_set = CleanData(x, model(x).argmax(1), "real")
    guard = Guard(model, neurons, guard_set, mode="acc", delta_acc=0.05, min_agreement=0.95, images_per_pass=4096)
    bd_x = torch.rand(6, 1, 3, 3)

    def crafted(_model, _neurons, masks, xs, *_args):
        good = torch.nn.functional.one_hot(guard.reference, 2).float() * 10
        clean = torch.stack([good if passes[g] else good.flip(-1) for g in range(len(masks))])
        pruned = (masks == 0).sum(1)
        to_target = torch.tensor([0.0, 10.0]).expand(len(masks), len(bd_x), 2).clone()
        if silent_from is not None:
            to_target[pruned >= silent_from] = torch.tensor([10.0, 0.0])
        return torch.cat([to_target, clean], dim=1)

    monkeypatch.setattr(shap_pruning, "coalition_logits", crafted)
    shap = configured("defense", "defense=shap_pruning", augment=NO_AUG, images_per_pass={"cpu": 4096}, **options)
    chosen, info = shap._mitigate(model, neurons, torch.arange(n), 1, n_outliers, k_max, torch.ones(n), bd_x,
                                  guard, 4096, CTX)
    return len(chosen), {**info["guard"], "stop_rule": info["stop_rule"]}


def test_shap_pruning_stops_at_the_first_channel_that_silences_the_reversed_trigger(monkeypatch):
    """The old rule pruned every outlier (here 3) even when the first channel alone silenced the trigger."""
    pruned, info = mitigation_case(monkeypatch, [True] * 5, n_outliers=3, k_max=4, silent_from=1)
    assert pruned == 1 and info["stop_rule"] == "silent"
    pruned, info = mitigation_case(monkeypatch, [True] * 5, n_outliers=1, k_max=4, silent_from=3)
    assert pruned == 3 and info["stop_rule"] == "silent"  # past the outliers, by rank, until silent
    pruned, info = mitigation_case(monkeypatch, [True, True, False, False, False], n_outliers=3, k_max=4,
                                   silent_from=3)
    assert pruned == 1 and info["stop_rule"] == "outliers"  # silent only past a count the guard failed
    pruned, _ = mitigation_case(monkeypatch, [True] * 5, n_outliers=3, k_max=4, silent_from=1, stop="outliers_first")
    assert pruned == 3  # the earlier rule, kept as a named variant


def test_shap_pruning_keeps_the_largest_count_its_guard_passed(monkeypatch):
    """Guard passes 0, 1, 2 and fails 3: the old rule pruned 3 outliers (then 4, past the failure)."""
    pruned, guard = mitigation_case(monkeypatch, [True, True, True, False, True], n_outliers=3, k_max=4)
    assert pruned == 2 and guard["pruned"] == 2
    assert [c for c, _ in guard["guard_curve"]] == [0, 1, 2, 3, 4] and guard["guard_min"] == pytest.approx(0.95)
    assert all(v >= guard["guard_min"] for c, v in guard["guard_curve"] if c <= pruned)


def test_shap_pruning_respects_k_max_unless_told(monkeypatch):
    pruned, _ = mitigation_case(monkeypatch, [True] * 6, n_outliers=4, k_max=2)
    assert pruned == 2
    pruned, _ = mitigation_case(monkeypatch, [True] * 6, n_outliers=4, k_max=2, exceed_k_max=True)
    assert pruned == 4


def test_shapley_walks_stop_on_convergence_not_on_a_stable_top_set():
    model, n = FourChannels(), 4
    neurons = conv_neurons(model)
    bd_x = torch.rand(6, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    ctx = DefenseContext(num_classes=2, input_shape=(1, 3, 3), device=torch.device("cpu"), seed=0,
                         progress=lambda it, **kw: it)
    args = (model, neurons, torch.arange(n), torch.ones(n), bd_x, CleanData(bd_x, torch.zeros(6, dtype=torch.long),
                                                                              "real"), 1, 4096, ctx)
    strict = configured("defense", "defense=shap_pruning", augment=NO_AUG, images_per_pass={"cpu": 4096}, tau_d=-1.0,
                        min_walks=5, max_walks=200, rse_tol=1e-9)
    _, stats = strict._shapley(*args, torch.Generator().manual_seed(0), top=1)
    assert stats["walks"] == 200 and stats["stop"] == "max_walks" and not stats["converged"]
    loose = configured("defense", "defense=shap_pruning", augment=NO_AUG, images_per_pass={"cpu": 4096}, tau_d=-1.0,
                       min_walks=5, max_walks=200, rse_tol=0.5)
    _, stats = loose._shapley(*args, torch.Generator().manual_seed(0), top=1)
    assert stats["converged"] and 5 <= stats["walks"] < 200 and stats["top_rse"] <= 0.5


def test_shapley_walks_one_coalition_a_pass_resumed_estimate_what_batched_passes_do():
    """On the CPU a walk scores one coalition per pass, resumed from the last (``ResumedForward``); on a GPU a pass
    scores many prefixes of a walk. The same walks, so the same estimate up to the float order of a batch."""
    model = cnn()
    neurons = conv_neurons(model)
    bd_x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    clean = CleanData(bd_x, torch.zeros(8, dtype=torch.long), "real")
    shap = configured("defense", "defense=shap_pruning", augment=NO_AUG, images_per_pass={"cpu": 8}, min_walks=20,
                      max_walks=20)
    out = {}
    for per_pass in (len(bd_x), 4096):
        out[per_pass] = shap._shapley(model, neurons, torch.arange(neurons.n), torch.ones(neurons.n), bd_x, clean, 1,
                                      per_pass, CTX, torch.Generator().manual_seed(0), top=2)
    (phi_one, stats_one), (phi_batched, stats_batched) = out[len(bd_x)], out[4096]
    assert stats_one["walks"] == stats_batched["walks"] == 20
    torch.testing.assert_close(phi_one, phi_batched, rtol=1e-4, atol=1e-5)
    assert stats_one["evaluations"] < stats_batched["evaluations"]  # a batch scores prefixes past a walk's end


class Relabelled(nn.Module):
    """The same model with its classes renamed: new label ``perm[c]`` is old class ``c``."""

    def __init__(self, model: nn.Module, perm: torch.Tensor) -> None:
        super().__init__()
        self.model, self.inverse = model, perm.argsort()

    def forward(self, x):
        return self.model(x)[:, self.inverse]


def test_relabelling_the_classes_does_not_change_which_trigger_is_found():
    """Published grids draw the target from the seed: detection must follow the trigger, not a label index."""
    blocks = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = 0.7 * nn.functional.interpolate(blocks, scale_factor=4)
    reversal = configured("nc_reversal", steps=400, batch_per_label=16, check_every=5)
    found = []
    for perm in (torch.arange(10), torch.tensor([3, 7, 0, 9, 1, 8, 2, 5, 4, 6]), torch.arange(10).flip(0)):
        model = Relabelled(PatchBackdoor(), perm)
        rev = reversal(model, CleanData(x, model(x).argmax(1), "real"), NO_AUG, CTX)
        assert int(rev.anomaly.argmax()) == int(perm[6]) == int(rev.l1.argmin())  # the planted trigger, renamed
        assert rev.masks[perm[6], 0, :2, :2].mean() > rev.masks[perm[6], 0, 4:, 4:].mean()
        found.append((float(rev.l1[perm[6]]), float(rev.anomaly[perm[6]])))
    (l1_a, ai_a), *rest = found
    assert all(abs(l1 - l1_a) < 0.5 and abs(ai - ai_a) < 0.5 for l1, ai in rest)


@pytest.mark.parametrize("name", ["nc", "linf_pruning", "shap_pruning"])
@pytest.mark.parametrize("when", ["skip", "force"])
def test_reversal_defenses_leave_the_model_alone_when_nothing_is_flagged(name, when, tiny_cfg, monkeypatch):
    """BackdoorBench's rule by default; before, all three acted on the argmax label (half the NC cells). Forced, a
    pruning defense prunes the fewest channels that silence the reversed trigger: none where it is silent already
    (ShapPruning pruned one channel whatever the curve said)."""
    from bdbench.defenses import reversal as reversal_module

    real = reversal_module.TriggerReversal._reverse

    def undetected(self, *args):
        rev = real(self, *args)
        return dataclasses.replace(rev, detected=False)

    monkeypatch.setattr(reversal_module.TriggerReversal, "_reverse", undetected)
    cfg = tiny_cfg(f"defense={name}", f"nc_reversal.when_undetected={when}", "nc_reversal.steps=20",
                   "defense.schedule.min_steps=5" if name == "nc" else "defense.max_walks=3" if name == "shap_pruning"
                   else "defense.k_max_frac=0.5")
    if name == "shap_pruning":
        cfg.defense.min_walks = 1
    defense = build(cfg.defense)
    model = cnn()
    x = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    repaired = defense.apply(model, CleanData(x, torch.arange(10).repeat(2), "real"), CTX)
    report = defense.report()
    assert report["detected"] is False and report["when_undetected"] == when and report["acted"] == (when == "force")
    unchanged = all(torch.equal(a, b) for a, b in zip(repaired.state_dict().values(), model.state_dict().values())) \
        and len(repaired.state_dict()) == len(model.state_dict())
    if when == "skip":
        assert unchanged and report.get("pruned", 0) == 0 and not report.get("unlearned", False)
    elif name == "nc":
        assert not unchanged and report["unlearned"]
    else:  # forced: the search ran on the most anomalous label and pruned what its rule reads off its own curve
        anomaly = report["anomaly_index"]
        assert report["detected_target"] == anomaly.index(max(anomaly))
        curve = report["rev_asr_curve"] if name == "linf_pruning" else report["rounds"][0]["rev_asr_curve"]
        assert len(curve) > 1
        silent = next(c for c, asr in enumerate(curve) if asr <= cfg.defense.tau_asr)
        assert report["pruned"] == silent and unchanged == (silent == 0)


def test_carriers_keep_every_class_where_the_limit_cuts():
    """Clean images come sorted by class: before, a cut kept the first classes only (at 250 per class the 256
    reversal carriers were class 0 and six images of class 1)."""
    x = torch.arange(15, dtype=torch.float32).view(15, 1, 1, 1).expand(15, 1, 2, 2).contiguous()
    clean = CleanData(x, torch.arange(3).repeat_interleave(5), "real")
    cut = carriers(clean, NO_AUG, copies=4, limit=6, gen=torch.Generator())
    assert torch.bincount(cut.y).tolist() == [2, 2, 2]
    repeated = carriers(clean, NO_AUG, copies=4, limit=20, gen=torch.Generator())  # two copies, 30 -> 20
    assert torch.bincount(repeated.y).tolist() == [7, 7, 6]
    for c in range(3):  # every distinct image of a class before any repeat of it
        assert set(repeated.x[repeated.y == c, 0, 0, 0].tolist()) == set(range(5 * c, 5 * c + 5))
    whole = carriers(clean, NO_AUG, copies=2, limit=100, gen=torch.Generator())  # no cut: every copy, in order
    assert torch.equal(whole.x, x.repeat(2, 1, 1, 1)) and torch.equal(whole.y, clean.y.repeat(2))


@pytest.mark.parametrize("name", ["suspiciousness", "linf_pruning", "shap_pruning"])
def test_carrier_defenses_hold_to_max_carriers_at_a_large_budget(name, tiny_cfg, monkeypatch):
    """At 250 per class BSS built 40,000 carriers (16 copies) and its one forward pass ran out of 24 GiB on
    WRN-16-1; ShapPruning and ℓ∞ would have evaluated 10,000 per coalition. Now at most ``max_carriers``,
    class-balanced."""
    module = importlib.import_module(f"bdbench.defenses.{name if name == 'suspiciousness' else 'shap_pruning'}")
    seen = []

    def spy(*args, **kwargs):
        out = carriers(*args, **kwargs)
        seen.append(torch.bincount(out.y, minlength=10).tolist())
        return out

    monkeypatch.setattr(module, "carriers", spy)
    cfg = tiny_cfg(f"defense={name}", "defense.max_carriers=40", "nc_reversal.when_undetected=force",
                   "nc_reversal.steps=20", "defense.max_walks=3" if name == "shap_pruning" else "defense.copies=4")
    if name == "shap_pruning":
        cfg.defense.min_walks = 1
    x = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    build(cfg.defense).apply(cnn(), CleanData(x, torch.arange(10).repeat_interleave(20), "real"), CTX)
    assert seen == [[4] * 10]
