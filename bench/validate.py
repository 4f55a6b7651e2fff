"""Configuration checks that run before any compute; each failure is one line with the valid values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from bench.device import PRECISIONS, resolve_device
from bench.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("dataset", "model", "attack", "defense", "recipe", "synthesis", "paths", "experiment")


def options(group: str) -> list[str]:
    """The config names of a group: the YAML files in ``conf/<group>``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_choice(group: str, value: str) -> None:
    if value not in options(group):
        raise ConfigError(f"{group}={value}: no such {group}; valid: {', '.join(options(group))}")


def validate(cfg: DictConfig, choices: dict[str, Any], check_data: bool = True) -> None:
    """Raise ConfigError for the first bad value of a composed cell config."""
    for group in ("dataset", "model", "attack", "defense", "recipe"):
        check_choice(group, str(choices.get(group)))
    num_classes = int(cfg.dataset.num_classes)
    pool = int(cfg.dataset.pool_per_class)
    budget = cfg.budget
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ConfigError(f"budget={budget}: clean images per class must be an integer >= 0; valid: 0..{pool}")
    if budget > pool:
        raise ConfigError(f"budget={budget} is larger than the defender pool of dataset {choices['dataset']} "
                          f"({pool} images per class); valid: 0..{pool} (or raise dataset.pool_per_class)")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed}: must be an integer >= 0")
    if "poison_rate" in cfg.attack and not 0 < float(cfg.attack.poison_rate) < 1:
        raise ConfigError(f"attack.poison_rate={cfg.attack.poison_rate}: must lie in (0, 1), e.g. 0.1")
    if "target" in cfg.attack and not (isinstance(cfg.attack.target, int) and 0 <= cfg.attack.target < num_classes):
        raise ConfigError(f"attack.target={cfg.attack.target}: out of range for {num_classes} classes; "
                          f"valid: 0..{num_classes - 1}")
    if cfg.recipe.precision not in PRECISIONS:
        raise ConfigError(f"recipe.precision={cfg.recipe.precision}; valid: {', '.join(PRECISIONS)}")
    resolve_device(cfg.device)
    for group in ("attack", "defense"):  # constructors check their own values and do no compute
        try:
            instantiate(cfg[group])
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise ConfigError(str(cause).strip().splitlines()[0]) from None
    if check_data:
        instantiate(cfg.dataset).check(Path(cfg.paths.data))
