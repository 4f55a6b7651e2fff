"""Input-aware, defended from files (docs/attack_methods.md §5.5): the classifier from ``checkpoint`` and the pattern
and mask generators from ``generators``, in the layouts the official IAD code, BackdoorBench and this project save
them in. Nothing trains here.

A name of its own beside ``input_aware``: that module's code is part of every published Input-aware model's cache
key (docs/cache.md), and reading files has nothing to do with training one.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from bdbench.attacks.base import Attack, register_attack
from bdbench.attacks.input_aware import InputAware
from bdbench.checkpoints import non_finite, read_file
from bdbench.errors import ConfigError
from bdbench.schema import Count

# The official code's and BackdoorBench's module names, in the order their Generator adds them (``steps`` down
# stages of two conv blocks and a pool, a middle block, ``steps`` up stages of an upsampling and two conv blocks),
# mapped to the index of the same block in ``bdbench.attacks.input_aware.Generator``: pools and upsamplings hold no
# tensors.
BLOCK = re.compile(r"^convblock_(down|middle|up)_?(\d*)\.(conv2d|batch_norm)\.")


def official_key(key: str, steps: int) -> str:
    """A key of the official layout (``convblock_down_2.conv2d.weight``) as this project's Generator names it."""
    match = BLOCK.match(key)
    if not match:
        return key
    part, index, layer = match.group(1), int(match.group(2) or 0), match.group(3)
    block = {"down": index + index // 2, "middle": 3 * steps, "up": 3 * steps + 2 + index + index // 2}[part]
    return f"{block}.{0 if layer == 'conv2d' else 1}." + key[match.end():]


@register_attack("input_aware_file")
class InputAwareFile(InputAware):
    trigger_files = ("generators",)

    def __init__(self, *, target: Count, checkpoint: str, generators: str, generator_mean: list[float] | None,
                 generator_std: list[float] | None) -> None:
        Attack.__init__(self)  # none of InputAware's training settings: nothing trains here
        if (generator_mean is None) != (generator_std is None) or \
                (generator_std is not None and (len(generator_std) != len(generator_mean) or min(generator_std) <= 0)):
            raise ValueError(f"attack.generator_mean={generator_mean}, attack.generator_std={generator_std}: valid: "
                             f"both null (generators that read [0, 1] pixels) or two lists of one value per channel, "
                             f"every std > 0")
        self.target, self.checkpoint, self.generators = target, checkpoint, generators
        self.mean, self.std = generator_mean, generator_std
        self.pattern_gen = self.mask_gen = None
        self.shape, self.history = None, {}

    def check_shape(self, shape: tuple[int, int, int]) -> None:
        if self.mean is not None and len(self.mean) != shape[0]:
            raise ValueError(f"attack.generator_mean={self.mean}: {len(self.mean)} values for images of {shape[0]} "
                             f"channel(s); valid: one value per channel, or null with attack.generator_std=null")

    def build(self, shape: tuple[int, int, int]) -> None:
        """The networks for ``shape`` with the weights of ``generators``: ``netG`` and ``netM`` (the official
        code's ``*_ckpt.pth.tar``, BackdoorBench's ``netCGM.pt``) or ``pattern_generator`` and ``mask_generator``
        (this project's cached attack state)."""
        super().build(shape)
        obj = read_file(self.generators, "attack.generators")
        names = next((pair for pair in (("netG", "netM"), ("pattern_generator", "mask_generator"))
                      if isinstance(obj, dict) and all(isinstance(obj.get(k), dict) for k in pair)), None)
        if names is None:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ConfigError(f"attack.generators={self.generators}: holds {found}; valid: a torch.save file with "
                              f"netG and netM (the official code, BackdoorBench) or pattern_generator and "
                              f"mask_generator (bdbench)")
        steps = 2 if shape[-1] == 28 else 3
        for net, name in zip((self.pattern_gen, self.mask_gen), names):
            state = {official_key(k.removeprefix("module."), steps): v for k, v in obj[name].items()}
            own = net.state_dict()
            misfit = next((k for k in own if k not in state or state[k].shape != own[k].shape), None) or \
                next((k for k in state if k not in own), None)
            if misfit:
                raise ConfigError(f"attack.generators={self.generators}: {name} does not fit the generator for "
                                  f"{shape[1]}x{shape[2]} images with {shape[0]} channel(s) at key {misfit}; valid: "
                                  f"generators trained on images of this shape")
            broken = non_finite(state)
            if broken:
                raise ConfigError(f"attack.generators={self.generators}: {name}'s {broken} holds NaN or infinite "
                                  f"values; valid: finite weights")
            net.load_state_dict(state)
        self.pattern_gen.eval()
        self.mask_gen.eval().requires_grad_(False)

    def generator_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images as the generators were trained to read them: the reference codes feed them normalized images."""
        if self.mean is None:
            return x
        mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype)[:, None, None] for v in (self.mean, self.std))
        return (x - mean) / std

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return super().mask(self.generator_input(x))

    def stamp(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """x + (G(s) - x) * m(s) in pixels: the reference codes' trigger in normalized space, mapped back."""
        source = x if source is None else source
        return x + (self.pattern_gen(self.generator_input(source)) - x) * self.mask(source)

    def report(self):
        return {"asr_images": "uint8, rounded", "generators": str(Path(self.generators)),
                "generator_input": "pixels in [0, 1]" if self.mean is None else {"mean": self.mean, "std": self.std}}
