"""Where third-party attacks and defenses live: their entry points and the ``conf/`` folders they ship."""

from __future__ import annotations

from importlib.metadata import entry_points
from importlib.resources import files
from pathlib import Path

GROUPS = ("bdbench.attacks", "bdbench.defenses")


def plugin_packages() -> list[str]:
    """Top-level packages that register an attack or defense through an entry point (bdbench itself
    registers through decorators, not entry points)."""
    names = {ep.value.split(":")[0].split(".")[0] for group in GROUPS for ep in entry_points(group=group)}
    return sorted(names - {"attacks", "defenses", "bench"})


def plugin_conf_dirs() -> list[tuple[str, Path]]:
    """(package, its conf/ folder) for every plugin package that ships one."""
    out = []
    for package in plugin_packages():
        try:
            folder = Path(str(files(package) / "conf"))
        except (ModuleNotFoundError, TypeError):
            continue
        if folder.is_dir():
            out.append((package, folder))
    return out
