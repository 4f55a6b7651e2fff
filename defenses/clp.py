"""CLP: data-free channel-Lipschitz pruning (Zheng et al., ECCV 2022; docs/defense_methods.md §7.6)."""

from __future__ import annotations

import torch

from bdbench.schema import NonNegative
from bdbench.defenses.base import CleanData, Defense, DefenseContext, register_defense


@register_defense("clp")
class CLP(Defense):
    """Zero the BN scale and shift of channels whose upper Lipschitz bound is an outlier in its layer.

    Per conv->BN pair (declared by the model, by graph), channel k's bound is the largest singular
    value of its kernel reshaped to [C_in, kh*kw] times |gamma_k / sigma_k|; channels above
    ``mean + u * std`` of their layer are pruned. No data, no fine-tuning: it runs at every budget.
    """

    data_free = True

    def __init__(self, *, u: NonNegative) -> None:
        self.u = u

    def needs(self) -> dict[str, int]:
        return {"conv_bn_pairs": 1}

    @torch.no_grad()
    def repair(self, model, clean: CleanData, ctx: DefenseContext) -> dict:
        if not hasattr(model, "conv_bn_pairs"):
            raise TypeError(f"clp needs a model that declares conv_bn_pairs(); {type(model).__name__} does not")
        per_layer, total, pruned = [], 0, 0
        for conv, bn in model.conv_bn_pairs():
            scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).abs()
            w = conv.weight * scale.view(-1, 1, 1, 1)
            lips = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
            idx = (lips > lips.mean() + self.u * lips.std()).nonzero().squeeze(1)
            bn.weight[idx] = 0
            bn.bias[idx] = 0
            per_layer.append(idx.tolist())
            total += len(lips)
            pruned += len(idx)
        return {"pruned": pruned, "channels": total, "pruned_fraction": pruned / max(total, 1),
                "pruned_per_layer": per_layer}
