"""Poisoned models trained elsewhere: read a checkpoint file into a registered model.

Accepted files: a ``state_dict``, or a dict holding one under ``state_dict``, ``model`` (BackdoorBench's
``attack_result.pt``) or ``netC`` (the ``state_dict.pt`` of the official WaNet code and of BackdoorBench's wanet), with or without DataParallel's ``module.`` prefix. Key layouts: the
registered models' own, the WideResNet of the public NAD / ARGD code (``block1.layer.0.conv1.weight``,
``convShortcut``, a final ``bn1``) and BackdoorBench's PreActResNet18 (``shortcut.0``). The file is read with
``weights_only=True``: a checkpoint is data, never code. A file whose keys or shapes fit no layout is one
error that names the first key that does not fit.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import nn

from bdbench.errors import ConfigError
from bdbench.fsutil import sha256_file

# name -> [(pattern, replacement)], applied in order to every key of the file
LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "bdbench": [],
    "nad-wideresnet": [(r"^(block\d)\.layer\.(\d+)\.", r"\1.\2."), (r"\.convShortcut\.", ".shortcut."),
                       (r"^bn1\.", "bn.")],
    "backdoorbench-preactresnet": [(r"\.shortcut\.0\.", ".shortcut.")],
}
OWN = ("mean", "std")  # the model's normalization buffers come from its config, never from a file


def read_file(path: str | Path, key: str) -> object:
    """A checkpoint file's contents, tensors and plain data only (``weights_only=True``). ``argparse.Namespace`` is
    let through: the official IAD code and BackdoorBench save their run's arguments in one (``opt``, ``args``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file; valid: a torch.save file of state_dicts")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a text file, a truncated zip, a foreign pickle: each one line, never a traceback
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{key}={path}: not readable as tensors only ({first}); save the state_dicts alone: "
                          f"torch.save(torch.load(F, weights_only=False)['model'], 'model.pt')") from None


def non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The first key whose tensor holds NaN or infinite values, or None."""
    return next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from ``state_dict`` / ``model`` / ``netC`` and DataParallel's
    prefix."""
    obj = read_file(path, "attack.checkpoint")
    for key in ("state_dict", "model", "netC"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(f"attack.checkpoint={path}: holds no state_dict (a dict of tensors, or one under "
                          f"'state_dict', 'model' or 'netC')")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    broken = non_finite(state)
    if broken:  # a model with NaN weights evaluated to an 'ok' record
        raise ConfigError(f"attack.checkpoint={path}: {broken} holds NaN or infinite values; valid: finite weights")
    return {k: v for k, v in state.items() if k not in OWN}  # normalization is the model config's, not the file's


def rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def fit(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, str | None]:
    """(how many of the model's keys the file has with the right shape, the first key in the model's order that
    the file lacks or shapes differently, or else the first key of the file the model does not have; None when
    every key fits)."""
    own = {k: v for k, v in model.state_dict().items() if k not in OWN}
    good = [k for k, v in own.items() if k in state and tuple(state[k].shape) == tuple(v.shape)]
    for key, value in own.items():
        if key not in state:
            return len(good), f"{key} missing from the file"
        if tuple(state[key].shape) != tuple(value.shape):
            return len(good), f"{key} has shape {tuple(state[key].shape)} in the file, {tuple(value.shape)} in the model"
    extra = [k for k in state if k not in own]
    return len(good), (f"{extra[0]} is in the file, not in the model" if extra else None)


def fitting(model: nn.Module, path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The layout whose renamed keys and shapes fit ``model``, and the file's state renamed by it; else one
    ConfigError naming the first misfit of the closest layout. Reads shapes only, so a model on the meta device
    (validation's) is checked as well as one with weights."""
    state = read_state_dict(path)
    tried = []
    for layout, rules in LAYOUTS.items():
        mapped = rename(state, rules)
        good, misfit = fit(model, mapped)
        if misfit is None:
            return layout, mapped
        tried.append((good, layout, misfit))
    good, layout, misfit = max(tried, key=lambda t: t[0])  # the layout that came closest names the misfit
    raise ConfigError(f"attack.checkpoint={path}: does not fit {type(model).__name__} (closest: the {layout} layout, "
                      f"{good} keys fit): {misfit}; valid: a state_dict of this model in the layout of "
                      f"{', '.join(LAYOUTS)}")


def load_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load ``path`` into ``model`` in place; which layout fitted and the file's sha256 (its cache key)."""
    layout, mapped = fitting(model, path)
    own = {k: v for k, v in model.state_dict().items() if k in OWN}
    model.load_state_dict({**own, **mapped})
    return {"source": "checkpoint", "path": str(path), "sha256": sha256_file(Path(path)), "layout": layout}
