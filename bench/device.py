"""Device choice and the precision policy: bf16 autocast on CUDA (fp32 on the CPU), channels_last where asked."""

from __future__ import annotations

import contextlib
import ctypes
import logging

import torch

from bdbench.errors import ConfigError

log = logging.getLogger(__name__)

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


def memory_format(channels_last: bool) -> torch.memory_format:
    """channels_last on every device that is asked for it: on 2 CPU cores (oneDNN) a WRN-16-1 training step at batch
    512 is 1.44x faster in it and a test pass 1.5x (fmnist_cnn: 1.2x, 1.5x), as on CUDA. It changes the order of
    floating-point sums, not what is computed."""
    return torch.channels_last if channels_last else torch.contiguous_format


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
RETAIN_BYTES = 2**30  # tensors up to 1 GiB come from the heap; up to 1 GiB of freed memory stays for reuse


def retain_freed_memory() -> bool:
    """Let glibc keep freed memory for the next allocation instead of handing it back to the kernel.

    By default every tensor above glibc's mmap threshold (at most 32 MB: one WRN-16-1 activation at batch 512 is
    33.5 MB) is a fresh mapping whose pages the kernel zeroes on first touch, every step: a WRN-16-1 epoch on 2 CPU
    cores took 158 s at batch 512 (a third of it in the kernel) and 89 s with this (`bdbench perf allocator`). It
    changes where memory comes from, not a single value computed. Returns whether it applied (False off glibc)."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them (no ldconfig lookup)
        applied = bool(libc.mallopt(M_MMAP_THRESHOLD, RETAIN_BYTES)
                       and libc.mallopt(M_TRIM_THRESHOLD, 2 * RETAIN_BYTES - 1))
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator as it is
        applied = False
    log.debug("retain freed memory: %s", applied)
    return applied
