"""The Defense interface: what a real defender has, and nothing more.

A defense gets the suspect model, ``k`` clean labelled images per class (``CleanData``, possibly
empty or synthetic) and a ``DefenseContext``: number of classes, input shape, device, seed, precision
and a progress reporter. It never sees the test set, the trigger, the target label or the poisoned
indices: the runner holds those and a test checks that none of them reaches ``apply``.
"""

from __future__ import annotations

import copy
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from bdbench.registry import Registry
from bdbench.seeding import generator

DEFENSES: Registry["Defense"] = Registry("defense", group="bdbench.defenses", builtins="bdbench.defenses")
register_defense = DEFENSES.register


def create_defense(name: str, **kwargs) -> "Defense":
    return DEFENSES.create(name, **kwargs)


def list_defenses() -> list[str]:
    return DEFENSES.names()


PROGRESS_EVERY = 60.0  # seconds between progress lines when stderr is not a terminal (a sweep's log file)


def tqdm_progress(iterable: Iterable, desc: str = "", total: int | None = None) -> Iterable:
    """A bar on a terminal; in a log file, a line every ``PROGRESS_EVERY`` seconds (a ShapPruning cell ran 11
    minutes without one), so a long defense phase is never silent."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, leave=False)
    return log_progress(iterable, desc, total)


def log_progress(iterable: Iterable, desc: str, total: int | None, every: float | None = None) -> Iterator:
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    start = last = time.perf_counter()
    for i, item in enumerate(iterable):
        now = time.perf_counter()
        if i and now - last >= (PROGRESS_EVERY if every is None else every):
            eta = f", ETA {(now - start) / i * (total - i):.0f} s at most" if total else ""
            print(f"[progress] {desc}: {i}/{total if total else '?'} after {now - start:.0f} s{eta}", file=sys.stderr,
                  flush=True)
            last = now
        yield item


@dataclass(frozen=True)
class CleanData:
    """The defender's images as floats in [0, 1], [n, C, H, W], with labels; ``source`` says where from."""

    x: torch.Tensor
    y: torch.Tensor
    source: str  # "real", "synthetic", or "none" (k = 0 and a data-free defense)

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass(frozen=True)
class DefenseContext:
    num_classes: int
    input_shape: tuple[int, int, int]
    device: torch.device
    seed: int
    precision: str = "fp32"
    progress: Callable[..., Iterable] = field(default=tqdm_progress, compare=False)
    # Results of shared steps (``register_shared``) by the defense config's key, when the runner already has them:
    # computed once per poisoned model and clean images from what the defender holds, never a secret.
    shared: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def reversal(self) -> Any:
        """The shared trigger reversal (NC, ℓ∞ pruning and ShapPruning reverse once per model and budget)."""
        return self.shared.get("reversal")

    def generator(self, purpose: str) -> torch.Generator:
        return generator(self.seed, f"defense:{purpose}", self.device)


@dataclass(frozen=True)
class SharedStep:
    """A component several defenses run identically, ``step(model, clean, augment, ctx) -> result``: the runner
    runs it once per (poisoned model, clean images, its config), keeps ``result`` (a dataclass; tensors and plain
    fields) in the verified cache folder ``kind`` and hands it to every defense whose config holds the same step,
    as ``ctx.shared[<config key>]``. The engine knows steps only through this registry."""

    kind: str
    result: type


SHARED_STEPS: dict[type, SharedStep] = {}


def register_shared(step: type, kind: str, result: type) -> None:
    SHARED_STEPS[step] = SharedStep(kind, result)


def shared_step(cls: type) -> SharedStep | None:
    """How components of class ``cls`` are shared, or None for a component each defense runs itself."""
    return SHARED_STEPS.get(cls)


class Defense(ABC):
    """Base class: ``apply`` copies the model, times ``repair`` on the copy and keeps its report, so a defense
    never modifies the model it was given and every record carries the defense's own seconds."""

    name: str = "defense"
    data_free: ClassVar[bool] = False  # True: needs no images, so budget 0 gets no synthetic set

    def apply(self, model: nn.Module, clean: CleanData, ctx: DefenseContext) -> nn.Module:
        """The repaired model, same interface (pruned channels are zeroed or masked, not removed)."""
        start = time.perf_counter()
        model = copy.deepcopy(model).eval()
        report = self.repair(model, clean, ctx)
        self._last_report = {**report, "seconds": time.perf_counter() - start}
        return model

    def needs(self) -> dict[str, int]:
        """What it needs a model to declare, checked before any compute (docs/models.md): ``groups``, at least that
        many feature groups; ``conv_bn_pairs``, at least that many conv-BatchNorm pairs; ``batchnorms``, at least
        that many affine BatchNorm layers. Nothing by default: any conv net will do."""
        return {}

    @abstractmethod
    def repair(self, model: nn.Module, clean: CleanData, ctx: DefenseContext) -> dict[str, Any]:
        """Repair ``model`` (the defense's own copy, in eval mode) in place; what it did, for the record."""

    def report(self) -> dict[str, Any]:
        """What the last ``apply`` did (channels pruned, steps, detected target, ...), stored in the record."""
        return getattr(self, "_last_report", {})
