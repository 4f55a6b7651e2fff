"""Checkpoints trained elsewhere: files saved by short stand-ins of the NAD/ARGD WideResNet and of BackdoorBench's
PreActResNet18 (their module layouts, so their key names) load into wrn16_1 / preact_resnet18, give the saving
model's logits, and run through a defense; a file that does not fit names its first misfit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdbench.checkpoints import load_checkpoint
from bdbench.errors import ConfigError
from bdbench.models import create_model
from conftest import configured
from bdbench.defenses.base import CleanData, DefenseContext


class NadBlock(nn.Module):
    """The public NAD code's BasicBlock: bn1, relu1, conv1, bn2, relu2, conv2, convShortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(c_in), nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(c_out), nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out
        self.convShortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        shortcut = x if self.equal else self.convShortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return shortcut + out


class NadNetworkBlock(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[NadBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class NadWideResNet(nn.Module):
    """WRN-16-1 as the NAD / ARGD code writes it: raw [0, 1] pixels in, no normalization."""

    def __init__(self, num_classes: int = 10, c: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, 16, 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = (NadNetworkBlock(2, 16, 16, 1), NadNetworkBlock(2, 16, 32, 2),
                                                 NadNetworkBlock(2, 32, 64, 2))
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class BbBlock(nn.Module):
    """BackdoorBench's PreActBlock: the projection shortcut is an nn.Sequential (keys ``shortcut.0``)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class BbPreActResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        c_in, stages = 64, []
        for i, w in enumerate((64, 128, 256, 512)):
            stages.append(nn.Sequential(BbBlock(c_in, w, 1 if i == 0 else 2), BbBlock(w, w, 1)))
            c_in = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).flatten(1))


def trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, as a trained model has (fresh ones would hide a mapping error)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def raw_pixels(name: str) -> nn.Module:
    """A registered model that reads raw [0, 1] pixels, as the NAD code's models do."""
    return create_model(name, num_classes=10, shape=(3, 32, 32), mean=[0.0] * 3, std=[1.0] * 3).eval()


def test_a_nad_wideresnet_state_dict_loads_into_wrn16_1_with_the_same_logits(tmp_path):
    theirs = trained_like(NadWideResNet())
    torch.save(theirs.state_dict(), tmp_path / "nad.pth")
    ours = raw_pixels("wrn16_1")
    info = load_checkpoint(ours, tmp_path / "nad.pth")
    assert info["layout"] == "nad-wideresnet" and len(info["sha256"]) == 64
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x))
    repaired = configured("defense", "defense=clp").apply(ours, CleanData(torch.empty(0), torch.empty(0), "none"),
                                                          DefenseContext(10, (3, 32, 32), torch.device("cpu"), 0))
    assert repaired(x).shape == (4, 10)  # and it runs through a defense


def test_a_backdoorbench_attack_result_loads_into_preact_resnet18(tmp_path):
    theirs = trained_like(BbPreActResNet18())
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": theirs.state_dict()},
               tmp_path / "attack_result.pt")  # BackdoorBench keeps the weights under "model"
    ours = raw_pixels("preact_resnet18")
    assert load_checkpoint(ours, tmp_path / "attack_result.pt")["layout"] == "backdoorbench-preactresnet"
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x))


def test_own_layout_dataparallel_prefix_and_a_misfit(tmp_path):
    mine = trained_like(raw_pixels("wrn16_1"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in mine.state_dict().items()}}, tmp_path / "dp.pt")
    again = raw_pixels("wrn16_1")
    assert load_checkpoint(again, tmp_path / "dp.pt")["layout"] == "bdbench"
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(again(x), mine(x))
    torch.save(trained_like(NadWideResNet()).state_dict(), tmp_path / "nad.pth")
    wider = create_model("wrn16_1", num_classes=10, shape=(3, 32, 32), mean=[0.0] * 3, std=[1.0] * 3, widen=2)
    with pytest.raises(ConfigError, match=r"closest: the nad-wideresnet layout.*block1\.0\.conv1\.weight has shape "
                                          r"\(16, 16, 3, 3\) in the file, \(32, 16, 3, 3\) in the model"):
        load_checkpoint(wider, tmp_path / "nad.pth")
    (tmp_path / "code.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="not readable as tensors only"):
        load_checkpoint(again, tmp_path / "code.pt")
    (tmp_path / "notes.txt").write_text("weights: see the paper\n" * 100)  # a text file was a traceback
    with pytest.raises(ConfigError, match="not readable as tensors only"):
        load_checkpoint(again, tmp_path / "notes.txt")
    broken = mine.state_dict()
    broken["fc.weight"] = broken["fc.weight"].clone().fill_(float("nan"))  # evaluated to an 'ok' record
    torch.save(broken, tmp_path / "nan.pt")
    with pytest.raises(ConfigError, match="fc.weight holds NaN or infinite values; valid: finite weights"):
        load_checkpoint(again, tmp_path / "nan.pt")


def test_a_cell_defends_a_checkpoint_instead_of_training(tiny_cfg, choices, tmp_path):
    """attack.checkpoint: the NAD-layout file is the poisoned model (raw pixels: model.normalize=false); the cache
    keys it by content, the record says where it came from, and the undefended metrics are bdbench's own."""
    from bdbench.metrics import evaluate
    from bdbench.runner import run_cell
    from bdbench.validate import build

    theirs = trained_like(NadWideResNet(c=1))
    torch.save({"state_dict": theirs.state_dict()}, tmp_path / "nad.pth")
    cfg = tiny_cfg("model=wrn16_1", "model.normalize=false", "attack=badnets", f"attack.checkpoint={tmp_path / 'nad.pth'}",
                   "defense=clp", "budget=0")
    record = run_cell(cfg, choices(cfg))
    assert record["status"] == "ok", record.get("error")
    source = record["cache"]["source"]
    assert source["source"] == "checkpoint" and source["layout"] == "nad-wideresnet" and record["cache"]["train_seconds"] == 0
    data = build(cfg.dataset).load(cfg.paths.data, "cpu", cfg.paths.cache)
    attack = build(cfg.attack)
    expected = evaluate(theirs, data.test, attack, 256, "fp32")
    assert record["undefended"]["acc"] == pytest.approx(expected["acc"]) and record["undefended"]["asr"] == pytest.approx(expected["asr"])
    again = run_cell(cfg := tiny_cfg("model=wrn16_1", "model.normalize=false", "attack=badnets",
                                     f"attack.checkpoint={tmp_path / 'nad.pth'}", "defense=none", "budget=0"), choices(cfg))
    assert again["cache"]["hit"] and again["cache"]["key"] == record["cache"]["key"]  # the same file: one entry


def official_wanet_grids(size: int, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """identity_grid and noise_grid as the official WaNet code (and BackdoorBench's wanet) make and save them."""
    ins = torch.rand(1, 2, k, k) * 2 - 1
    ins = ins / ins.abs().mean()
    noise_grid = F.interpolate(ins, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    a = torch.linspace(-1, 1, steps=size)
    x, y = torch.meshgrid(a, a, indexing="ij")
    return torch.stack((y, x), 2)[None], noise_grid


def test_wanet_defends_an_official_checkpoint_with_its_own_warp(tiny_cfg, choices, tmp_path):
    """attack.checkpoint + attack.field on one official-format state_dict.pt (netC, identity_grid, noise_grid): the
    trigger is the file's warp (s, grid_rescale from the config, the official formula), the cache keys both by
    content, and another field file is another poisoned model."""
    from bdbench.runner import run_cell

    torch.manual_seed(3)
    theirs = create_model("fmnist_cnn", num_classes=10, shape=(1, 16, 16), mean=[0.5], std=[0.5]).eval()
    identity, noise = official_wanet_grids(16)
    torch.save({"netC": theirs.state_dict(), "identity_grid": identity, "noise_grid": noise, "epoch_current": 3},
               tmp_path / "state_dict.pt")
    attack = configured("attack", "attack=wanet", checkpoint=str(tmp_path / "state_dict.pt"),
                        field=str(tmp_path / "state_dict.pt"))
    attack.build((1, 16, 16))
    x = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    grid = ((identity + attack.s * noise / 16) * attack.grid_rescale).clamp(-1, 1)  # the official warp, by hand
    expected = F.grid_sample(x.float(), grid.expand(8, -1, -1, -1), align_corners=True).round().clamp(0, 255)
    assert torch.equal(attack.apply_trigger(x), expected.to(torch.uint8))

    overrides = ["attack=wanet", f"attack.checkpoint={tmp_path / 'state_dict.pt'}",
                 f"attack.field={tmp_path / 'state_dict.pt'}", "defense=none", "budget=0"]
    record = run_cell(cfg := tiny_cfg(*overrides), choices(cfg))
    assert record["status"] == "ok", record.get("error")
    source = record["cache"]["source"]
    assert source["source"] == "checkpoint" and source["field"]["sha256"] == source["sha256"]
    torch.save({"identity_grid": identity, "noise_grid": -noise}, tmp_path / "other_field.pt")
    other = run_cell(cfg := tiny_cfg(*overrides[:2], f"attack.field={tmp_path / 'other_field.pt'}", *overrides[3:]),
                     choices(cfg))
    assert other["status"] == "ok" and other["cache"]["key"] != record["cache"]["key"] and not other["cache"]["hit"]


def test_wanet_checkpoint_without_its_warp_or_with_a_wrong_one_is_one_error(tmp_path):
    with pytest.raises(ValueError, match="attack.field=null"):
        configured("attack", "attack=wanet", checkpoint="model.pt", field=None)
    torch.save({"identity_grid": torch.zeros(1, 8, 8, 2)}, tmp_path / "field.pt")
    attack = configured("attack", "attack=wanet", checkpoint=None, field=str(tmp_path / "field.pt"))
    with pytest.raises(ConfigError, match=r"noise_grid, each of shape \(1, 16, 16, 2\)"):
        attack.build((1, 16, 16))


class IadBlock(nn.Module):
    """The IAD code's Conv2dBlock: keys ``conv2d.weight``, ``batch_norm.running_mean``, ..."""

    def __init__(self, c_in: int, c_out: int, relu: bool = True) -> None:
        super().__init__()
        self.conv2d, self.batch_norm = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out, momentum=0.05)
        if relu:
            self.relu = nn.ReLU()

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


class IadGenerator(nn.Sequential):
    """The IAD code's Generator (and BackdoorBench's copy) as it names its modules: convblock_down_0, ...,
    downsample_0, ..., convblock_middle, upsample_0, convblock_up_0, ...; output squashed into (0, 1)."""

    def __init__(self, c_in: int, c_out: int, channel_init: int, steps: int) -> None:
        super().__init__()
        current, following = c_in, channel_init
        for step in range(steps):
            self.add_module(f"convblock_down_{2 * step}", IadBlock(current, following))
            self.add_module(f"convblock_down_{2 * step + 1}", IadBlock(following, following))
            self.add_module(f"downsample_{step}", nn.MaxPool2d(2))
            if step < steps - 1:
                current, following = following, following * 2
        self.add_module("convblock_middle", IadBlock(following, following))
        current, following = following, following // 2
        for step in range(steps):
            self.add_module(f"upsample_{step}", nn.Upsample(scale_factor=2, mode="bilinear"))
            self.add_module(f"convblock_up_{2 * step}", IadBlock(current, current))
            self.add_module(f"convblock_up_{2 * step + 1}", IadBlock(current, following, relu=step < steps - 1))
            current, following = following, following // 2
            if step == steps - 2:
                following = c_out

    def forward(self, x):
        return torch.tanh(super().forward(x)) / (2 + 1e-7) + 0.5


def iad_trigger(x: torch.Tensor, netG: nn.Module, netM: nn.Module, mean: float, std: float) -> torch.Tensor:
    """The IAD code's backdoor image, by hand: computed on normalized images, denormalized, saved as uint8."""
    inputs = (x.float() / 255 - mean) / std
    patterns = (netG(inputs) - mean) / std  # normalize_pattern
    masks = torch.tanh(netM(inputs) * 20 - 10) / (2 + 1e-7) + 0.5  # threshold
    bd = inputs + (patterns - inputs) * masks
    return ((bd * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def iad_networks() -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(5)
    classifier = create_model("fmnist_cnn", num_classes=10, shape=(1, 16, 16), mean=[0.5], std=[0.5]).eval()
    netG, netM = IadGenerator(1, 1, 32, 3), IadGenerator(1, 1, 32, 3)  # 32 channels, 3 stages: not 28x28
    return classifier, trained_like(netG), trained_like(netM)


@pytest.mark.parametrize("layout", ["official", "backdoorbench"])
def test_input_aware_defends_a_saved_classifier_and_generators(layout, tiny_cfg, choices, tmp_path):
    """One file as the IAD code saves it (netC, netG, netM and its argparse options) or as BackdoorBench's netCGM.pt
    (the same under DataParallel's ``module.`` prefix, with ``args``): the trigger is the file's generators on
    normalized images, equal to the reference computation by hand; the cell defends the file's classifier and the
    cache keys the generators by content."""
    import argparse

    from bdbench.runner import run_cell

    classifier, netG, netM = iad_networks()
    prefix, options = ("", "opt") if layout == "official" else ("module.", "args")
    wrap = lambda net: {prefix + k: v for k, v in net.state_dict().items()}
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"netC": wrap(classifier), "netG": wrap(netG), "netM": wrap(netM), "epoch": 3,
                options: argparse.Namespace(dataset="mnist", lr_G=0.01, schedulerC_milestones=[100, 200])}, path)
    attack = configured("attack", "attack=input_aware_file", checkpoint=str(path), generators=str(path))
    attack.build((1, 16, 16))
    x = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        expected = iad_trigger(x, netG, netM, mean=0.5, std=0.5)
    ours = attack.apply_trigger(x)
    assert (ours != x).any() and (ours.int() - expected.int()).abs().max() <= 1  # one level: float rounding
    assert (ours == expected).float().mean() > 0.99

    overrides = ["attack=input_aware_file", f"attack.checkpoint={path}", f"attack.generators={path}",
                 "defense=none", "budget=0"]
    record = run_cell(cfg := tiny_cfg(*overrides), choices(cfg))
    assert record["status"] == "ok", record.get("error")
    source = record["cache"]["source"]
    assert source["source"] == "checkpoint" and source["generators"]["sha256"] == source["sha256"]
    assert 0 <= record["undefended"]["cross_acc"] <= 1
    torch.manual_seed(6)
    torch.save({"netG": wrap(netG), "netM": wrap(trained_like(IadGenerator(1, 1, 32, 3)))}, tmp_path / "other.pt")
    other = run_cell(cfg := tiny_cfg(*overrides[:2], f"attack.generators={tmp_path / 'other.pt'}", *overrides[3:]),
                     choices(cfg))
    assert other["status"] == "ok" and other["cache"]["key"] != record["cache"]["key"] and not other["cache"]["hit"]


def test_input_aware_generators_of_this_project_load_back_unchanged(tmp_path):
    """A cached Input-aware attack state (pattern_generator, mask_generator) read as generator files, with
    generator_mean/std null (this project's generators read pixels): the same trigger, image for image."""
    torch.manual_seed(7)
    trained = configured("attack", "attack=input_aware")
    trained.build((1, 16, 16))
    trained_like(trained.pattern_gen), trained_like(trained.mask_gen)
    torch.save(trained.state_dict(), tmp_path / "attack.pt")
    loaded = configured("attack", "attack=input_aware_file", checkpoint="unused.pt", generators=str(tmp_path / "attack.pt"),
                        generator_mean=None, generator_std=None)
    loaded.build((1, 16, 16))
    x = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    assert torch.equal(loaded.apply_trigger(x), trained.apply_trigger(x))


def test_input_aware_generators_that_do_not_fit_are_one_error(tiny_cfg, tmp_path):
    from bdbench.validate import validate

    classifier, netG, netM = iad_networks()
    torch.save({"netC": classifier.state_dict()}, tmp_path / "model_only.pt")
    cfg = tiny_cfg("attack=input_aware_file", f"attack.checkpoint={tmp_path / 'model_only.pt'}",
                   f"attack.generators={tmp_path / 'model_only.pt'}")
    with pytest.raises(ConfigError, match=r"attack.generators=.*model_only.pt: holds \['netC'\]"):
        validate(cfg, cfg.hydra.runtime.choices)  # before any compute: the validation pass reads it
    attack = configured("attack", "attack=input_aware_file", checkpoint="c.pt", generators=str(tmp_path / "model_only.pt"))
    with pytest.raises(ConfigError, match=r"holds \['netC'\]; valid: a torch.save file with netG and netM"):
        attack.build((1, 16, 16))
    torch.save({"netG": IadGenerator(1, 1, 16, 2).state_dict(), "netM": IadGenerator(1, 1, 16, 2).state_dict()},
               tmp_path / "mnist.pt")  # the IAD code's 28x28 generators (16 channels, 2 stages)
    attack = configured("attack", "attack=input_aware_file", checkpoint="c.pt", generators=str(tmp_path / "mnist.pt"))
    with pytest.raises(ConfigError, match=r"netG does not fit the generator for 16x16 images with 1 channel\(s\) at key"):
        attack.build((1, 16, 16))
    with pytest.raises(ValueError, match=r"attack.generator_mean=\[0.5\], attack.generator_std=None: valid: both null"):
        configured("attack", "attack=input_aware_file", checkpoint="c.pt", generators="g.pt", generator_std=None)
    attack = configured("attack", "attack=input_aware_file", checkpoint="c.pt", generators="g.pt",
                        generator_mean=[0.5, 0.5, 0.5], generator_std=[0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match=r"attack.generator_mean=\[0.5, 0.5, 0.5\]: 3 values for images of 1 channel"):
        attack.check_shape((1, 16, 16))
