"""Blended (Chen et al., arXiv 1712.05526): blend a fixed pattern into the image (docs/attack_methods.md §3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bdbench.attacks.base import LABEL_MODES, StaticPoisonAttack, register_attack
from bdbench.schema import Count, Range, Rate


@register_attack("blended")
class Blended(StaticPoisonAttack):
    """``x' = round(clip((1 - alpha) x + alpha K))`` with K uniform noise from ``seed_K`` at native size, or the
    image file ``image`` resized to the data set's size.

    Deviation (docs/attack_methods.md §3): BackdoorBench blends Hello Kitty; we do not ship it and use Chen et al.'s
    other pattern, i.i.d. uniform noise. Rows are "Blended (noise K)", not BackdoorBench's Blended; with ``image``
    set to BackdoorBench's file they are its trigger.
    """

    source_files = ("image",)  # files read into the poisoned model: their contents key it

    def __init__(self, *, target: Count, poison_rate: Rate, alpha: Annotated[float, Range(gt=0, le=1)],
                 alpha_test: Annotated[float, Range(gt=0, le=1)] | None, seed_K: Count, image: str | None,
                 label_mode: Literal[LABEL_MODES], checkpoint: str | None) -> None:
        super().__init__(target=target, poison_rate=poison_rate)
        self.label_mode = label_mode
        self.checkpoint, self.image = checkpoint, image
        self.alpha, self.seed_K = alpha, seed_K
        self.alpha_test = alpha if alpha_test is None else alpha_test
        self.pattern: torch.Tensor | None = None

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        if self.image is None:
            return
        if shape[0] not in (1, 3):
            raise ValueError(f"attack.image={self.image}: images of {shape[0]} channels; valid: 1 or 3 channels")
        try:
            with Image.open(self.image) as img:
                img.verify()
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"attack.image={self.image}: not an image file ({type(exc).__name__}); valid: a file "
                             f"PIL reads (PNG, JPEG, ...), or null for seeded noise") from None

    def build(self, shape: tuple[int, int, int]) -> None:
        c, h, w = shape
        if self.image is None:
            hwc = np.random.default_rng(self.seed_K).integers(0, 256, size=(h, w, c), dtype=np.uint8)
        else:  # BackdoorBench: Resize(img_size) of the PIL image, PIL's bilinear filter
            with Image.open(Path(self.image)) as img:
                resized = img.convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
            hwc = np.array(resized, dtype=np.uint8).reshape(h, w, c)
        self.pattern = torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0).contiguous()

    def _blend(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        if self.pattern is None:
            self.build(tuple(x.shape[1:]))
        k = self.pattern.to(x.device, torch.float32)
        return ((1 - alpha) * x.float() + alpha * k).round().clamp(0, 255).to(torch.uint8)

    def poison(self, x: torch.Tensor) -> torch.Tensor:
        return self._blend(x, self.alpha)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._blend(x, self.alpha_test)

    def state_dict(self):
        return {**super().state_dict(), "pattern": self.pattern}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.pattern = state["pattern"]

    def report(self):
        if self.image is None:
            return {**super().report(), "deviation": "noise pattern K (seed_K) instead of Hello Kitty"}
        return {**super().report(), "image": Path(self.image).name}
