"""BadNets (Gu et al., arXiv 1708.06733): a white square stamped in a corner (docs/attack_methods.md §2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bdbench.attacks.base import LABEL_MODES, StaticPoisonAttack, register_attack
from bdbench.schema import Count, Pixel, PositiveInt, Rate

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


@register_attack("badnets")
class BadNets(StaticPoisonAttack):
    """``x' = (1 - M) * x + M * P``: a patch P stamped at a fixed place, every pixel of it (black ones too).

    The default patch is BackdoorBench's: a ``size`` x ``size`` square of ``value`` flush with the bottom-right
    corner (on 28x28 images at rows/cols 25-27, our choice, docs/attack_methods.md §2.1). ``pattern`` gives any patch as a nested
    list of uint8 values, H x W (the same on every channel) or H x W x C (NAD's 3x3 grid trigger is one), or as an
    image file read at its own size (greyscale: H x W; colour: H x W x 3); ``position`` puts its top-left pixel at
    ``[row, col]`` instead of ``margin`` px from ``corner``.
    """

    source_files = ("pattern",)  # a pattern file is read into the poisoned model: its contents key it

    def __init__(self, *, target: Count, poison_rate: Rate, size: PositiveInt, margin: Count,
                 corner: Literal[CORNERS], value: Pixel, pattern: list | str | None, position: list[int] | None,
                 label_mode: Literal[LABEL_MODES], checkpoint: str | None) -> None:
        super().__init__(target=target, poison_rate=poison_rate)
        self.label_mode = label_mode
        self.checkpoint = checkpoint
        self.size, self.margin, self.corner, self.value = size, margin, corner, value
        self.pattern = None if pattern is None else self._pattern(pattern)
        if position is not None and (len(position) != 2 or any(int(p) != p or p < 0 for p in position)):
            raise ValueError(f"attack.position={list(position)}; valid: null or [row, col], two integers >= 0")
        self.position = None if position is None else [int(p) for p in position]
        self.mask: torch.Tensor | None = None
        self.stamp: torch.Tensor | None = None

    @staticmethod
    def _pattern(pattern: list | str) -> torch.Tensor:
        """[C or 1, h, w] uint8 from a nested list H x W or H x W x C of integers in 0..255, or from an image file."""
        if isinstance(pattern, str):
            try:
                with Image.open(Path(pattern)) as img:
                    pixels = np.array(img if img.mode == "L" else img.convert("RGB"), dtype=np.uint8)
            except (OSError, UnidentifiedImageError) as exc:
                raise ValueError(f"attack.pattern={pattern}: not an image file ({type(exc).__name__}); valid: a file "
                                 f"PIL reads, a nested list of 0..255, or null") from None
            values = torch.from_numpy(pixels)
            return values[None] if values.dim() == 2 else values.permute(2, 0, 1).contiguous()

        def plain(v):  # a ListConfig from Hydra, or a list
            return [plain(i) for i in v] if isinstance(v, Sequence) and not isinstance(v, str) else v

        try:
            values = torch.tensor(plain(pattern))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"attack.pattern: not a rectangular nested list ({exc}); valid: H x W or H x W x C "
                             f"integers in 0..255") from None
        if values.dim() not in (2, 3) or values.is_floating_point() or values.min() < 0 or values.max() > 255:
            raise ValueError(f"attack.pattern of shape {list(values.shape)}; valid: H x W or H x W x C integers in "
                             f"0..255")
        values = values.to(torch.uint8)
        return values[None] if values.dim() == 2 else values.permute(2, 0, 1).contiguous()

    def _patch(self, channels: int) -> torch.Tensor:
        if self.pattern is None:
            return torch.full((channels, self.size, self.size), self.value, dtype=torch.uint8)
        return self.pattern.expand(channels, -1, -1) if self.pattern.shape[0] == 1 else self.pattern

    def _top_left(self, h: int, w: int, ph: int, pw: int) -> tuple[int, int]:
        if self.position is not None:
            return self.position[0], self.position[1]
        top = h - self.margin - ph if self.corner.startswith("bottom") else self.margin
        left = w - self.margin - pw if self.corner.endswith("right") else self.margin
        return top, left

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        c, h, w = shape
        if self.pattern is not None and self.pattern.shape[0] not in (1, c):
            raise ValueError(f"attack.pattern has {self.pattern.shape[0]} channels, the images {c}; valid: H x W or "
                             f"H x W x {c}")
        _, ph, pw = self._patch(c).shape
        top, left = self._top_left(h, w, ph, pw)
        if top < 0 or left < 0 or top + ph > h or left + pw > w:
            where = f"attack.position={self.position}" if self.position is not None else f"attack.margin={self.margin}"
            what = f"attack.size={self.size}" if self.pattern is None else f"a {ph}x{pw} attack.pattern"
            valid = (f"size + margin <= {min(h, w)}" if self.pattern is None and self.position is None
                     else f"a patch inside the {h}x{w} image")
            raise ValueError(f"{what} with {where} does not fit {h}x{w} images; valid: {valid}")

    def build(self, shape: tuple[int, int, int]) -> None:
        c, h, w = shape
        patch = self._patch(c)
        _, ph, pw = patch.shape
        top, left = self._top_left(h, w, ph, pw)
        mask = torch.zeros(1, 1, h, w, dtype=torch.bool)
        stamp = torch.zeros(1, c, h, w, dtype=torch.uint8)
        mask[..., top : top + ph, left : left + pw] = True
        stamp[0, :, top : top + ph, left : left + pw] = patch
        self.mask, self.stamp = mask, stamp

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            self.build(tuple(x.shape[1:]))
        return torch.where(self.mask.to(x.device), self.stamp.to(x.device, x.dtype), x)

    def state_dict(self):
        return {**super().state_dict(), "mask": self.mask, "stamp": self.stamp}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        # a state saved before patterns existed holds the mask alone: the config fixes the trigger, rebuild it
        self.mask, self.stamp = (state["mask"], state["stamp"]) if "stamp" in state else (None, None)
