"""Configuration checks that run before any compute; each failure is one line with the valid values."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import tempfile
import types
import typing
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
import torch

from bdbench.device import resolve_device
from bdbench.errors import ConfigError
from bdbench.fsutil import sha256_json
from bdbench.isolation import resolve_isolation
from bdbench.outcome import Rule
from bdbench.schema import Range
from bdbench.seeding import derive

# bdbench's config tree is package data (the folder conf/, installed as bdbench.conf): a wheel composes from
# any working directory, an editable install reads the checkout.
CONF_DIR = Path(str(files("bdbench.conf")))
GROUPS = ("dataset", "model", "attack", "defense", "recipe", "synthesis", "paths", "experiment")


def options(group: str, overrides: Sequence[str] = ()) -> list[str]:
    """The config names of a group as Hydra's config repository sees them: bdbench's own, those of installed
    plugin packages (the search-path plugin) and of any ``hydra.searchpath`` among ``overrides``."""
    hydra = GlobalHydra.instance()
    if not hydra.is_initialized():
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return options(group, overrides)
    return sorted(hydra.config_loader().get_group_options(group, config_name="config", overrides=list(overrides)))


def configured(node: str, *overrides: str, **values: Any) -> Any:
    """A component built from its config (``node`` is a path into the composed config: "attack", "defense.schedule",
    "nc_reversal"; ``overrides`` select and set as on the command line), with ``values`` replacing some of its keys.
    Nested components are built from their configs too: every value not given is the configured one."""
    hydra = GlobalHydra.instance()
    if not hydra.is_initialized():
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return configured(node, *overrides, **values)
    target = OmegaConf.select(compose("config", overrides=list(overrides)), node)
    kwargs = {}
    for key in target:  # a value given here is never read from the config (it may be mandatory there: ???)
        if key.startswith("_") or key in values or key in DESCRIPTIVE:
            continue
        value = target[key]
        if OmegaConf.is_dict(value) and "_target_" in value:
            kwargs[key] = build(value)
        else:
            kwargs[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return get_class(target["_target_"])(**kwargs, **values)


def check_choice(group: str, value: str, overrides: Sequence[str] = ()) -> None:
    valid = options(group, overrides)
    if value not in valid:
        close = difflib.get_close_matches(value, valid, n=1)
        raise ConfigError(f"{group}={value}: no such {group}" + (f" (did you mean {close[0]}?)" if close else "")
                          + f"; valid: {', '.join(valid)}")


DESCRIPTIVE = ("display_name",)  # keys that name a component in tables and figures; they never configure it


def strip_descriptive(node: Any) -> Any:
    """A plain, resolved copy of a config node without its descriptive keys, at every depth (a cell's identity
    and what a constructor receives)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: strip_descriptive(v) for k, v in node.items() if k not in DESCRIPTIVE}
    if isinstance(node, list):
        return [strip_descriptive(v) for v in node]
    return node


def build(node: Any, **kwargs: Any) -> Any:
    """A component from its config node: Hydra's ``instantiate``, nested components included, without the
    descriptive keys."""
    return instantiate(strip_descriptive(node), **kwargs)


def display_name(cfg: DictConfig, group: str, choice: str) -> str:
    """What tables and figures call a component: its config's ``display_name``, else its config name."""
    return str(OmegaConf.select(cfg, f"{group}.display_name", default=None) or choice)


SIMPLE = (bool, int, float, str)


def _fits(hint: Any, value: Any) -> tuple[bool, str] | None:
    """Whether ``value`` fits a declared hint, and the valid values in words; None when the hint is not one
    this layer reads (sequences, tensors, callables: left to the component). Reads plain types, ``Literal``
    choices, ``Annotated[..., Range]`` bounds and their unions with None."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        fits = _fits(base, value)
        if fits is None:
            return None
        ranges = [e for e in extras if isinstance(e, Range)]
        words = f"{fits[1]} {' and '.join(map(str, ranges))}".strip()
        return fits[0] and all(value in r for r in ranges), words
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return value in choices and type(value) in {type(c) for c in choices}, ", ".join(map(str, choices))
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if len(args) > 1:
        parts = [_fits(a, value) for a in args if a is not type(None)]
        if any(p is None for p in parts):
            return None
        words = " or ".join(p[1] for p in parts) + (" or null" if type(None) in args else "")
        return (value is None and type(None) in args) or any(p[0] for p in parts), words
    if hint not in SIMPLE:
        return None
    name = hint.__name__
    if value is None or isinstance(value, bool):
        return isinstance(value, bool) and hint is bool, name
    if isinstance(value, int):
        return hint in (int, float), name
    return isinstance(value, hint), name


def check_types(group: str, node: DictConfig) -> None:
    """Every key of a configured component, and of the components nested in it, against what its constructor
    declares (type, range, choices): the component's own schema. ``defense.lr=abc`` and ``attack.alpha=2`` used to
    be accepted and fail mid-cell or run garbage."""
    try:
        target = get_class(node["_target_"])
        hints = typing.get_type_hints(target.__init__, include_extras=True)
    except Exception:  # an unresolvable hint or target: the constructor's own checks still run
        return
    for key, value in node.items():
        if isinstance(value, DictConfig) and "_target_" in value:
            check_types(f"{group}.{key}", value)
        elif key in hints and not OmegaConf.is_config(value):
            fits = _fits(hints[key], value)
            if fits is not None and not fits[0]:
                raise ConfigError(f"{group}.{key}={value!r}: invalid; valid: {fits[1]} (as {target.__name__} "
                                  f"declares it)")


# The engine's own settings, checked like a component's: (key, integer?, lowest valid value, null allowed).
SETTINGS = (("dataset.num_classes", True, 2, False), ("dataset.pool_per_class", True, 0, False),
            ("worker.timeout", False, 1e-9, True), ("worker.memory_gb", False, 1e-9, True),
            ("worker.threads", True, 1, True), ("monitor.test_every", True, 1, True),
            ("oracle.acc_ratio", False, 1e-9, True))
COMPONENTS = ("dataset", "model", "attack", "defense", "recipe", "synthesis", "nc_reversal", "outcome", "worker")


def leaves(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of every leaf of a plain config container, paths as the command line writes them."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, f"{where}[{i}]")
    else:
        yield where, node


@functools.cache
def top_level_keys() -> frozenset[str]:
    """The settings a composed config may have at its top: the root config's keys and the config groups."""
    return frozenset(OmegaConf.load(CONF_DIR / "config.yaml").keys()) | set(GROUPS) | {"hydra"}


def check_settings(cfg: DictConfig) -> None:
    """The engine's own numbers, top-level keys nobody reads, and non-finite numbers anywhere in a component: each
    of them used to crash mid-cell, or to run and write a record (``seed=true``, ``+foo=bar`` as a new cell,
    ``recipe.optimizer.lr=inf``, ``worker.memory_gb=-1``)."""
    for key, integer, low, nullable in SETTINGS:
        value = OmegaConf.select(cfg, key)
        if value is None and nullable:
            continue
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or value < low:
            words = (f"an integer >= {low}" if integer else "a number > 0") + (" or null" if nullable else "")
            raise ConfigError(f"{key}={value!r}: invalid; valid: {words}")
    known = top_level_keys()
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(f"{key}: no such setting (a key nothing reads would still rename the cell); valid: "
                              f"{', '.join(sorted(known - {'defaults', 'hydra'}))}")
    for group in COMPONENTS:
        if group not in cfg:
            continue
        try:
            values = list(leaves(OmegaConf.to_container(cfg[group], resolve=True), group))
        except Exception:  # an interpolation that does not resolve here: the component's own checks report it
            continue
        for where, value in values:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{where}={value}: invalid; valid: a finite number")


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


# What a defense config may interpolate: the data set's public facts and the shared settings defenses use. Anything else
# (the attack and its target, the seed, paths, the environment through a resolver) would hand a defense the answers.
DEFENDER_FACTS = ("dataset.defense_augment", "dataset.num_classes", "dataset.shape", "nc_reversal", "coalition_images")
_INTERPOLATION = re.compile(r"\$\{\s*([^${}:\s]*)\s*(:?)")


def check_defense_reach(cfg: DictConfig) -> None:
    """Refuse, naming the key, a defense setting that interpolates anything but ``DEFENDER_FACTS`` (and those nodes'
    own values likewise): resolved in the runner, ``leak: ${attack}`` reached the worker as a working attack object."""
    for group in ("defense", "nc_reversal", "coalition_images"):
        if group not in cfg:
            continue
        for where, value in leaves(OmegaConf.to_container(cfg[group], resolve=False), group):
            for path, resolver in _INTERPOLATION.findall(value) if isinstance(value, str) else ():
                if resolver or not any(path == fact or path.startswith(fact + ".") for fact in DEFENDER_FACTS):
                    raise ConfigError(f"{where}={value}: a defense may not interpolate that; valid: "
                                      + ", ".join(f"${{{fact}}}" for fact in DEFENDER_FACTS))


def one_line(exc: Exception) -> ConfigError:
    cause = exc.__cause__ if isinstance(exc, InstantiationException) and exc.__cause__ else exc
    return ConfigError(str(cause).strip().splitlines()[0])


NEEDS = {"groups": ("feature groups", lambda m: len(getattr(m, "groups", ()))),
         "conv_bn_pairs": ("conv-BatchNorm pairs (conv_bn_pairs())",
                           lambda m: len(m.conv_bn_pairs()) if hasattr(m, "conv_bn_pairs") else 0),
         "batchnorms": ("affine BatchNorm layers", lambda m: sum(isinstance(x, torch.nn.modules.batchnorm._BatchNorm)
                                                                 and x.affine for x in m.modules()))}


def check_model_fits(needs: dict[str, int], model: torch.nn.Module, choices: dict[str, Any]) -> None:
    """A defense's needs (``Defense.needs``) against what the model declares: one line naming both, before any
    compute, instead of an IndexError or a TypeError in the middle of the cell."""
    for key, wanted in needs.items():
        if key not in NEEDS:  # a plugin's word bdbench cannot check
            raise ConfigError(f"defense={choices.get('defense')} needs {key!r} of a model, which bdbench cannot "
                              f"check; valid: {', '.join(NEEDS)} (Defense.needs)")
        words, count = NEEDS[key]
        has = count(model)
        if has < wanted:
            raise ConfigError(f"defense={choices.get('defense')} needs a model with at least {wanted} {words}; "
                              f"model={choices.get('model')} declares {has}; valid: a model that declares them "
                              f"(docs/models.md)")


@dataclasses.dataclass(frozen=True)
class Cell:
    """A cell's components, built from its config once, by ``validate``, and checked there before any compute: the
    runner, the gallery and the API run these. The model is the exception: validation checks its architecture on
    the meta device (no weights, no random numbers), and ``new_model`` builds it with weights, once, where the
    poisoned model is trained or loaded."""

    cfg: DictConfig
    choices: dict[str, Any]
    dataset: Any
    attack: Any
    recipe: Any
    synthesis: Any
    rule: Any
    facts: dict  # the defense's own description (bdbench.isolation.describe): data-free, shared steps, needs
    device: torch.device
    precision: str  # the recipe's precision on CUDA, fp32 elsewhere

    def new_model(self) -> torch.nn.Module:
        """The cell's model, initialised from its seed (what the cache key of its poisoned model assumes)."""
        torch.manual_seed(derive(self.cfg.seed, "init"))
        return model_of(self.cfg, self.dataset)


def model_of(cfg: DictConfig, dataset: Any) -> torch.nn.Module:
    return build(cfg.model, num_classes=dataset.num_classes, shape=dataset.shape, mean=dataset.mean, std=dataset.std)


_CHECKED: dict[str, Cell] = {}  # cells a sweep validated before its first job, until their job runs here


def _job_key(cfg: DictConfig) -> str:
    """A composed config without Hydra's own node: the same job composed again (by the launcher) has the same key."""
    return sha256_json({k: OmegaConf.to_container(cfg[k], resolve=False) if OmegaConf.is_config(cfg[k]) else cfg[k]
                        for k in cfg if k != "hydra"})


def keep_checked(cells: list[Cell]) -> None:
    """Keep a sweep's validated cells for its jobs in this process (Hydra's basic launcher, the API), which then
    run them instead of validating and building them again; a launcher's jobs elsewhere validate their own."""
    _CHECKED.clear()
    _CHECKED.update({_job_key(c.cfg): c for c in cells})


def checked(cfg: DictConfig, choices: dict[str, Any]) -> Cell:
    """The cell of a job: the one validated for it before the sweep began (each is run once), else validated now."""
    return _CHECKED.pop(_job_key(cfg), None) or validate(cfg, choices)


def missing_values(cfg: DictConfig) -> list[str]:
    """The keys a config leaves to the user (``???``), found without resolving any interpolation."""
    def walk(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [k for key, value in node.items() for k in walk(value, f"{prefix}{key}.")]
        return [prefix[:-1]] if node == "???" else []

    return walk(OmegaConf.to_container(cfg, resolve=False), "")


def validate(cfg: DictConfig, choices: dict[str, Any], check_data: bool = True) -> Cell:
    """The cell of a composed config, built and checked; ConfigError for its first bad value (its group names exist:
    it composed).

    Each component checks its own keys: types, ranges and choices from its constructor's hints (``check_types``),
    the rest in its constructor (which does no compute), the trigger against the image shape (``check_shape``)
    and the data set against its files (``check_data``; ``check_data=False`` skips re-reading files a sweep's
    earlier job already verified, the pool is checked for every job).
    """
    missing = [k for k in missing_values(cfg) if not k.startswith("hydra.")]
    if missing:  # a value the config leaves to the user (???): named here, not a traceback from the first read
        raise ConfigError(f"{', '.join(missing)}: no value given, and the config has no default; valid: "
                          + " ".join(f"{k}=VALUE" for k in missing) + " (its YAML in conf/ says what each takes)")
    check_settings(cfg)
    num_classes = int(cfg.dataset.num_classes)
    pool = int(cfg.dataset.pool_per_class)
    budget = cfg.budget
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ConfigError(f"budget={budget}: clean images per class must be an integer >= 0; valid: 0..{pool}")
    if budget > pool:
        raise ConfigError(f"budget={budget} is larger than the defender pool of dataset {choices['dataset']} "
                          f"({pool} images per class); valid: 0..{pool} (or raise dataset.pool_per_class)")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed}: must be an integer >= 0")
    if "target" in cfg.attack and not (isinstance(cfg.attack.target, int) and 0 <= cfg.attack.target < num_classes):
        raise ConfigError(f"attack.target={cfg.attack.target}: out of range for {num_classes} classes; "
                          f"valid: 0..{num_classes - 1}")
    device = resolve_device(cfg.device)
    resolve_isolation(cfg.worker.isolation)
    if cfg.stage not in ("cell", "model"):
        raise ConfigError(f"stage={cfg.stage!r}: invalid; valid: cell, model")
    for key in ("records", "cache", "output"):
        check_writable_folder(f"paths.{key}", Path(cfg.paths[key]))
    check_defense_reach(cfg)
    for group in ("attack", "recipe", "synthesis", "dataset", "model"):
        check_types(group, cfg[group])
    try:  # constructors check the rest of their own values and do no compute
        dataset = build(cfg.dataset)
        with torch.device("meta"):
            model = model_of(cfg, dataset)
        recipe = build(cfg.recipe)
        recipe.optimizer([torch.nn.Parameter(torch.zeros(1))])  # torch's own checks of lr, momentum, ...
        synthesis = build(cfg.synthesis)
        attack = build(cfg.attack)
        attack.check_shape(dataset.shape)
        rule = Rule(**OmegaConf.to_container(cfg.outcome))
    except Exception as exc:
        raise one_line(exc) from None
    from bdbench.runner import defense_facts  # the defense's own checks, run where its code may run

    facts = defense_facts(cfg)
    if facts["error"]:
        raise ConfigError(facts["error"])
    check_model_fits(facts["needs"], model, choices)
    if attack.checkpoint:  # the file fits the model (keys and shapes), or one line names its first misfit
        from bdbench.checkpoints import fitting

        fitting(model, attack.checkpoint)
        attack.build(dataset.shape)  # and the trigger's own files (WaNet's field, Input-aware's generators)
    for split in ("train", "test"):  # fewer images than classes leaves ACC, ASR or the pool undefined
        n = OmegaConf.select(cfg, f"dataset.subset.{split}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < num_classes):
            raise ConfigError(f"dataset.subset.{split}={n!r}: too few images for {num_classes} classes; valid: null "
                              f"(all) or an integer >= {num_classes}")
    dataset.check_data(cfg.paths.data, cfg.paths.cache, verify_files=check_data)
    check_poisoned_count(attack, dataset, Path(cfg.paths.data))
    return Cell(cfg=cfg, choices=dict(choices), dataset=dataset, attack=attack, recipe=recipe, synthesis=synthesis,
                rule=rule, facts=facts, device=device, precision=recipe.precision if device.type == "cuda" else "fp32")


def check_poisoned_count(attack: Any, dataset: Any, root: Path) -> None:
    """An attack that poisons a share of the training set poisons at least one image: ``poison_rate=1e-9`` trained
    a clean model and recorded its ASR as an outcome."""
    from bdbench.attacks.base import StaticPoisonAttack
    from bdbench.data import _LABELS

    if not isinstance(attack, StaticPoisonAttack):
        return
    size = len(_LABELS[dataset._files_key(root)])
    size = min(size, dataset.subset.get("train") or size)
    if round(attack.poison_rate * size) == 0:
        raise ConfigError(f"attack.poison_rate={attack.poison_rate:g}: poisons 0 of {size} training images; valid: "
                          f"a rate >= {0.5 / size:.2g}")
