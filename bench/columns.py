"""The columns every view of a sweep shares (tables, figures, leaderboard): what fixes a setting, what names a row,
and how a budget is written and ordered. Its own module, so the views import it and not each other."""

from __future__ import annotations

import functools
from typing import Any, Iterable

import pandas as pd

SETTING = ["dataset", "model", "recipe", "experiment"]  # what a sweep holds fixed; the tables' captions
KEYS = [*SETTING, "attack", "defense"]
NAMED = ("dataset", "model", "attack", "defense")  # the keys with display names
ANY = "any"  # the budget of a data-free defense's cell: it gets no images at any k, so it runs once a model


@functools.cache
def data_free(target: str) -> bool:
    """Whether bdbench's defense class ``target`` declares it needs no images (``Defense.data_free``): its cell is
    the same at every budget (``ANY``). False for a class that cannot be imported here (a record of a plugin not
    installed) and for a plugin's, which is never imported outside a defense worker (its records say ``any``)."""
    from hydra.utils import get_class

    from bdbench.code_versions import current_name
    from bdbench.isolation import builtin

    target = current_name(target)  # a record written before the namespace
    if not builtin({"_target_": target}):
        return False
    try:
        return bool(getattr(get_class(target), "data_free", False))
    except Exception:
        return False


def named(frame: pd.DataFrame, names: dict) -> pd.DataFrame:
    """A copy with display names in the data set, model, attack and defense columns it has."""
    frame = frame.copy()
    for group in NAMED:
        if group in frame:
            frame[group] = [names.get((group, v), v) for v in frame[group]]
    return frame


def budget_key(budget: Any) -> int:
    """Budgets in reading order: the data-free "any" first, then clean images per class ascending."""
    return -1 if str(budget) == ANY else int(budget)


def budgets(values: Iterable[Any]) -> list[Any]:
    return sorted(set(values), key=budget_key)


def budget_label(budget: Any) -> str:
    """A table column's header: ``k=10``, or ``any k`` for the cells of data-free defenses."""
    return "any k" if str(budget) == ANY else f"k={budget}"


def setting_slug(setting: tuple) -> str:
    """A file-name part for one setting: data set, model, recipe and the experiment when there is one."""
    dataset, model, recipe, experiment = setting
    return "_".join([dataset, model, recipe] + ([experiment] if experiment not in ("-", None) else []))


def setting_title(shown: pd.DataFrame) -> str:
    """The setting a figure shows, as its title starts: data set / model, recipe, experiment."""
    first = shown.iloc[0]
    experiment = "" if first["experiment"] in ("-", None) else f", experiment {first['experiment']}"
    return f"{first['dataset']} / {first['model']} (recipe {first['recipe']}{experiment})"
