"""Named sub-seeds from one root seed, so each random choice of a cell is independent and stable."""

from __future__ import annotations

import hashlib

import torch


def derive(seed: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` that changes when either the root seed or the purpose does."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def defense_seed(salt: bytes, seed: int) -> int:
    """The seed a defense gets: one-way from the cell's seed under the model's secret salt. The cell's own seed
    names the target where a grid draws it from the seed (``target_of_seed``), and any unsalted function of a
    small integer is inverted by trying them all."""
    digest = hashlib.sha256(salt + f":{seed}:defense".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def target_of_seed(seed: int, num_classes: int) -> int:
    """A target label drawn from the seed: seeds 0..K-1 get K different labels in a fixed shuffled order, so a
    grid over seeds never has one target everywhere (a defense that guesses label 0 cannot look right)."""
    order = sorted(range(num_classes), key=lambda label: derive(label, "target order"))
    return order[seed % num_classes]


def generator(seed: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive(seed, purpose))
