"""Device choice and the precision policy: bf16 autocast and channels_last on CUDA, fp32 on CPU."""

from __future__ import annotations

import contextlib

import torch

from bench.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ConfigError(f"device={name!r}; valid: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available on this machine; valid here: auto, cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; on the CPU always fp32 (bf16 there is slow and changes results)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device, channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
