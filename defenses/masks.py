"""Channel masks through forward hooks, with batched coalitions (docs/defense_methods.md §1.1).

A *neuron* is one conv output channel, taken after the BatchNorm that normalizes it (so a mask of 0
silences it exactly) or, where the model says its BNs come before the convs (PreAct-ResNet,
``neuron_point = "conv"``), at the conv output. Many candidate prunings are scored at the cost of
one large batch: the activation holds G coalitions x N images, the hook views it as
[G, N, C, H, W] and multiplies by M[G, 1, C, 1, 1]. The model's first conv (its stem) is the same for
every coalition, so it runs once on the N images and its output is repeated G times; everything after
it, residual branches included, sees G x N images (this assumes the stem is the only reader of the
input, true of every registered model: a test scores coalitions of each one both ways).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from bench.device import autocast
from bench.weights import KEEP, channel_keep


@dataclass
class Neurons:
    """An ordered set of mask points; neuron ``i`` is a channel of one of them, by a global index."""

    modules: list[nn.Module]
    names: list[str]
    sizes: list[int]

    @property
    def n(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for s in self.sizes:
            out.append(total)
            total += s
        return out

    def layer_of(self) -> torch.Tensor:
        """The layer index of every neuron, [n]."""
        return torch.cat([torch.full((s,), i) for i, s in enumerate(self.sizes)])

    def locate(self, index: int) -> tuple[int, int]:
        """(layer, channel) of a global neuron index."""
        for layer, (start, size) in enumerate(zip(self.offsets, self.sizes)):
            if index < start + size:
                return layer, index - start
        raise IndexError(index)

    def describe(self, indices: Sequence[int]) -> list[str]:
        return [f"{self.names[l]}:{c}" for l, c in map(self.locate, indices)]


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    raise TypeError(f"cannot mask {type(module).__name__}: a mask point is a Conv2d or a BatchNorm")


def conv_neurons(model: nn.Module) -> Neurons:
    """All conv output channels (1x1 shortcuts included), each at its mask point, in module order."""
    after_bn = getattr(model, "neuron_point", "bn") == "bn"
    bn_of = {id(conv): bn for conv, bn in model.conv_bn_pairs()} if after_bn else {}
    names_of = {id(m): name for name, m in model.named_modules()}
    modules = [bn_of.get(id(m), m) for m in model.modules() if isinstance(m, nn.Conv2d)]
    return Neurons(modules, [names_of[id(m)] for m in modules], [_channels(m) for m in modules])


def group_neurons(model: nn.Module, groups: Sequence[str]) -> Neurons:
    """The output channels of the model's declared feature groups (e.g. the last one for ℓ∞ and FP)."""
    modules = [model.get_submodule(g) for g in groups]
    sizes = []
    with torch.no_grad():  # a group's width is whatever it outputs: probe once
        shapes: list[int] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: shapes.append(o.shape[1])) for m in modules]
        try:
            model(torch.zeros(1, *model.shape, device=next(model.parameters()).device))
        finally:
            for h in hooks:
                h.remove()
        sizes = shapes
    return Neurons(modules, list(groups), sizes)


@torch.no_grad()
def head_neurons(model: nn.Module) -> tuple[Neurons, bool]:
    """The feature map the classifier head reads, as a mask point, and whether a ReLU lies between the two.

    Found by probing, not declared: the last module (in the order modules finish) whose output is a map larger than
    1x1 is the candidate, and the input of the first ``nn.Linear`` called after it must equal that map, or its ReLU,
    pooled over space or flattened. On a WRN the map is ``relu(bn(block3))``: the mask point is ``bn`` (zeroing a
    BN channel zeroes its ReLU). Raises where no module's output feeds the head so directly.
    """
    x = torch.rand(2, *model.shape, device=next(model.parameters()).device)
    outputs: list[tuple[nn.Module, torch.Tensor]] = []
    head_inputs: list[tuple[int, torch.Tensor]] = []

    def on_output(module, _inputs, out) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
            outputs.append((module, out.detach().float().clone()))

    def on_linear(_module, inputs) -> None:
        head_inputs.append((len(outputs), inputs[0].detach().float().clone()))

    hooks = [m.register_forward_hook(on_output) for m in model.modules() if m is not model]
    hooks += [m.register_forward_pre_hook(on_linear) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if outputs:
        module, fmap = outputs[-1]
        z = next((z for seen, z in head_inputs if seen == len(outputs)), None)
        for relu in (False, True):
            a = fmap.relu() if relu else fmap
            if z is not None and any(z.shape == r.shape and torch.allclose(z, r, atol=1e-5)
                                     for r in (a.mean((2, 3)), a.flatten(1))):
                name = next(n for n, m in model.named_modules() if m is module)
                return Neurons([module], [name], [fmap.shape[1]]), relu
    raise ValueError(f"{type(model).__name__}: no module's output reaches the first linear layer pooled or flattened "
                     "(directly or through a ReLU); valid taps for this model: group, all_channels")


@contextlib.contextmanager
def masked(neurons: Neurons, masks: torch.Tensor | None = None, stem: nn.Module | None = None
           ) -> Iterator["MaskState"]:
    """Hooks that multiply each mask point's output by its slice of ``state.masks`` [G, n].

    The batch is G x N images, coalition-major, or, with ``state.shared = N`` and ``stem`` given, the N
    images once: ``stem`` then repeats its output G times. ``state.masks = None`` passes activations through.
    """
    state = MaskState(masks)

    def repeat(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
        g = state.masks.shape[0] if state.masks is not None else 1
        if g > 1 and out.shape[0] == state.shared:
            return out.repeat(g, *([1] * (out.dim() - 1)))
        return out

    def hook(start: int, size: int) -> Callable:
        def fn(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
            if state.masks is None:
                return out
            g = state.masks.shape[0]
            m = state.masks[:, start:start + size].to(out.dtype)
            shaped = out.view(g, out.shape[0] // g, *out.shape[1:])
            m = m.view(g, 1, size, *([1] * (out.dim() - 2)))
            if torch.is_grad_enabled():
                return (shaped * m).view_as(out)
            shaped.mul_(m)  # scoring only: no new activation tensor (allocation dominates on the CPU)
            return out
        return fn

    handles = [stem.register_forward_hook(repeat)] if stem is not None else []  # before a mask hook on the stem
    handles += [m.register_forward_hook(hook(s, c)) for m, s, c in zip(neurons.modules, neurons.offsets, neurons.sizes)]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


@dataclass
class MaskState:
    masks: torch.Tensor | None
    shared: int | None = None  # N when the input holds the images once, not once per coalition


@torch.no_grad()
def coalition_logits(model: nn.Module, neurons: Neurons, masks: torch.Tensor, x: torch.Tensor,
                     images_per_pass: int, precision: str = "fp32") -> torch.Tensor:
    """Logits of every coalition on every image, [G, N, K], with ``images_per_pass`` images per forward.

    ``images_per_pass = N`` gives one coalition per forward pass, the sequential reference.
    """
    n_img = x.shape[0]
    per_pass = max(1, images_per_pass // n_img)
    out = []
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with masked(neurons, stem=stem) as state:
        state.shared = n_img
        for chunk in masks.split(per_pass):
            state.masks = chunk
            with autocast(x.device, precision):
                logits = model(x)
            out.append(logits.float().view(chunk.shape[0], n_img, -1))
    return torch.cat(out)


def prefix_masks(order: torch.Tensor, counts: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    """[len(counts), n] masks that remove the first ``c`` neurons of ``order`` (by cumulative one-hots)."""
    counts = torch.as_tensor(counts, device=order.device)
    rank = torch.empty(n, dtype=torch.long, device=order.device)
    rank[order] = torch.arange(len(order), device=order.device)
    if len(order) < n:  # neurons outside the order are never removed
        keep = torch.ones(n, dtype=torch.bool, device=order.device)
        keep[order] = False
        rank[keep] = n
    return (rank[None, :] >= counts[:, None]).float()


def prune_channels(neurons: Neurons, indices: Sequence[int] | torch.Tensor) -> None:
    """Permanently silence neurons: a fixed 0/1 buffer on each mask point (``bench.weights.channel_keep``).

    Fine-tuning afterwards cannot regrow a pruned channel, and the mask travels in the weights the defense returns.
    """
    for i in torch.as_tensor(indices, dtype=torch.long).tolist():
        layer, c = neurons.locate(i)
        channel_keep(neurons.modules[layer], neurons.sizes[layer])[c] = 0


def pruned_count(neurons: Neurons) -> int:
    return sum(int((getattr(m, KEEP) == 0).sum()) for m in neurons.modules if hasattr(m, KEEP))
