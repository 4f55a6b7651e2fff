"""Attacks: the interface in ``base.py`` and one module per attack; importing registers them."""

from bdbench.attacks.base import ATTACKS, Attack, create_attack, list_attacks, register_attack
from bdbench.attacks import (  # noqa: F401  (registration)
    badnets, blended, input_aware, input_aware_file, lc, none, sig, wanet)

__all__ = ["ATTACKS", "Attack", "create_attack", "list_attacks", "register_attack"]
