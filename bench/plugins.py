"""Where third-party attacks, defenses and models live: their entry points and the ``conf/`` folders they ship."""

from __future__ import annotations

from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

GROUPS = ("bdbench.attacks", "bdbench.defenses", "bdbench.models")


def plugin_packages() -> list[str]:
    """Top-level packages that register an attack, defense or model through an entry point (bdbench itself
    registers through decorators, not entry points)."""
    names = {ep.value.split(":")[0].split(".")[0] for group in GROUPS for ep in entry_points(group=group)}
    return sorted(names - {"attacks", "defenses", "bench"})


def plugin_conf_dirs() -> list[tuple[str, Path]]:
    """(package, its conf/ folder) for every plugin package that ships one, found without importing the package
    (``importlib.resources.files`` would run its ``__init__`` in this process)."""
    out = []
    for package in plugin_packages():
        try:
            spec = find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            folder = Path(location) / "conf"
            if folder.is_dir():
                out.append((package, folder))
                break
    return out
