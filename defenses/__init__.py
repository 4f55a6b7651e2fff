"""Defenses: the interface in ``base.py``, one module per defense, and the parts several share:
``finetune.py`` (the fine-tuning loop), ``synthesis.py`` (data-free inputs for budget 0), ``masks.py``
(channel masks and batched coalitions), ``guard.py`` (the accuracy guard), ``reversal.py`` (Neural
Cleanse trigger reversal) and ``attention.py`` (attention maps of the model's feature groups)."""

from bdbench.defenses.base import (DEFENSES, CleanData, Defense, DefenseContext, create_defense, list_defenses,
                           register_defense, register_shared)
from bdbench.defenses import (  # noqa: F401  (registration)
    anp, ar_purification, argd, clp, fp, ft, linf_pruning, nad, nc, none, shap_pruning, suspiciousness,
)
from bdbench.defenses.reversal import Reversal, TriggerReversal

register_shared(TriggerReversal, kind="reversals", result=Reversal)  # NC, ℓ∞ pruning, ShapPruning: reverse once

__all__ = ["DEFENSES", "CleanData", "Defense", "DefenseContext", "create_defense", "list_defenses", "register_defense"]
