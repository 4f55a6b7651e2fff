"""The defense contract as a check a plugin's own tests can call: ``check_defense(MyDefense(...))`` runs the defense
the way the runner does (a copy of the model, clean images, a context, weights back into the runner's own class)
on a tiny model and says, in one AssertionError, the first rule it breaks. What the sandbox enforces on top is in
docs/threat-model.md; this checks what a defense must do to be run at all.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from bdbench.models import create_model
from bdbench.weights import load_weights
from bdbench.defenses.base import CleanData, Defense, DefenseContext


def _tiny(model: str, num_classes: int, shape: tuple[int, int, int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(model, num_classes=num_classes, shape=shape, mean=[0.5] * shape[0],
                        std=[0.5] * shape[0]).eval()


def _objects(report: Any, where: str = "report") -> list[str]:
    """Paths of values a record cannot hold as data (records are JSON; a tensor or module would be its repr)."""
    if isinstance(report, dict):
        return [p for k, v in report.items() for p in _objects(v, f"{where}.{k}")]
    if isinstance(report, (list, tuple)):
        return [p for i, v in enumerate(report) for p in _objects(v, f"{where}[{i}]")]
    return [] if report is None or isinstance(report, (str, int, float, bool)) else [f"{where}: {type(report).__name__}"]


def check_defense(defense: Defense, model: str = "fmnist_cnn", num_classes: int = 10,
                  shape: tuple[int, int, int] = (1, 16, 16), per_class: int = 2, seed: int = 0) -> dict[str, Any]:
    """Run ``defense`` twice on the same tiny model and clean images and check that it (1) returns weights that
    load strictly into the model's own class (channel masks are the one addition allowed), (2) leaves the model it
    was given untouched, (3) reports plain JSON data, and (4) gives the same weights for the same seed. Returns its
    report."""
    suspect = _tiny(model, num_classes, shape, seed)
    before = copy.deepcopy(suspect.state_dict())
    generator = torch.Generator().manual_seed(seed)
    clean = CleanData(torch.rand(num_classes * per_class, *shape, generator=generator),
                      torch.arange(num_classes).repeat_interleave(per_class), source="real")
    ctx = DefenseContext(num_classes=num_classes, input_shape=shape, device=torch.device("cpu"), seed=seed,
                         progress=lambda iterable, **_: iterable)
    runs = []
    for _ in range(2):
        torch.manual_seed(seed)
        repaired = defense.apply(suspect, clean, ctx)
        assert isinstance(repaired, nn.Module), f"apply returned {type(repaired).__name__}, not the repaired model"
        try:
            runs.append(load_weights(_tiny(model, num_classes, shape, seed + 1), repaired.state_dict()).state_dict())
        except Exception as exc:  # what the runner would record as a failed cell
            raise AssertionError(f"the repaired weights do not load into {model}: {exc}") from None
        changed = [k for k, v in suspect.state_dict().items() if not torch.equal(v, before[k])]
        assert not changed, f"the defense changed the model it was given (its own copy is the one to repair): {changed[:3]}"
    report = defense.report()
    bad = _objects(report)
    assert not bad, f"the report holds objects a JSON record cannot: {bad[:3]}"
    json.dumps(report)
    differ = [k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k])]
    assert not differ, f"the same seed gave other weights (draw randomness from ctx.generator or torch's seed): {differ[:3]}"
    return report
