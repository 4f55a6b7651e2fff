"""The Attack interface: an attack owns its trigger and everything secret about it.

The trainer calls, in order: ``prepare`` once (static attacks poison a fixed seeded index set of
the uint8 training set there), ``before_training`` once (an attack that trains networks of its own
fits them there), then per batch ``train_batch`` (dynamic attacks poison there, before or after the
augmentation they are handed), ``batch_loss`` (added to the cross-entropy) and ``after_step``, and
``after_epoch`` per epoch. The evaluator calls ``apply_trigger`` on uint8 test images and adds
``extra_metrics`` to the undefended model's metrics. ``state_dict`` holds the trigger artifacts
saved beside the poisoned model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from bdbench.data import ImageSet
from bdbench.schema import Count, Rate
from bdbench.registry import Registry

LABEL_MODES = ("all_to_one", "all_to_all")

ATTACKS: Registry["Attack"] = Registry("attack", group="bdbench.attacks", builtins="bdbench.attacks")
register_attack = ATTACKS.register


def create_attack(name: str, **kwargs) -> "Attack":
    return ATTACKS.create(name, **kwargs)


def list_attacks() -> list[str]:
    return ATTACKS.names()


Augmenter = Callable[[torch.Tensor], torch.Tensor]


class Attack(ABC):
    """Base class. ``target`` is None for clean training; ASR and RA are then undefined."""

    name: str = "attack"
    target: int | None = None
    poison_rate: float = 0.0
    label_mode: str = "all_to_one"  # or "all_to_all" (StaticPoisonAttack's): y -> (y + 1) mod C
    checkpoint: str | None = None  # a poisoned model trained elsewhere, for attacks whose trigger the config fixes
    trigger_files: tuple[str, ...] = ()  # keys naming files a defended checkpoint's trigger is read from

    def __init__(self) -> None:
        self.poison_indices = torch.empty(0, dtype=torch.long)

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        """Raise ValueError (naming the key and its valid values) if the configured trigger cannot work on images
        of ``shape`` (C, H, W): called on the data set's shape before any compute."""

    def prepare(self, train: ImageSet, candidates: torch.Tensor, gen: torch.Generator) -> ImageSet:
        """The training set to train on; ``candidates`` are the indices the attack may poison."""
        return train

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, augment: Augmenter) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch (float images in [0, 1]) -> the batch the model trains on."""
        return augment(x), y

    def before_training(self, train: ImageSet, augment: Augmenter, gen: torch.Generator, recipe) -> None:
        """Fit the attack's own networks before the classifier trains (Input-aware's mask generator)."""

    def batch_loss(self) -> torch.Tensor | float:
        """An extra loss term for the current batch, added to the classifier's cross-entropy."""
        return 0.0

    def after_step(self) -> None:
        """Step the attack's own optimizers after the classifier's step."""

    def after_epoch(self) -> None:
        """Step the attack's own schedulers."""

    @abstractmethod
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger on uint8 images [N, C, H, W] -> uint8 images."""

    def backdoor_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The label the backdoor gives a triggered image of true label ``y``: the target (all-to-one)."""
        return torch.full_like(y, self.target)

    def extra_metrics(self, model, test: ImageSet, batch_size: int = 1024, precision: str = "fp32") -> dict[str, float]:
        """Attack-specific metrics of the undefended model (WaNet's noise accuracy, ...)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"poison_indices": self.poison_indices.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.poison_indices = state["poison_indices"]

    def training_state(self) -> dict[str, Any]:
        """What a resumed training run needs beyond ``before_training`` (the attack's optimizers, generators,
        batch order): the state after an epoch, so that training continues exactly."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore ``training_state()`` after ``before_training`` has run again."""

    def to(self, device: torch.device | str) -> "Attack":
        """Move trigger tensors to ``device``."""
        return self

    def report(self) -> dict[str, Any]:
        """What the record says about the attack beyond its config (e.g. deviations from a paper)."""
        return {"poisoned": int(self.poison_indices.numel())}


class StaticPoisonAttack(Attack):
    """An attack that poisons a fixed seeded index set once, before augmentation.

    BackdoorBench's rule (docs/attack_methods.md §1.5): ``round(poison_rate * N)`` indices, drawn over every
    class (target class included), triggered on uint8 and relabelled to the target; all-to-all (``label_mode``, set
    by an attack that offers it) relabels each to the next class, ``(y + 1) mod C``, with C the training set's classes,
    and ignores the target, as BackdoorBench's all2all.
    """

    num_classes: int | None = None  # all-to-all's C, from the training labels

    def backdoor_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.label_mode == "all_to_all":
            return (y + 1) % self.num_classes
        return super().backdoor_labels(y)

    def __init__(self, *, target: Count, poison_rate: Rate) -> None:
        super().__init__()
        self.target = target
        self.poison_rate = poison_rate

    def prepare(self, train: ImageSet, candidates: torch.Tensor, gen: torch.Generator) -> ImageSet:
        n = round(self.poison_rate * len(train))
        order = torch.randperm(len(candidates), generator=gen).to(candidates.device)
        self.poison_indices = candidates[order[:n]].sort().values
        self.build(tuple(train.x.shape[1:]))
        if self.label_mode == "all_to_all":
            self.num_classes = int(train.y.max()) + 1
        x, y = train.x.clone(), train.y.clone()
        x[self.poison_indices] = self.poison(x[self.poison_indices])
        y[self.poison_indices] = self.backdoor_labels(y[self.poison_indices])
        return ImageSet(x, y)

    def state_dict(self):
        state = super().state_dict()
        return {**state, "num_classes": self.num_classes} if self.label_mode == "all_to_all" else state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.num_classes = state.get("num_classes")

    def poison(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger as stamped on training images (uint8); the test trigger unless overridden."""
        return self.apply_trigger(x)

    @abstractmethod
    def build(self, shape: tuple[int, int, int]) -> None:
        """Make the trigger for images of ``shape`` (C, H, W)."""
