"""The weights a defense returns, and the channel masks that may travel in them.

Kept apart from the model classes (``bdbench.models``): those modules are part of every poisoned model's cache key,
and this is what the runner does with a repaired model, not how a model is trained.
"""

from __future__ import annotations

import torch
from torch import nn

KEEP = "bdbench_keep"  # the buffer name of a module's fixed 0/1 channel mask


def _apply_keep(module: nn.Module, _inputs, out: torch.Tensor) -> torch.Tensor:
    return out * getattr(module, KEEP).to(out.dtype).view(1, -1, *([1] * (out.dim() - 2)))


def channel_keep(module: nn.Module, channels: int) -> torch.Tensor:
    """A module's fixed 0/1 mask over its output channels, made on first use with the forward hook that applies it.

    A buffer, so it travels in the module's ``state_dict`` and is never trained: pruning is part of the weights a
    defense returns, and it silences channels no single parameter could (a residual block's output)."""
    if not hasattr(module, KEEP):
        param = next(module.parameters(), None)
        module.register_buffer(KEEP, torch.ones(channels, device=param.device if param is not None else None))
        module.register_forward_hook(_apply_keep)
    return getattr(module, KEEP)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The weights a defense returned, in the runner's own architecture: channel masks are the only entries they may
    add. Anything else that does not fit (a key, a shape) is refused, so no object a defense made is ever run."""
    for key, value in state.items():
        owner, _, name = key.rpartition(".")
        if name == KEEP and value.dim() == 1:
            try:
                channel_keep(model.get_submodule(owner), len(value))
            except AttributeError:
                raise ValueError(f"repaired weights: {key} names no module of {type(model).__name__}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ValueError(f"repaired weights do not fit {type(model).__name__}: {first}") from None
    return model
