"""Channel masks through forward hooks, with batched coalitions (docs/defense_methods.md §1.1).

A *neuron* is one conv output channel, taken after the BatchNorm that normalizes it (so a mask of 0
silences it exactly) or, where the model says its BNs come before the convs (PreAct-ResNet,
``neuron_point = "conv"``), at the conv output. Many candidate prunings are scored at the cost of
one large batch: the activation holds G coalitions x N images, the hook views it as
[G, N, C, H, W] and multiplies by M[G, 1, C, 1, 1]. The model's first conv (its stem) is the same for
every coalition, so it runs once on the N images and its output is repeated G times; everything after
it, residual branches included, sees G x N images (this assumes the stem is the only reader of the
input, true of every registered model: a test scores coalitions of each one both ways).

Where coalitions come one at a time (a removal walk on the CPU, one pass per coalition), ``ResumedForward``
recomputes only what the changed channels can reach and serves the rest from the previous pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from bdbench.device import autocast
from bdbench.weights import KEEP, channel_keep


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
            if torch.is_grad_enabled() or not state.in_place:
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
    in_place: bool = True  # False where a module's output is kept for the next pass (``ResumedForward``)


@torch.no_grad()
def coalition_logits(model: nn.Module, neurons: Neurons, masks: torch.Tensor, x: torch.Tensor,
                     images_per_pass: int, precision: str = "fp32") -> torch.Tensor:
    """Logits of every coalition on every image, [G, N, K], with ``images_per_pass`` images per forward.

    Where fewer than ``RESUME_BELOW`` coalitions fit a pass, one coalition per pass, each resumed from the last
    (``ResumedForward``).
    """
    n_img = x.shape[0]
    per_pass = max(1, images_per_pass // n_img)
    if resumes(x, images_per_pass) and len(masks) > 1:  # each pass resumes from the last, with the same logits
        with ResumedForward(model, neurons, x, precision, ahead=masks) as resumed:
            return torch.stack([resumed(m) for m in masks])
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


# Coalitions are scored one a pass, each resumed from the last, where fewer than this many fit one pass: batching a
# few coalitions gains little (144 carriers, 3 a pass on the CPU) and resuming gains more (results/perf/walks-cpu.md,
# coalitions-cpu.md). 0 turns resuming off (``bdbench perf walks`` measures against that).
RESUME_BELOW = 4


def resumes(x: torch.Tensor, images_per_pass: int) -> bool:
    """Whether coalitions on ``x`` are scored one a pass, each resumed from the last (``RESUME_BELOW``)."""
    return max(1, images_per_pass // len(x)) < RESUME_BELOW


@contextlib.contextmanager
def coalition_scorer(model: nn.Module, neurons: Neurons, x: torch.Tensor, images_per_pass: int,
                     precision: str = "fp32") -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """``score(masks) -> [G, N, K]`` for coalitions decided a few at a time (a removal walk): where few coalitions fit
    a pass (``RESUME_BELOW``), each is scored in its own pass resumed from the last (``ResumedForward``); otherwise
    all of them in ``coalition_logits``'s batched passes."""
    if resumes(x, images_per_pass):
        with ResumedForward(model, neurons, x, precision) as resumed:
            yield lambda masks: torch.stack([resumed(m) for m in masks])
    else:
        yield lambda masks: coalition_logits(model, neurons, masks, x, images_per_pass, precision)


class ResumedForward:
    """Logits of one coalition after another on fixed images, each pass recomputing only what its changed channels
    can reach: exactly the numbers of a full pass, at a fraction of its cost when consecutive masks differ in a
    few deep channels (a removal walk removes one channel per step, and most channels of a ResNet are deep).

    Why it is exact: within one forward pass a module call that ended before the first changed mask point applied
    its mask (at the end of its own call) cannot depend on it; its inputs came from the same images through the same
    masks as last time, so its output is last pass's. Such calls (the largest ones: whole blocks where possible)
    return their kept output instead of computing. The order of calls is recorded once on one image, so a forward
    whose control flow depends on the data is not supported (the registered models have none). A module called
    twice per pass, a mask point itself, or an output something later changed in place (its version counter moved)
    is always computed.

    Memory: with ``ahead`` (every mask to come, in order) only the outputs that can serve one of them are kept;
    without it (a walk that decides its next mask as it goes) every module's output of the last pass is.
    Use as a context manager; ``scorer(mask)`` takes one mask of shape [n] and returns [N, K] float logits.
    """

    def __init__(self, model: nn.Module, neurons: Neurons, x: torch.Tensor, precision: str = "fp32",
                 ahead: torch.Tensor | None = None) -> None:
        self.model, self.neurons, self.x, self.precision, self.ahead = model, neurons, x, precision, ahead
        self.layer_of = neurons.layer_of().to(x.device)
        self.previous: torch.Tensor | None = None
        self.span: dict[nn.Module, tuple[int, int]] = {}  # module -> (start, end) in the recorded call order
        self.kept: dict[nn.Module, tuple[torch.Tensor, int]] = {}  # module -> (output, its version when kept)
        self.keep: set[nn.Module] | None = None  # the modules whose outputs are kept; None = all
        self.parent: dict[nn.Module, nn.Module] = {c: m for m in model.modules() for c in m.children()}
        self.serving: set[nn.Module] = set()
        self.recording = False
        self.reused_calls = self.calls = 0

    def __enter__(self) -> "ResumedForward":
        self._stack = contextlib.ExitStack()
        self.state = self._stack.enter_context(masked(self.neurons))
        self.state.in_place = False  # a mask point's input can be a kept output: a mask must never write into it
        points = set(self.neurons.modules)
        counter, calls = [0], {}

        def pre(module, _inputs) -> None:
            if self.recording:
                calls[module] = calls.get(module, 0) + 1
                if calls[module] == 1:
                    self.span[module] = (counter[0], -1)
                counter[0] += 1

        def post(module, _inputs, out) -> None:
            if self.recording:
                if calls[module] == 1:
                    self.span[module] = (self.span[module][0], counter[0])
                counter[0] += 1
            elif (module not in self.serving and module not in points and isinstance(out, torch.Tensor)
                  and (self.keep is None or module in self.keep)):
                self.kept[module] = (out, out._version)

        for m in self.model.modules():
            if m is not self.model:
                self._stack.enter_context(_hooked(m, pre, post))
        self.recording = True
        try:
            self.state.masks = torch.ones(1, self.neurons.n, device=self.x.device)
            with torch.no_grad(), autocast(self.x.device, self.precision):
                self.model(self.x[:1])
        finally:
            self.recording = False
        self.span = {m: s for m, s in self.span.items() if s[1] >= 0 and calls[m] == 1}
        if self.ahead is not None and len(self.ahead) > 1:
            cuts = [self._cut(a, b) for a, b in zip(self.ahead[:-1], self.ahead[1:])]
            self.keep = self._largest({m for m, (_, end) in self.span.items() if end < min(cuts)})
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.kept.clear()

    @torch.no_grad()
    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        serve = self._reusable(mask) if self.previous is not None else []
        self.state.masks = mask[None]
        self.serving = set(serve)
        originals = {m: m.__dict__.get("forward") for m in serve}
        try:
            for m in serve:
                m.forward = (lambda out: (lambda *a, **k: out))(self.kept[m][0])
            with autocast(self.x.device, self.precision):
                logits = self.model(self.x).float()
        finally:
            for m, original in originals.items():
                if original is None:
                    del m.forward
                else:
                    m.forward = original
            self.serving = set()
        self.previous = mask.clone()
        self.calls += 1
        self.reused_calls += bool(serve)
        return logits

    def _cut(self, before: torch.Tensor, after: torch.Tensor) -> int:
        """Where in the call order the first mask point that differs between two masks ends, its mask applied
        (-1: unknown). Calls inside a mask point (a group's blocks) end before it and never see its mask."""
        changed = self.layer_of[(after != before).nonzero().squeeze(1)].unique().tolist()
        if not changed:  # the same mask: every call's output is last pass's
            return max(end for _, end in self.span.values()) + 1
        return min(self.span.get(self.neurons.modules[layer], (-1, -1))[1] for layer in changed)

    def _reusable(self, mask: torch.Tensor) -> list[nn.Module]:
        """The largest module calls that end before the first changed mask point applies its mask, with their
        outputs kept and unchanged since."""
        cut = self._cut(self.previous, mask)
        return self._largest({m for m, (_, end) in self.span.items()
                              if end < cut and m in self.kept and self.kept[m][0]._version == self.kept[m][1]})

    def _largest(self, fits: set[nn.Module]) -> list[nn.Module]:
        """The modules of ``fits`` inside no other module of it."""
        def inside(module: nn.Module) -> bool:
            while module in self.parent:
                module = self.parent[module]
                if module in fits:
                    return True
            return False
        return [m for m in fits if not inside(m)]


@contextlib.contextmanager
def _hooked(module: nn.Module, pre: Callable, post: Callable) -> Iterator[None]:
    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
    """Permanently silence neurons: a fixed 0/1 buffer on each mask point (``bdbench.weights.channel_keep``).

    Fine-tuning afterwards cannot regrow a pruned channel, and the mask travels in the weights the defense returns.
    """
    for i in torch.as_tensor(indices, dtype=torch.long).tolist():
        layer, c = neurons.locate(i)
        channel_keep(neurons.modules[layer], neurons.sizes[layer])[c] = 0


def pruned_count(neurons: Neurons) -> int:
    return sum(int((getattr(m, KEEP) == 0).sum()) for m in neurons.modules if hasattr(m, KEEP))
