"""The example plugin's own tests: its attack stamps what it says, its defense retrains the head only."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bdbench_example.checkerboard import Checkerboard
from bdbench_example.head_ft import HeadFineTuning
from bdbench.augment import Augment
from bdbench.models import create_model
from bdbench.defenses.base import CleanData, DefenseContext
from bdbench.defenses.finetune import Schedule


def test_checkerboard_stamps_a_checkerboard_and_round_trips():
    attack = Checkerboard(target=3, poison_rate=0.1, size=4)
    x = torch.full((2, 1, 8, 8), 128, dtype=torch.uint8)
    out = attack.apply_trigger(x)
    assert out[0, 0, :4, :4].tolist() == [[0, 255, 0, 255], [255, 0, 255, 0]] * 2
    assert (out[:, :, 4:, :] == 128).all() and (out[:, :, :, 4:] == 128).all()
    clone = Checkerboard(target=3, poison_rate=0.1, size=4)
    clone.load_state_dict(attack.state_dict())
    assert torch.equal(clone.apply_trigger(x), out)


def test_head_fine_tuning_changes_the_last_layer_only():
    torch.manual_seed(0)
    model = create_model("fmnist_cnn", num_classes=10, shape=(1, 16, 16), mean=[0.5], std=[0.5]).eval()
    before = copy.deepcopy(model.state_dict())
    schedule = Schedule(epochs=1, batch_size=10, min_steps=20, lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False,
                        shape="cosine", piecewise=None, cutout_size=0, batchnorm="frozen", grad_clip=None)
    defense = HeadFineTuning(schedule=schedule, augment=Augment(crop_padding=0, hflip=False))
    ctx = DefenseContext(num_classes=10, input_shape=(1, 16, 16), device=torch.device("cpu"), seed=0,
                         progress=lambda it, **kw: it)
    repaired = defense.apply(model, CleanData(torch.rand(10, 1, 16, 16), torch.arange(10), "real"), ctx)
    head = [name for name, m in repaired.named_modules() if isinstance(m, nn.Linear)][-1]
    changed = {k for k, v in repaired.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{head}.weight", f"{head}.bias"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # its input is untouched
    assert defense.report()["steps"] == 20


def test_head_fine_tuning_keeps_the_defense_contract():
    """bdbench's own contract check: weights that load into the model's class, its input untouched, a JSON report,
    the same weights for the same seed."""
    from bdbench.contract import check_defense

    schedule = Schedule(epochs=1, batch_size=10, min_steps=5, lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False,
                        shape="cosine", piecewise=None, cutout_size=0, batchnorm="frozen", grad_clip=None)
    report = check_defense(HeadFineTuning(schedule=schedule, augment=Augment(crop_padding=0, hflip=False)))
    assert report["steps"] == 5


def test_torchvision_resnet18_through_the_entry_point_takes_a_pruning_and_a_fine_tuning_defense():
    """bdbench's model contract on a model bdbench does not ship: created by name through the ``bdbench.models``
    entry point, its conv-BN pairs are what its graph says, its groups are real submodules, and CLP (pruning) and FT
    (fine-tuning) each change it and keep the defense contract on tiny inputs."""
    from bdbench.contract import check_defense
    from bdbench.models import create_model, list_models
    from bdbench.defenses.clp import CLP
    from bdbench.defenses.ft import FineTuning

    assert "resnet18_tv" in list_models()
    torch.manual_seed(0)
    model = create_model("resnet18_tv", num_classes=4, shape=(3, 16, 16), mean=[0.5] * 3, std=[0.5] * 3).eval()
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    pairs = model.conv_bn_pairs()
    assert len(pairs) == 20 and all(conv.out_channels == bn.num_features for conv, bn in pairs)
    assert [type(model.get_submodule(g)).__name__ for g in model.groups] == ["Sequential"] * 3

    clp = check_defense(CLP(u=0.5), model="resnet18_tv", num_classes=4, shape=(3, 16, 16))  # a low threshold: some channels are pruned
    assert clp["pruned"] > 0
    schedule = Schedule(epochs=1, batch_size=8, min_steps=3, lr=0.05, momentum=0.9, weight_decay=0.0, nesterov=False,
                        shape="cosine", piecewise=None, cutout_size=0, batchnorm="train", grad_clip=None)
    ft = check_defense(FineTuning(schedule=schedule, augment=Augment(crop_padding=0, hflip=False)),
                       model="resnet18_tv", num_classes=4, shape=(3, 16, 16))
    assert ft["steps"] == 3
