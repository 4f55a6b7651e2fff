"""Defenses: the interface in ``base.py``, one module per defense, and the parts several share
(``finetune.py``: the fine-tuning loop; ``synthesis.py``: data-free inputs for budget 0)."""

from defenses.base import DEFENSES, CleanData, Defense, DefenseContext, create_defense, list_defenses, register_defense
from defenses import clp, ft, none  # noqa: F401  (registration)

__all__ = ["DEFENSES", "CleanData", "Defense", "DefenseContext", "create_defense", "list_defenses", "register_defense"]
