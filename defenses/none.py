"""No defense: the undefended model, the reference row of every table."""

from __future__ import annotations

from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense


@register_defense("none")
class NoDefense(Defense):
    data_free = True

    def apply(self, model, clean: CleanData, ctx: DefenseContext):
        return model  # no copy to make: nothing is changed

    def repair(self, model, clean: CleanData, ctx: DefenseContext) -> dict:
        return {}
