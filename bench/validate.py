"""Configuration checks that run before any compute; each failure is one line with the valid values."""

from __future__ import annotations

import os
import tempfile
import types
import typing
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from bench.device import PRECISIONS, resolve_device
from bench.errors import ConfigError

# bdbench's config tree is package data (the folder conf/, installed as bench.conf): a wheel composes from
# any working directory, an editable install reads the checkout.
CONF_DIR = Path(str(files("bench.conf")))
GROUPS = ("dataset", "model", "attack", "defense", "recipe", "synthesis", "paths", "experiment")


def options(group: str, overrides: Sequence[str] = ()) -> list[str]:
    """The config names of a group as Hydra's config repository sees them: bdbench's own, those of installed
    plugin packages (the search-path plugin) and of any ``hydra.searchpath`` among ``overrides``."""
    hydra = GlobalHydra.instance()
    if not hydra.is_initialized():
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return options(group, overrides)
    return sorted(hydra.config_loader().get_group_options(group, config_name="config", overrides=list(overrides)))


def check_choice(group: str, value: str, overrides: Sequence[str] = ()) -> None:
    valid = options(group, overrides)
    if value not in valid:
        raise ConfigError(f"{group}={value}: no such {group}; valid: {', '.join(valid)}")


SIMPLE = (bool, int, float, str)


def _accepts(hint: Any, value: Any) -> bool | None:
    """Whether ``value`` fits a simple type hint (int, float, bool, str, their unions with None); None when the
    hint is not a simple one (dicts, tensors, sequences: left to the component)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not all(a in SIMPLE or a is type(None) for a in args):
        return None
    if value is None:
        return type(None) in args
    if isinstance(value, bool):
        return bool in args
    if isinstance(value, int):
        return int in args or float in args
    return any(isinstance(value, a) for a in args if a is not type(None))


def check_types(group: str, node: DictConfig) -> None:
    """Every key of a configured component against the types its constructor declares: the component's own
    schema (``defense.lr=abc`` used to be accepted and fail mid-cell)."""
    try:
        target = get_class(node["_target_"])
        hints = typing.get_type_hints(target.__init__)
    except Exception:  # an unresolvable hint or target: the constructor's own checks still run
        return
    for key, value in node.items():
        if key in hints and not OmegaConf.is_config(value):
            ok = _accepts(hints[key], value)
            if ok is False:
                names = [getattr(a, "__name__", str(a)) for a in (typing.get_args(hints[key]) or (hints[key],))]
                raise ConfigError(f"{group}.{key}={value!r}: wrong type; valid: {' or '.join(names)} (as "
                                  f"{target.__name__} declares it)")


def check_writable_folder(name: str, folder: Path) -> None:
    """A folder that exists or can be made, and that this user may write to: tried on the nearest existing
    ancestor with a temp folder removed at once (permission bits say nothing to root or on read-only mounts),
    so nothing stays behind before the run starts."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{name}={folder}: {existing} is a file, not a folder; valid: a folder this user can write")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".bdbench-write-check-"))
    except OSError as exc:
        raise ConfigError(f"{name}={folder}: cannot write under {existing} ({exc.strerror}); valid: a folder this "
                          f"user can write") from None


def validate(cfg: DictConfig, choices: dict[str, Any], check_data: bool = True) -> None:
    """Raise ConfigError for the first bad value of a composed cell config (its group names exist: it composed)."""
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
    for key in ("records", "cache"):
        check_writable_folder(f"paths.{key}", Path(cfg.paths[key]))
    for group in ("attack", "defense", "recipe", "synthesis", "dataset", "model"):
        check_types(group, cfg[group])
    for group in ("attack", "defense"):  # constructors check their own values and do no compute
        try:
            instantiate(cfg[group])
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise ConfigError(str(cause).strip().splitlines()[0]) from None
    if check_data:
        instantiate(cfg.dataset).check(Path(cfg.paths.data))
