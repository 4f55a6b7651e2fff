"""WaNet (Nguyen & Tran, ICLR 2021, arXiv 2102.10369): a fixed, smooth, sub-pixel warp (docs/attack_methods.md §4).

Per batch: the first floor(rho_a * B) images are warped by the fixed field and relabelled to the
target; the next floor(n_a * cross_ratio) get the field plus per-sample random noise and keep their
labels (the "noise" or "cross" mode, which teaches that other warps of this size are not the
trigger); then the whole batch gets WaNet's own per-sample augmentation (crop, rotation, flip).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from bdbench.attacks.base import Attack, register_attack
from bdbench.errors import ConfigError
from bdbench.augment import random_crop, random_hflip
from bdbench.data import ImageSet
from bdbench.metrics import backdoor_test_set, predict
from bdbench.schema import Count, Fraction, NonNegative, Positive, Range, Rate


def random_rotation(x: torch.Tensor, degrees: float, gen: torch.Generator) -> torch.Tensor:
    """Rotate every image by its own angle in [-degrees, degrees] (bilinear, zero fill)."""
    theta = (torch.rand(x.shape[0], generator=gen, device=gen.device).to(x.device) * 2 - 1) * math.radians(degrees)
    cos, sin = theta.cos(), theta.sin()
    zeros = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@register_attack("wanet")
class WaNet(Attack):
    trigger_files = ("field",)

    def __init__(self, *, target: Count, poison_rate: Rate, k: Annotated[int, Range(ge=2)], s: Positive,
                 grid_rescale: Positive, cross_ratio: NonNegative, crop_padding: Count, crop_p: Fraction,
                 rotation: Annotated[float, Range(ge=0, le=180)], rotation_p: Fraction, hflip: bool,
                 quantize: bool, checkpoint: str | None, field: str | None) -> None:
        super().__init__()
        if checkpoint and not field:
            raise ValueError(f"attack.checkpoint={checkpoint} with attack.field=null: a WaNet model is defended with "
                             f"its warp; valid: attack.field=FILE holding identity_grid and noise_grid (the official "
                             f"code and BackdoorBench save both in their checkpoint: FILE may be the checkpoint)")
        self.checkpoint, self.field = checkpoint, field
        self.target, self.poison_rate = target, poison_rate
        self.k, self.s, self.grid_rescale, self.cross_ratio = k, s, grid_rescale, cross_ratio
        self.crop_padding, self.crop_p, self.rotation, self.rotation_p, self.hflip = (
            crop_padding, crop_p, rotation, rotation_p, hflip)
        self.quantize = quantize
        self.grid: torch.Tensor | None = None  # [1, H, W, 2], the trigger
        self.gen: torch.Generator | None = None

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        if self.k > min(shape[1:]):
            raise ValueError(f"attack.k={self.k}: more control points than the {shape[1]}x{shape[2]} image has "
                             f"pixels per side; valid: 2..{min(shape[1:])}")

    # -- the field --------------------------------------------------------------------------------
    def make_grid(self, size: int, gen: torch.Generator) -> torch.Tensor:
        """Control points U[-1, 1]^(2 x k x k), normalised by their mean |value|, upsampled bicubically,
        added to the identity grid at strength s / H and clamped to the image (docs/attack_methods.md §4.1)."""
        points = torch.rand(1, 2, self.k, self.k, generator=gen, device=gen.device).cpu() * 2 - 1
        points = points / points.abs().mean()
        field = F.interpolate(points, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        a = torch.linspace(-1, 1, size)
        rows, cols = torch.meshgrid(a, a, indexing="ij")
        identity = torch.stack((cols, rows), dim=2)[None]  # (x = column, y = row), grid_sample's order
        return self.combine(identity, field, size)

    def combine(self, identity: torch.Tensor, noise: torch.Tensor, size: int) -> torch.Tensor:
        """The warp grid from the identity grid and the upsampled field, at strength s / H (docs/attack_methods.md §4.1)."""
        return ((identity + self.s * noise / size) * self.grid_rescale).clamp(-1, 1)

    def load_field(self, size: int) -> torch.Tensor:
        """The warp of ``self.field``: its ``identity_grid`` and ``noise_grid`` (the official WaNet and BackdoorBench
        checkpoints, 1 x H x W x 2 each) combined with this config's s and grid_rescale, as in those codes."""
        path = Path(self.field)
        if not path.is_file():
            raise ConfigError(f"attack.field={path}: no such file; valid: a torch.save file holding identity_grid and "
                              f"noise_grid")
        obj = torch.load(path, map_location="cpu", weights_only=True)
        grids = [obj.get(k) if isinstance(obj, dict) else None for k in ("identity_grid", "noise_grid")]
        if not all(torch.is_tensor(g) and tuple(g.shape) == (1, size, size, 2) for g in grids):
            found = {k: tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
                     for k, v in (obj.items() if isinstance(obj, dict) else [])}
            raise ConfigError(f"attack.field={path}: holds {found or type(obj).__name__}; valid: identity_grid and "
                              f"noise_grid, each of shape (1, {size}, {size}, 2)")
        identity, noise = (g.float() for g in grids)
        return self.combine(identity, noise, size)

    def build(self, shape: tuple[int, int, int]) -> None:
        """A defended checkpoint's trigger: the warp of its field file."""
        self.grid = self.load_field(shape[-1])

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def noise_grid(self, n: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
        size = self.grid.shape[1]
        noise = torch.rand(n, size, size, 2, generator=gen, device=gen.device).to(device) * 2 - 1
        return (self.grid.to(device) + noise / size).clamp(-1, 1)

    # -- training ---------------------------------------------------------------------------------
    def prepare(self, train: ImageSet, candidates: torch.Tensor, gen: torch.Generator) -> ImageSet:
        self.grid = self.make_grid(train.x.shape[-1], gen)  # drawn even from a field file: the same seeds follow
        if self.field:
            self.grid = self.load_field(train.x.shape[-1])
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
        self.gen = torch.Generator(device=train.x.device).manual_seed(seed)
        return train

    def counts(self, batch: int) -> tuple[int, int]:
        """(backdoor, noise) sample counts of a batch: floor(rho_a B) and floor(n_a cross_ratio); below
        one backdoor sample per batch, one with probability rho_a B (BackdoorBench's low-rate rule)."""
        expected = self.poison_rate * batch
        n_a = math.floor(expected)
        if n_a == 0 and torch.rand((), generator=self.gen, device=self.gen.device) < expected:
            n_a = 1
        return n_a, math.floor(n_a * self.cross_ratio)

    def train_batch(self, x, y, augment):
        n_a, n_n = self.counts(x.shape[0])
        x, y = x.clone(), y.clone()
        x[:n_a] = self.warp(x[:n_a], self.grid)
        y[:n_a] = self.target
        x[n_a : n_a + n_n] = F.grid_sample(x[n_a : n_a + n_n], self.noise_grid(n_n, x.device, self.gen),
                                           mode="bilinear", padding_mode="zeros", align_corners=True)
        if self.quantize:  # the warped samples on uint8 levels, as the test images ASR is measured on
            x[: n_a + n_n] = x[: n_a + n_n].mul(255).round_().div_(255)
        return self.post_augment(x), y

    def post_augment(self, x: torch.Tensor) -> torch.Tensor:
        """WaNet's PostTensorTransform, per sample: crop (p 0.8), rotation (p 0.5), flip where allowed."""
        gen = self.gen
        pick = lambda p: (torch.rand(x.shape[0], generator=gen, device=gen.device) < p).to(x.device)[:, None, None, None]
        x = torch.where(pick(self.crop_p), random_crop(x, self.crop_padding, gen), x)
        x = torch.where(pick(self.rotation_p), random_rotation(x, self.rotation, gen), x)
        return random_hflip(x, gen) if self.hflip else x

    def training_state(self):
        return {"gen": self.gen.get_state()}  # its own generator: which samples get the trigger and the noise

    def load_training_state(self, state):
        self.gen.set_state(state["gen"])

    # -- test time --------------------------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Warp uint8 images and quantize back to uint8 by rounding (ASR is measured on these)."""
        return self.warp(x.float(), self.grid).round().clamp(0, 255).to(torch.uint8)

    def extra_metrics(self, model, test: ImageSet, batch_size: int = 1024, precision: str = "fp32") -> dict:
        """Noise accuracy: all test images under a fresh random noise warp each, scored on true labels. And the
        ASR on the warped images before rounding (``asr_float``, the official code's measurement): a model can
        learn the warp's sub-quantization interpolation pattern instead of the warp, which rounding erases (the
        grid's WRN-16-1 model: 93.3 % on floats, 12.4 % on uint8, 3,000 test images)."""
        gen = torch.Generator(device=test.x.device).manual_seed(0)

        def noisy(xb: torch.Tensor) -> torch.Tensor:
            warped = F.grid_sample(xb.float(), self.noise_grid(xb.shape[0], xb.device, gen), mode="bilinear",
                                   padding_mode="zeros", align_corners=True)
            return warped.round().clamp(0, 255).to(torch.uint8)

        pred = predict(model, test.x, transform=noisy, batch_size=batch_size, precision=precision)
        bd = backdoor_test_set(test, self.target)
        warped = predict(model, bd.x, transform=lambda xb: self.warp(xb.float(), self.grid), batch_size=batch_size,
                         precision=precision)
        return {"noise_acc": (pred == test.y).float().mean().item(),
                "asr_float": (warped == self.target).float().mean().item()}

    def state_dict(self):
        return {**super().state_dict(), "grid": self.grid}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.grid = state["grid"]

    def report(self):
        return {"asr_images": "uint8, rounded", "augmentation": "per sample, after poisoning (official WaNet)"}
