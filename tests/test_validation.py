"""The validation layer: every component declares its keys' types, ranges and choices in its constructor, the
data set checks itself against its files, and each bad value is refused before any compute with one message
that names it and the valid ones. Defaults live in conf/ only."""

from __future__ import annotations

import gzip
import inspect
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from bdbench.errors import ConfigError
from bdbench.models import ImageClassifier
from bdbench.validate import CONF_DIR, DESCRIPTIVE, options, validate
from conftest import DATA, compose_cell, fashion_mnist_available

needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(), reason=f"Fashion-MNIST IDX files not under {DATA}")


def refused(tmp_path: Path, overrides: list[str], data: Path | None = None) -> str:
    cfg = compose_cell(tmp_path, overrides)
    if data is not None:
        cfg.paths.data = str(data)
    with pytest.raises(ConfigError) as info:
        validate(cfg, dict(cfg.hydra.runtime.choices))
    assert len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "cache").exists() and not (tmp_path / "records").exists()
    return str(info.value)


@needs_fmnist
@pytest.mark.parametrize("overrides, message", [
    (["recipe.epochs=-3"], "recipe.epochs=-3: invalid; valid: int >= 1"),
    (["recipe.batch_size=0"], "recipe.batch_size=0: invalid; valid: int >= 1"),
    (["recipe.optimizer.lr=-1"], "Invalid learning rate: -1"),  # torch's own check, one line
    (["recipe.precision=fp8"], "recipe.precision='fp8': invalid; valid: fp32, bf16"),
    (["dataset.num_classes=5", "attack.target=0"], "dataset.num_classes=5: fashion_mnist has 10 classes; valid: 10"),
    (["dataset.shape=[3,28,28]"], "dataset.shape=[3, 28, 28] with 1 means and 1 stds"),
    (["attack=blended", "attack.alpha=2"], "attack.alpha=2: invalid; valid: float > 0 and <= 1"),
    (["attack=blended", "attack.alpha=-0.5"], "attack.alpha=-0.5: invalid; valid: float > 0 and <= 1"),
    (["attack=badnets", "attack.size=20", "attack.margin=9"], "does not fit 28x28 images; valid: size + margin <= 28"),
    (["attack=badnets", "attack.value=300"], "attack.value=300: invalid; valid: int >= 0 and <= 255"),
    (["attack=wanet", "attack.k=100"], "attack.k=100: more control points than the 28x28 image"),
    (["attack=wanet", "attack.k=1"], "attack.k=1: invalid; valid: int >= 2"),
    (["synthesis.iterations=-1", "budget=0"], "synthesis.iterations=-1: invalid; valid: int >= 1"),
    (["defense=nad", "defense.student.momentum=1.5"], "defense.student.momentum=1.5: invalid; valid: float >= 0 and <= 1"),
    (["defense=ft", "defense.schedule.batchnorm=eval"], "defense.schedule.batchnorm='eval': invalid; valid: train, frozen"),
    (["defense=nc", "nc_reversal.when_undetected=maybe"], "defense.reversal.when_undetected='maybe': invalid; valid: skip, force"),
    (["defense=shap_pruning", "defense.k_max_frac=2"], "defense.k_max_frac=2: invalid; valid: float >= 0 and <= 1"),
    (["dataset.pool_per_class=100000", "budget=1"], "dataset.pool_per_class=100000 is larger than the smallest class (6000"),
    (["dataset.augment.crop_padding=-1"], "dataset.augment.crop_padding=-1: invalid; valid: int >= 0"),
    (["oracle.acc_ratio=0"], "oracle.acc_ratio=0: invalid; valid: a number > 0 or null"),
    (["defense=anp", "defense.candidates=[0.1]"], "defense.candidates=[0.1]"),
])
def test_bad_values_are_refused_by_the_component_that_declares_them(tmp_path, overrides, message):
    assert message in refused(tmp_path, overrides)


def test_ranges_accept_their_bounds_and_reject_past_them(tmp_path):
    """The range test itself: alpha = 1 is valid (a full blend), 1.0001 is not; an int is a valid float."""
    for ok in (["attack=blended", "attack.alpha=1"], ["attack=blended", "attack.alpha=0.5"], ["recipe.epochs=1"]):
        cfg = compose_cell(tmp_path, ["dataset=synthetic", *ok])
        validate(cfg, dict(cfg.hydra.runtime.choices))
    assert "attack.alpha=1.0001" in refused(tmp_path, ["dataset=synthetic", "attack=blended", "attack.alpha=1.0001"])


def copy_fmnist(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "fashion-mnist"
    shutil.copytree(DATA / "fashion-mnist", folder)
    return tmp_path / "data"


@needs_fmnist
def test_a_truncated_idx_file_is_one_line_naming_the_file(tmp_path):
    data = copy_fmnist(tmp_path)
    labels = data / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a whole gzip of half a file
    message = refused(tmp_path, [], data)
    assert str(labels) in message and "truncated" in message
    images = data / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:1000])  # a cut gzip stream
    assert str(images) in refused(tmp_path, [], data)


def test_an_image_folder_with_other_classes_than_configured_is_refused(tmp_path):
    from torchvision.io import write_png
    import torch

    for split in ("train", "test"):
        for c in range(3):
            folder = tmp_path / "data" / "tiny" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                write_png(torch.full((3, 32, 32), 40 * c + i, dtype=torch.uint8), str(folder / f"{i}.png"))
    base, data = ["dataset=cifar10_jpeg", "dataset.folder=tiny", "budget=1"], tmp_path / "data"
    assert "dataset.num_classes=10: the files of cifar10_jpeg hold 3 classes; valid: 3" in refused(tmp_path, base, data)
    message = refused(tmp_path, [*base, "dataset.num_classes=3", "attack.target=0", "dataset.pool_per_class=5"], data)
    assert "dataset.pool_per_class=5 is larger than the smallest class (4 images); valid: 0..4" in message


def configured_nodes() -> list[tuple[str, DictConfig]]:
    """Every node with a ``_target_`` in every config under conf/ (as composed, so nested defaults count)."""
    from hydra import compose, initialize_config_dir

    nodes = []
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for group in ("attack", "defense", "dataset", "model", "recipe", "synthesis"):
            for name in options(group):
                cfg = compose("config", overrides=[f"{group}={name}"])
                stack = [(f"{group}={name}", cfg[group])]
                if group == "defense":
                    stack.append(("nc_reversal", cfg.nc_reversal))
                while stack:
                    where, node = stack.pop()
                    if "_target_" in node:
                        nodes.append((where, node))
                    stack += [(f"{where}.{k}", node[k]) for k in node.keys()  # ???: a value the user gives
                              if not OmegaConf.is_missing(node, k) and isinstance(node[k], DictConfig)]
    return nodes


def test_no_python_default_duplicates_a_configured_value():
    """Defaults live in conf/ only: a configured class's constructor has no default for a key its YAML sets
    (``batch_per_label`` was None in Python and 32 in the YAML, and nobody could tell which ran)."""
    duplicated = []
    for where, node in configured_nodes():
        cls = get_class(node["_target_"])
        if cls.__module__.startswith("torch"):
            continue
        signature = inspect.signature(cls.__init__ if not hasattr(cls, "__dataclass_fields__") else cls)
        for key in node:
            param = signature.parameters.get(key)
            if param is not None and param.default is not inspect.Parameter.empty:
                duplicated.append(f"{where}.{key} (Python default {param.default!r})")
    assert not duplicated, duplicated


def test_every_configured_key_is_a_constructor_parameter():
    """A YAML key the constructor does not take would fail at instantiation; one it takes through **kwargs is
    passed on to a parent that takes it."""
    for where, node in configured_nodes():
        cls = get_class(node["_target_"])
        if cls.__module__.startswith("torch"):
            continue
        names = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass) and klass is not object:
                names |= set(inspect.signature(klass.__init__).parameters)
        missing = [k for k in node if not k.startswith("_") and k not in names and k not in DESCRIPTIVE]
        assert not missing, f"{where}: {missing} not taken by {cls.__name__}"


def test_the_yaml_schedules_are_one_type():
    """One fine-tuning schedule type: every schedule node of every defense is a bdbench.defenses.finetune.Schedule."""
    kinds = {OmegaConf.select(node, "_target_") for where, node in configured_nodes()
             if where.rsplit(".", 1)[-1] in ("schedule", "teacher", "student", "teacher_schedule", "code_schedule",
                                             "neuron_schedule")}
    assert kinds == {"bdbench.defenses.finetune.Schedule"}


def test_display_names_name_cells_without_changing_them(tiny_cfg, choices):
    """A component's display_name is what tables print; renaming it neither reruns a cell nor retrains a model."""
    from bdbench.runner import cell_path

    cfg = tiny_cfg("attack=badnets", "defense=shap_pruning")
    renamed = tiny_cfg("attack=badnets", "defense=shap_pruning", "defense.display_name=Shapley", "attack.display_name=X")
    assert cell_path(cfg, choices(cfg)) == cell_path(renamed, choices(renamed))
    assert cfg.defense.display_name == "ShapPruning" and cfg.attack.display_name == "BadNets"


def test_a_new_optional_key_renames_no_finished_cell(tiny_cfg, choices):
    """A cell is named by its config without nulls: adding a key whose value is null (a later version's optional
    ``attack.checkpoint``) keeps every finished cell's record name, so a resumed sweep re-runs nothing; any
    non-null value of it is a different cell."""
    from omegaconf import open_dict

    from bdbench.runner import cell_path

    cfg = tiny_cfg("attack=badnets", "defense=clp")
    before = cell_path(cfg, choices(cfg))
    with open_dict(cfg):
        cfg.attack.checkpoint = None
    assert cell_path(cfg, choices(cfg)) == before
    cfg.attack.checkpoint = "model.pt"
    assert cell_path(cfg, choices(cfg)) != before


class Bare(ImageClassifier):
    """A conv net that declares nothing: no feature groups, no conv-BatchNorm pairs, no BatchNorm."""

    def __init__(self, num_classes: int, shape, mean, std, normalize: bool | None = None) -> None:
        super().__init__(num_classes, shape, mean, std, normalize)
        self.conv = torch.nn.Conv2d(shape[0], 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.mark.parametrize("defense, needs", [
    ("nad", "at least 3 feature groups; model=bare declares 0"),
    ("argd", "at least 3 feature groups; model=bare declares 0"),
    ("fp", "at least 1 feature groups; model=bare declares 0"),
    ("ar_purification", "at least 2 feature groups; model=bare declares 0"),
    ("clp", "at least 1 conv-BatchNorm pairs (conv_bn_pairs()); model=bare declares 0"),
    ("suspiciousness", "at least 1 conv-BatchNorm pairs (conv_bn_pairs()); model=bare declares 0"),
    ("anp", "at least 1 affine BatchNorm layers; model=bare declares 0"),
    ("ft", None),  # fine-tuning needs nothing a conv net does not have
])
def test_a_defense_refuses_a_model_without_what_it_needs_before_compute(defense, needs, tiny_cfg, choices):
    """A model of one's own that does not declare what a defense reads is one line naming both, at validation:
    before, CLP ran to a TypeError and NAD to an IndexError in the middle of the cell."""
    cfg = tiny_cfg(f"defense={defense}")
    cfg.model = {"_target_": "test_validation.Bare"}
    picked = {**choices(cfg), "model": "bare"}
    if needs is None:
        validate(cfg, picked)
        return
    with pytest.raises(ConfigError) as error:
        validate(cfg, picked)
    assert str(error.value) == f"defense={defense} needs a model with {needs}; valid: a model that declares them " \
                               f"(docs/models.md)"
