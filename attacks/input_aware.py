"""Input-aware dynamic backdoor (IAD; Nguyen & Tran, NeurIPS 2020, arXiv 2010.08138; docs/attack_methods.md §5).

The trigger depends on the image: a mask generator M and a pattern generator G (encoder-decoders)
make it per input, x_bd = x + (G(x) - x) * m(x). Training has two phases, run through the trainer's
hooks: ``before_training`` fits M alone (mask density and diversity losses), then ``train_batch`` /
``batch_loss`` / ``after_step`` train the classifier jointly with G on backdoor samples (label t),
cross-trigger samples (another image's trigger, true label) and G's diversity loss.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.attacks.base import Attack, register_attack
from bdbench.data import ImageSet
from bdbench.metrics import predict
from bdbench.schema import Count, Fraction, NonNegative, Positive, PositiveInt, Rate
from bdbench.train import BatchStream

EPS = 1e-7
log = logging.getLogger(__name__)


def conv_block(c_in: int, c_out: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.05)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Generator(nn.Sequential):
    """IAD's encoder-decoder without skips; output squashed into (0, 1).

    ``channel_init=32, steps=3`` for 32x32 (CIFAR-10, GTSRB), ``16, 2`` for 28x28 (MNIST), per docs/attack_methods.md §5.1.
    """

    def __init__(self, c_in: int, c_out: int, channel_init: int, steps: int) -> None:
        layers, c, prev = [], channel_init, c_in
        for step in range(steps):
            layers += [conv_block(prev, c), conv_block(c, c), nn.MaxPool2d(2)]
            prev = c
            c = c * 2 if step < steps - 1 else c
        layers.append(conv_block(c, c))  # middle
        for step in range(steps):
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), conv_block(c, c)]
            if step < steps - 1:
                layers.append(conv_block(c, c // 2))
                c //= 2
            else:
                layers.append(conv_block(c, c_out, relu=False))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x)) / (2 + EPS) + 0.5


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample sqrt(mean over C, H, W of (a - b)^2).

    Clamped at 1e-12 before the root: the reference code's bare sqrt has an infinite gradient when G
    maps two inputs to the same pattern, which turned Fashion-MNIST training into NaN at epoch 5.
    """
    return (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12).sqrt()


@register_attack("input_aware")
class InputAware(Attack):
    def __init__(self, *, target: Count, poison_rate: Rate, cross_rate: Rate, mask_epochs: Count,
                 mask_density: Fraction, lambda_div: NonNegative, lambda_norm: NonNegative, lr_G: Positive,
                 lr_M: Positive, milestones_G: list[int], milestones_M: list[int], accumulate_G_grads: bool,
                 mask_steps_per_epoch: PositiveInt | None, lr_schedule_G: Literal["multistep", "cosine"]) -> None:
        super().__init__()
        self.target, self.poison_rate, self.cross_rate = target, poison_rate, cross_rate
        self.mask_epochs, self.mask_density = mask_epochs, mask_density
        self.lambda_div, self.lambda_norm = lambda_div, lambda_norm
        self.lr_G, self.lr_M = lr_G, lr_M
        self.milestones_G, self.milestones_M = list(milestones_G), list(milestones_M)
        self.accumulate_G_grads = accumulate_G_grads
        self.mask_steps_per_epoch = mask_steps_per_epoch
        self.lr_schedule_G = lr_schedule_G
        self.pattern_gen: Generator | None = None
        self.mask_gen: Generator | None = None
        self.shape: tuple[int, int, int] | None = None
        self.history: dict = {}
        self._div = torch.zeros(())

    # -- networks ---------------------------------------------------------------------------------
    def build(self, shape: tuple[int, int, int]) -> None:
        c = shape[0]
        channel_init, steps = (16, 2) if shape[-1] == 28 else (32, 3)
        self.shape = tuple(shape)
        self.pattern_gen = Generator(c, c, channel_init, steps)
        self.mask_gen = Generator(c, 1, channel_init, steps)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """An almost binary mask: a steep tanh step at 0.5 of M's output."""
        return torch.tanh(20 * self.mask_gen(x) - 10) / (2 + EPS) + 0.5

    def stamp(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """x + (G(s) - x) * m(s) with s = source (x itself for backdoor samples, another image for cross)."""
        source = x if source is None else source
        return x + (self.pattern_gen(source) - x) * self.mask(source)

    # -- phase 1: the mask generator --------------------------------------------------------------
    def before_training(self, train: ImageSet, augment, gen: torch.Generator, recipe) -> None:
        self.build(tuple(train.x.shape[1:]))
        device = train.x.device
        self.pattern_gen.to(device)
        self.mask_gen.to(device)
        self._train, self._batch = train, recipe.batch_size
        self._stream = BatchStream(len(train), gen, device)  # the reference code's second shuffled loader
        optimizer = torch.optim.Adam(self.mask_gen.parameters(), lr=self.lr_M, betas=(0.5, 0.9))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.milestones_M, 0.1)
        steps = len(train) // self._batch
        if self.mask_steps_per_epoch:
            steps = min(steps, self.mask_steps_per_epoch)
        self.mask_gen.train()
        self.history["mask"] = []
        for epoch in range(self.mask_epochs):
            start = time.perf_counter()
            totals = torch.zeros(2, device=device)
            for _ in range(steps):
                x1, x2 = self._draw(augment), self._draw(augment)
                m1, m2 = self.mask(x1), self.mask(x2)
                loss_norm = F.relu(m1 - self.mask_density).mean()
                loss_div = (rms_distance(x1, x2) / (rms_distance(m1, m2) + EPS)).mean()
                loss = self.lambda_norm * loss_norm + self.lambda_div * loss_div
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals += torch.stack([loss_norm.detach(), loss_div.detach()])
            scheduler.step()
            density = self._mask_density(train)
            row = {"epoch": epoch + 1, "norm": (totals[0] / steps).item(), "div": (totals[1] / steps).item(),
                   "density": density, "seconds": time.perf_counter() - start}
            self.history["mask"].append(row)
            log.info("mask generator epoch %d/%d  norm %.4f  div %.3f  density %.3f  (%.1f s)", epoch + 1,
                     self.mask_epochs, row["norm"], row["div"], density, row["seconds"])
        self.mask_gen.eval().requires_grad_(False)
        self._optimizer = torch.optim.Adam(self.pattern_gen.parameters(), lr=self.lr_G, betas=(0.5, 0.9))
        if self.lr_schedule_G == "cosine":  # G anneals with the classifier's cosine recipe
            self._scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self._optimizer, T_max=recipe.epochs)
        else:
            self._scheduler = torch.optim.lr_scheduler.MultiStepLR(self._optimizer, self.milestones_G, 0.1)

    @torch.no_grad()
    def _mask_density(self, data: ImageSet) -> float:
        """Mean mask value over the first 1,024 images of ``data``, with M in eval mode."""
        was = self.mask_gen.training
        self.mask_gen.eval()
        density = self.mask(data.x[:1024].float() / 255).mean().item()
        self.mask_gen.train(was)
        return density

    def _draw(self, augment, n: int | None = None) -> torch.Tensor:
        """``n`` (default: a batch) augmented images in an independent order: the reference code's second
        shuffled loader. Only the images used are drawn and augmented."""
        idx = self._stream.take(self._batch if n is None else n)
        return augment(self._train.x[idx].float() / 255)

    # -- phase 2: joint training with the pattern generator ---------------------------------------
    def train_batch(self, x, y, augment):
        x = augment(x)  # augmentation before trigger generation, so the trigger fits the augmented image
        n = x.shape[0]
        n_b, n_c = math.floor(self.poison_rate * n), math.floor(self.cross_rate * n)
        source = self._draw(augment, n_c)  # the cross samples' trigger sources
        self.pattern_gen.train()
        # One G pass per image, as in the reference code: the same patterns make the triggers and enter the
        # diversity loss (a second pass would also double G's BatchNorm running-statistics updates).
        pattern_b, pattern_c = self.pattern_gen(x[:n_b]), self.pattern_gen(source)
        x_bd = x[:n_b] + (pattern_b - x[:n_b]) * self.mask(x[:n_b])
        x_cross = x[n_b : n_b + n_c] + (pattern_c - x[n_b : n_b + n_c]) * self.mask(source)
        pairs = min(n_b, n_c)
        if pairs:
            d_img = rms_distance(x[:pairs], source[:pairs])
            self._div = (d_img / (rms_distance(pattern_b[:pairs], pattern_c[:pairs]) + EPS)).mean()
        else:
            self._div = torch.zeros((), device=x.device)
        y = torch.cat([torch.full_like(y[:n_b], self.target), y[n_b:]])
        return torch.cat([x_bd, x_cross, x[n_b + n_c :]]), y

    def batch_loss(self) -> torch.Tensor:
        return self.lambda_div * self._div

    def after_step(self) -> None:
        self._optimizer.step()
        if not self.accumulate_G_grads:  # the reference code never zeroes G's gradients (docs/attack_methods.md §5.4)
            self._optimizer.zero_grad(set_to_none=True)

    def after_epoch(self) -> None:
        self._scheduler.step()

    def training_state(self):
        """G and M with their optimizer and schedule, the second loader's order, and G's accumulated gradients."""
        return {"pattern_generator": self.pattern_gen.state_dict(), "mask_generator": self.mask_gen.state_dict(),
                "optimizer": self._optimizer.state_dict(), "scheduler": self._scheduler.state_dict(),
                "order": self._stream.order, "grads": [p.grad for p in self.pattern_gen.parameters()],
                "mask_history": self.history["mask"]}

    def load_training_state(self, state):
        self.pattern_gen.load_state_dict(state["pattern_generator"])
        self.mask_gen.load_state_dict(state["mask_generator"])
        self._optimizer.load_state_dict(state["optimizer"])
        self._scheduler.load_state_dict(state["scheduler"])
        self._stream.order = state["order"].to(self._stream.order.device)
        for p, grad in zip(self.pattern_gen.parameters(), state["grads"]):
            p.grad = None if grad is None else grad.to(p.device)
        self.history["mask"] = state["mask_history"]

    # -- test time --------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        self.pattern_gen.eval()
        xf = x.float() / 255
        return (self.stamp(xf) * 255).round().clamp(0, 255).to(torch.uint8)

    def extra_metrics(self, model, test: ImageSet, batch_size: int = 1024, precision: str = "fp32") -> dict:
        """Cross-trigger accuracy: each test image with the trigger of a random other one, true labels."""
        self.pattern_gen.eval()
        gen = torch.Generator(device=test.x.device).manual_seed(0)
        partner = torch.randperm(len(test), generator=gen, device=test.x.device)
        with torch.no_grad():
            crossed = torch.cat([
                (self.stamp(test.x[i : i + batch_size].float() / 255,
                            source=test.x[partner[i : i + batch_size]].float() / 255) * 255).round().clamp(0, 255)
                for i in range(0, len(test), batch_size)]).to(torch.uint8)
        pred = predict(model, crossed, batch_size=batch_size, precision=precision)
        return {"cross_acc": (pred == test.y).float().mean().item(), "mask_density": self._mask_density(test)}

    def to(self, device):
        for net in (self.pattern_gen, self.mask_gen):
            if net is not None:
                net.to(device)
        return self

    def state_dict(self):
        return {**super().state_dict(), "shape": torch.tensor(self.shape),
                "pattern_generator": self.pattern_gen.state_dict(), "mask_generator": self.mask_gen.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.build(tuple(state["shape"].tolist()))
        self.pattern_gen.load_state_dict(state["pattern_generator"])
        self.mask_gen.load_state_dict(state["mask_generator"])
        self.pattern_gen.eval()
        self.mask_gen.eval().requires_grad_(False)

    def report(self):
        return {"asr_images": "uint8, rounded", "G_grads": "accumulated" if self.accumulate_G_grads else "zeroed each step",
                "mask_history": self.history.get("mask", [])}
