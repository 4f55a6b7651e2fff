"""Every registered attack, defense and model: found by name, configured in conf/, and runnable on a
tiny model (the timm pattern: tests parametrized over the registry)."""

from __future__ import annotations

import copy

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from hydra.utils import get_class

from bdbench.attacks import list_attacks
from bdbench.attacks.base import ATTACKS
from bdbench.train import train
from bdbench.models import MODELS, create_model, list_models
from bdbench.plugins import plugin_conf_dirs
from conftest import configured
from bdbench.validate import CONF_DIR, build, missing_values, options
from bdbench.defenses.base import DEFENSES, CleanData, DefenseContext


def config_file(group: str, name: str) -> Path:
    """The YAML of a config option, built-in or from an installed plugin package's conf/."""
    folders = [CONF_DIR, *(folder for _, folder in plugin_conf_dirs())]
    return next(f / group / f"{name}.yaml" for f in folders if (f / group / f"{name}.yaml").is_file())


@pytest.mark.parametrize("group, registry", [("attack", ATTACKS), ("defense", DEFENSES)])
def test_config_names_are_registry_names(group, registry, tiny_cfg):
    """Each registered name (built-in or a plugin's entry point) has a config named after its module, whose
    _target_ is the registered class; any other config is a named variant ``<name>_<variant>`` that composes
    onto its registered config."""
    assert set(registry.names()) <= set(options(group))
    for name in registry.names():
        target = OmegaConf.load(config_file(group, name))["_target_"]
        assert get_class(target) is registry.get(name)
        assert target.split(".")[-2] == name  # one module per attack/defense, named as the config
    for variant in set(options(group)) - set(registry.names()):
        cfg = tiny_cfg(f"{group}={variant}")[group]
        base = cfg["_target_"].split(".")[-2]
        assert base in registry.names() and variant.startswith(base + "_")
        assert OmegaConf.load(config_file(group, variant))["defaults"][0] == base


@pytest.mark.parametrize("name", list_models())
def test_model_config_and_interface(name):
    target = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")["_target_"]
    assert get_class(target) is MODELS.get(name)
    shape = (3, 32, 32) if name != "fmnist_cnn" else (1, 28, 28)
    model = create_model(name, num_classes=7, shape=shape, mean=[0.5] * shape[0], std=[0.5] * shape[0])
    assert model(torch.rand(2, *shape)).shape == (2, 7)
    assert model.groups and all(isinstance(m, torch.nn.Module) for m in model.group_modules())
    for conv, bn in model.conv_bn_pairs():
        assert isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
        assert conv.out_channels == bn.num_features


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(KeyError, match="valid: .*badnets"):
        ATTACKS.get("badnet")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_model("fmnist_cnn", num_classes=10, shape=(1, 16, 16), mean=[0.5], std=[0.5]).eval()


def trains(name: str) -> bool:
    """An attack that trains its model: its config leaves nothing to the user, by the gallery's rule
    (input_aware_file needs the user's files: tests/test_checkpoints.py)."""
    return not missing_values(OmegaConf.load(config_file("attack", name)))


@pytest.mark.parametrize("name", [name for name in list_attacks() if trains(name)])
def test_every_attack_trains_triggers_and_round_trips(name, tiny_cfg):
    """Through the real trainer for one short epoch: poisoning, hooks, trigger, artifacts.

    Seeded: Input-aware's generators start from the global generator, and after three mask steps an unlucky start
    leaves a mask that changes no pixel of a handful of images.
    """
    torch.manual_seed(0)
    cfg = tiny_cfg(f"attack={name}")
    if "mask_epochs" in cfg.attack:
        cfg.attack.mask_epochs, cfg.attack.mask_steps_per_epoch = 1, 3
    attack = build(cfg.attack)
    data = build(cfg.dataset).load("unused")
    train_set = attack.prepare(data.train, data.poisonable(), torch.Generator().manual_seed(0))
    assert train_set.x.dtype == torch.uint8 and train_set.x.shape == data.train.x.shape
    model = create_model("fmnist_cnn", num_classes=10, shape=(1, 16, 16), mean=[0.5], std=[0.5])
    recipe = build(cfg.recipe)
    recipe.epochs = 1
    history = train(model, train_set, attack, recipe, data.spec.augment, torch.Generator().manual_seed(0))
    assert len(history) == 1 and history[0]["loss"] > 0
    triggered = attack.apply_trigger(data.test.x[:8])
    assert triggered.dtype == torch.uint8 and triggered.shape == data.test.x[:8].shape
    if attack.target is not None:
        assert not torch.equal(attack.apply_trigger(data.test.x), data.test.x)
    if len(attack.poison_indices):
        assert not set(attack.poison_indices.tolist()) & set(data.pool.tolist())
        assert (train_set.y[attack.poison_indices] == attack.target).all()
        if getattr(attack, "clean_label", False):  # drawn among the target class, labels kept, capped by its size
            own = [i for i in data.poisonable().tolist() if data.train.y[i] == attack.target]
            assert len(attack.poison_indices) == min(round(attack.poison_rate * len(data.train)), len(own))
            assert torch.equal(train_set.y, data.train.y)
        else:
            assert len(attack.poison_indices) == round(attack.poison_rate * len(data.train))
    clone = build(cfg.attack)
    clone.load_state_dict(attack.state_dict())
    assert torch.equal(clone.apply_trigger(data.test.x[:8]), triggered)
    assert all(0 <= v <= 1 for v in attack.extra_metrics(model, data.test).values())


SMALL = {"epochs": 1, "min_steps": 3, "steps": 5, "max_walks": 3, "min_walks": 1, "iterations": 2}


def shrink(node) -> None:
    """Every length knob of a composed defense config cut to a few steps (nested ones too)."""
    for key in list(node.keys()):
        if OmegaConf.is_dict(node[key]):
            shrink(node[key])
        elif key in SMALL:
            node[key] = SMALL[key]


@pytest.mark.parametrize("name", options("defense"))
@pytest.mark.parametrize("budget", [0, 2])
def test_every_defense_runs_and_leaves_its_input_alone(name, budget, tiny_model, tiny_cfg):
    cfg = tiny_cfg(f"defense={name}").defense
    shrink(cfg)
    defense = build(cfg)
    n = 10 * budget
    clean = CleanData(torch.rand(n, 1, 16, 16), torch.arange(n) % 10, "real")
    if budget == 0 and not defense.data_free:
        clean = configured("synthesis", per_class=2, iterations=2)(copy.deepcopy(tiny_model), _ctx())
    before = copy.deepcopy(tiny_model.state_dict())
    repaired = defense.apply(tiny_model, clean, _ctx())
    assert repaired(torch.rand(3, 1, 16, 16)).shape == (3, 10)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), f"{name} modified its input model ({key})"
    assert isinstance(defense.report(), dict)


def found(report, key: str) -> list:
    """Every value of ``key`` anywhere in a nested report."""
    if isinstance(report, dict):
        return ([report[key]] if key in report else []) + [v for x in report.values() for v in found(x, key)]
    return [v for x in report for v in found(x, key)] if isinstance(report, list) else []


GUARDED = ("shap_pruning", "linf_pruning", "suspiciousness", "fp")
FINE_TUNING = ("ft", "fp", "nc", "nad", "argd", "anp", "ar_purification", "ar_purification_code")
REVERSAL = ("shap_pruning", "linf_pruning", "nc")


@pytest.mark.parametrize("name", sorted(set(GUARDED + FINE_TUNING + REVERSAL)))
def test_reports_carry_what_a_reviewer_recomputes(name, tiny_model, tiny_cfg):
    """Pruning: guard_curve, guard_min and the count kept, which passed. Fine-tuning: the BatchNorm mode.
    Reversal: whether a target was detected."""
    cfg = tiny_cfg(f"defense={name}", "nc_reversal.when_undetected=force").defense
    shrink(cfg)
    defense = build(cfg)
    clean = CleanData(torch.rand(20, 1, 16, 16), torch.arange(20) % 10, "real")
    defense.apply(tiny_model, clean, _ctx())
    report = defense.report()
    if name in GUARDED:
        curve, bar = dict(report["guard_curve"]), report["guard_min"]
        assert curve and report["pruned"] in curve and curve[0] >= bar - 1e-6
        assert all(v >= bar - 1e-9 for c, v in curve.items() if c <= report["pruned"])
        assert report["guard_classes_min"] >= 1 and len(report["guard_classes_curve"]) == len(curve)
    if name in FINE_TUNING:
        assert set(found(report, "batchnorm")) == {"train"}
    if name in REVERSAL:
        assert isinstance(report["detected"], bool) and report["acted"] is True


def slow_down(node) -> None:
    """Every learning rate of a composed defense config at most 0.01 (nested ones too)."""
    for key in list(node.keys()):
        if OmegaConf.is_dict(node[key]):
            slow_down(node[key])
        elif key == "lr" and node[key] > 0.01:
            node[key] = 0.01


@pytest.mark.parametrize("name", options("defense"))
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_defense_runs_on_a_residual_model(name, channels_last, tiny_cfg):
    """Skip connections (WRN-16-1, like PreAct-ResNet18) through masks, pruning, taps and fine-tuning, in both memory
    formats: the grid's recipe hands WRN-16-1 to its defenses in channels_last."""
    torch.manual_seed(0)
    model = create_model("wrn16_1", num_classes=10, shape=(1, 16, 16), mean=[0.5], std=[0.5]).train()
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with torch.no_grad():  # BatchNorm statistics of real activations, as a trained model has (defenses freeze them)
        for _ in range(10):
            model(torch.rand(64, 1, 16, 16))
    model.eval()
    cfg = tiny_cfg(f"defense={name}").defense
    shrink(cfg)
    slow_down(cfg)  # NAD's and ARGD's lr 0.1 diverges on noise images with frozen BN (a result, not a crash)
    clean = CleanData(torch.rand(10, 1, 16, 16), torch.arange(10), "real")
    repaired = build(cfg).apply(model, clean, _ctx())
    out = repaired(torch.rand(3, 1, 16, 16))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def _ctx() -> DefenseContext:
    return DefenseContext(num_classes=10, input_shape=(1, 16, 16), device=torch.device("cpu"), seed=0,
                          progress=lambda it, **kw: it)


def test_engine_imports_no_concrete_attack_or_defense():
    """bench/ knows the two interfaces and the registries (and, for ``bdbench perf``, the shared channel
    masks); concrete classes arrive through config, shared steps such as the trigger reversal through
    ``bdbench.defenses.base.register_shared`` (the runner named the reversal before)."""
    import ast

    engine = Path(__file__).resolve().parent.parent / "bench"
    for path in engine.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.split(".")[:2] in (["bdbench", "attacks"], ["bdbench", "defenses"]):
                    assert name in ("bdbench.attacks.base", "bdbench.defenses.base", "bdbench.defenses.masks"), \
                        f"{path.name} imports {name}"


CLEAN_LABEL = [name for name in list_attacks() if getattr(ATTACKS.get(name), "clean_label", False)]


@pytest.fixture(scope="module")
def clean_label_cells(tmp_path_factory):
    """One tiny cell per clean-label attack and defense row at one image per class, each model trained once."""
    from bdbench.runner import run_cell
    from conftest import TINY, compose_cell

    tmp = tmp_path_factory.mktemp("clean_label")
    records = {}
    for attack in CLEAN_LABEL:
        for name in options("defense"):
            short = ["attack.steps=5"] if attack == "lc" else []  # LC's PGD steps
            cfg = compose_cell(tmp, [*TINY, f"attack={attack}", "attack.poison_rate=0.05", *short, f"defense={name}",
                                     "budget=1"])
            shrink(cfg.defense)
            records[attack, name] = run_cell(cfg, dict(cfg.hydra.runtime.choices))
    return records


@pytest.mark.parametrize("attack", CLEAN_LABEL)
def test_every_clean_label_attack_runs_against_every_defense_row(attack, clean_label_cells):
    """The smoke grid of the clean-label attacks: every defense row reaches a record with metrics on their models,
    and each model is trained once (the first cell a miss, every other one a hit)."""
    cells = {name: r for (a, name), r in clean_label_cells.items() if a == attack}
    assert set(cells) == set(options("defense"))
    for name, record in cells.items():
        assert record["status"] == "ok", (name, record.get("error"))
        assert 0 <= record["metrics"]["acc"] <= 1 and 0 <= record["metrics"]["asr"] <= 1, name
    assert sum(not r["cache"]["hit"] for r in cells.values()) == 1
