"""Fixtures that compose real configs from conf/ (the lightning-hydra-template pattern)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from bdbench.validate import CONF_DIR
from bdbench.validate import configured as bench_configured

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("BDBENCH_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def fashion_mnist_available() -> bool:
    return (DATA / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()


def compose_cell(tmp_path: Path, overrides: list[str]) -> DictConfig:
    """A composed cell config whose cache, records and outputs live under ``tmp_path``. Its defense runs in this
    process unless a test asks for a worker (``worker.isolation=...``): a fresh worker per defense costs ~2.5 s of
    Python and torch start-up, hundreds of times in this suite, and tests/test_isolation.py tests the workers."""
    if not any(o.startswith("worker.isolation=") for o in overrides):
        overrides = [*overrides, "worker.isolation=none"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.data = str(DATA)
        cfg.paths.cache = str(tmp_path / "cache")
        cfg.paths.records = str(tmp_path / "records")
        cfg.paths.output = str(tmp_path / "outputs")
        cfg.device = "cpu"
    return cfg


def configured(node: str, *overrides: str, **values):
    """A component from its config in conf/ on the synthetic set's shapes (``bdbench.validate.configured``): tests
    state only what they change, every other value is the configured default, never a Python one."""
    return bench_configured(node, "dataset=synthetic", *overrides, **values)


# A cell on the synthetic set that trains in a few seconds and still learns a backdoor.
TINY = ["dataset=synthetic", "model=fmnist_cnn", "recipe.epochs=6", "recipe.batch_size=64",
        "recipe.optimizer.lr=0.05", "synthesis.iterations=30", "synthesis.per_class=2"]


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_cell(tmp_path, TINY + list(overrides))

    return make


@pytest.fixture
def choices():
    def of(cfg: DictConfig) -> dict:
        return dict(cfg.hydra.runtime.choices)

    return of
