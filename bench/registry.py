"""A decorator registry with entry-point discovery (the timm pattern).

Built-in components register themselves when their package is imported; third-party packages
declare theirs in an entry-point group, so the engine never names a concrete attack or defense.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class, filled by ``@registry.register(name)`` and by the entry-point group."""

    def __init__(self, kind: str, group: str, builtins: str) -> None:
        self.kind = kind
        self.group = group
        self.builtins = builtins
        self._items: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                warnings.warn(f"{self.kind} '{name}' registered twice; the later one wins")
            self._items[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self.builtins)
        for ep in entry_points(group=self.group):
            if ep.name not in self._items:
                self.register(ep.name)(ep.load())

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> type[T]:
        self._load()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}")
        return self._items[name]

    def create(self, name: str, **values) -> T:
        """An instance with the values of its config (``conf/<kind>/<name>.yaml``, plugins' included), ``values``
        replacing some: defaults live in the configs only. A name without a config takes ``values`` alone."""
        from bdbench.validate import configured, options

        cls = self.get(name)
        if name in options(self.kind):
            return configured(self.kind, f"{self.kind}={name}", **values)
        return cls(**values)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items
