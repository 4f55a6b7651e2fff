"""Label-consistent backdoor (Turner, Tsipras and Madry, arXiv 1912.02771): target-class training images made hard
to classify by an adversarial perturbation, then stamped with a corner trigger, labels kept, so that the model
leans on the trigger to classify them (docs/attack_methods.md §9)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from bdbench.attacks.base import Attack, register_attack
from bdbench.attacks.clean_label import CleanLabelAttack
from bdbench.data import ImageSet
from bdbench.schema import Count, NonNegative, Positive, PositiveInt, Range, Rate

# BackdoorBench's "all-corners" trigger (utils/bd_img_transform/lc.py): a 3x3 pattern of +1 / -1 in each corner,
# this one in the two left corners and mirrored left to right in the two right ones.
CORNER = ((1, -1, -1), (-1, 1, -1), (1, -1, 1))


class CleanTraining(Attack):
    """The surrogate's training: the engine's hooks with nothing poisoned (here, not ``bdbench.attacks.none``, so that
    this module's code is all the code a poisoned model's key needs beyond the engine's)."""

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x


SURROGATE = ("model", "num_classes", "shape", "mean", "std")  # a model config and what the model is built for


@register_attack("lc")
class LabelConsistent(CleanLabelAttack):
    """Poisoning in two steps, because the perturbation needs a trained model: ``prepare`` draws the target-class
    images (``CleanLabelAttack``); ``before_training`` trains the surrogate (the cell's architecture and recipe, on the
    clean training set; or loads its weights from ``surrogate_checkpoint``), runs untargeted L-inf PGD from each
    drawn image against its true label (``steps`` steps of ``step``, radius ``eps``, on the 0..255 scale, no random
    start; the result truncated to uint8, as BackdoorBench's crafting script stores it) and stamps the trigger on
    the result, in the training set the classifier then trains on. At test time the trigger alone, on clean images.

    The trigger adds ``amplitude * 255`` times the corner pattern to every channel and clips (``amplitude = 1``:
    the pattern's pixels go to 0 and 255). At sizes other than 32x32 the 3x3 patterns stay 3x3 in the corners, where
    BackdoorBench resizes its 32x32 mask by nearest neighbour; the report names it.
    """

    source_files = ("surrogate_checkpoint",)  # files read into the poisoned model: their contents key it

    def __init__(self, *, target: Count, poison_rate: Rate, eps: NonNegative, step: Positive, steps: PositiveInt,
                 amplitude: Annotated[float, Range(gt=0, le=1)], surrogate: Any, surrogate_checkpoint: str | None,
                 checkpoint: str | None) -> None:
        super().__init__(target=target, poison_rate=poison_rate)
        if not isinstance(surrogate, (dict, DictConfig)) or set(surrogate) != set(SURROGATE) or \
                "_target_" not in surrogate["model"]:
            raise ValueError(f"attack.surrogate={surrogate!r}: invalid; valid: a mapping of {', '.join(SURROGATE)}, "
                             f"the first a model config (default: the cell's model and data set)")
        self.eps, self.step, self.steps, self.amplitude = eps, step, steps, amplitude
        self.surrogate, self.surrogate_checkpoint, self.checkpoint = surrogate, surrogate_checkpoint, checkpoint
        self.pattern: torch.Tensor | None = None
        self.shape: tuple[int, int, int] | None = None
        self.crafted: dict[str, Any] = {}

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        if shape[1] < 6 or shape[2] < 6:
            raise ValueError(f"attack=lc: images of {shape[1]}x{shape[2]} cannot hold its four 3x3 corner patterns; "
                             f"valid: images of at least 6x6")
        if self.surrogate_checkpoint and not Path(self.surrogate_checkpoint).is_file():
            raise ValueError(f"attack.surrogate_checkpoint={self.surrogate_checkpoint}: no such file; valid: a "
                             f"state_dict of attack.surrogate's architecture, or null to train one")

    def build(self, shape: tuple[int, int, int]) -> None:
        _, h, w = shape
        corner = torch.tensor(CORNER, dtype=torch.float32)
        pattern = torch.zeros(h, w)
        pattern[:3, :3] = pattern[-3:, :3] = corner
        pattern[:3, -3:] = pattern[-3:, -3:] = corner.flip(1)
        self.pattern = (255 * self.amplitude * pattern).reshape(1, 1, h, w)
        self.shape = shape

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            self.build(tuple(x.shape[1:]))
        return (x.float() + self.pattern.to(x.device)).clamp(0, 255).to(torch.uint8)

    def prepare(self, train: ImageSet, candidates: torch.Tensor, gen: torch.Generator) -> ImageSet:
        self.select(train, candidates, gen)
        return ImageSet(train.x.clone(), train.y.clone())  # poisoned in before_training, once the surrogate exists

    def before_training(self, train: ImageSet, augment, gen: torch.Generator, recipe) -> None:
        if not len(self.poison_indices):
            return
        device = train.x.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(gen.initial_seed())  # the surrogate's start and dropout: the same in a resumed run
            model = self.trained_surrogate(train, augment, gen, recipe)
            fooled = 0
            for chunk in self.poison_indices.to(device).split(512):
                adversarial = self.perturb(model, train.x[chunk], train.y[chunk])
                with torch.no_grad():
                    fooled += (model(adversarial.float().div(255)).argmax(1) != train.y[chunk]).sum().item()
                train.x[chunk] = self.apply_trigger(adversarial)
        self.crafted["fooled"] = fooled / len(self.poison_indices)  # the surrogate, on its own adversarial images

    def trained_surrogate(self, train: ImageSet, augment, gen: torch.Generator, recipe) -> torch.nn.Module:
        """The model the perturbation is made against: loaded, or trained on the clean training set (before any
        image is poisoned) with the cell's recipe."""
        from bdbench.train import train as fit  # the engine's loop, imported where it runs

        model = instantiate(self.surrogate["model"], **{k: self.surrogate[k] for k in SURROGATE[1:]})
        if self.surrogate_checkpoint:
            model.load_state_dict(torch.load(self.surrogate_checkpoint, map_location="cpu", weights_only=True))
            model.to(train.x.device)
            self.crafted["surrogate"] = "loaded"
        else:
            history = fit(model, train, CleanTraining(), recipe, augment, gen, desc="lc surrogate")
            self.crafted.update(surrogate="trained", surrogate_train_acc=history[-1]["acc"])
        return model.eval()

    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Untargeted L-inf PGD on uint8 images ``x`` with labels ``y`` -> uint8 images (truncated)."""
        clean = x.float().div(255)
        eps, step = self.eps / 255, self.step / 255
        adversarial = clean.clone()
        for _ in range(self.steps):
            adversarial.requires_grad_(True)
            loss = F.cross_entropy(model(adversarial), y)
            (grad,) = torch.autograd.grad(loss, adversarial)
            moved = adversarial.detach() + step * grad.sign()
            adversarial = (clean + (moved - clean).clamp(-eps, eps)).clamp(0, 1)
        return adversarial.mul(255).to(torch.uint8)

    def report(self):
        resized = self.shape is not None and self.shape[1:] != (32, 32)
        return {**super().report(), **self.crafted,
                **({"trigger_size": "3x3 corner patterns at their size, not resized from 32x32"} if resized else {})}
