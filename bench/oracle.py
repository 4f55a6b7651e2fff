"""What a reference code picks with the test set, measured beside a cell and never as its result.

BackdoorBench's ANP (``defense/anp.py``, ``evaluate_by_threshold``) prunes the undefended model at mask thresholds
0 to 0.9 and keeps the one with the lowest test ASR whose test ACC is within ``acc_ratio`` (relative) of the
undefended model's, or the undefended model when none improves. No defender can do that: it reads the test set and
the trigger. Its published ANP rows are that choice, so a like-for-like comparison needs it too.

A defense that has such a ladder reports it as ``candidates``: steps that each zero more rows of named parameters.
With ``oracle.acc_ratio`` set, the runner walks the ladder on the undefended model, measures every step on the test
set and records the rule's choice under ``oracle``, apart from the cell's metrics, which stay the defense's own.
``bdbench reproduction`` sets it beside the published row it explains; tables, figures and the leaderboard never
read it.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from bdbench.metrics import der

Metrics = dict[str, Any]


def apply_step(model: torch.nn.Module, step: dict) -> None:
    """Zero the rows a step names (``{"zero": {parameter: [row, ...]}}``); an unknown parameter or row is an error,
    never a silent no-op."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, rows in step["zero"].items():
            if name not in params:
                raise ValueError(f"candidate step zeroes {name!r}, which the model does not have")
            if rows and not 0 <= min(rows) <= max(rows) < params[name].shape[0]:
                raise ValueError(f"candidate step zeroes rows {min(rows)}..{max(rows)} of {name!r} "
                                 f"({params[name].shape[0]} rows)")
            params[name][rows] = 0


def select(model: torch.nn.Module, candidates: list[dict], undefended: Metrics, acc_ratio: float,
           evaluate: Callable[[torch.nn.Module], Metrics]) -> dict:
    """Walk ``candidates`` (cumulative) on a copy of ``model`` and pick as BackdoorBench does: the lowest ASR below
    the undefended model's among steps whose ACC is within ``acc_ratio`` of it; no such step keeps the model."""
    work = copy.deepcopy(model)
    acc0, best, chosen = undefended["acc"], undefended["asr"], None
    ladder = []
    for i, step in enumerate(candidates):
        apply_step(work, step)
        measured = evaluate(work)
        ladder.append({**step["setting"], **{k: measured[k] for k in ("acc", "asr", "ra")}})
        if abs(measured["acc"] - acc0) / acc0 < acc_ratio and measured["asr"] < best:
            chosen, best = i, measured["asr"]
    metrics = {k: (ladder[chosen] if chosen is not None else undefended)[k] for k in ("acc", "asr", "ra")}
    metrics["der"] = der(undefended, metrics)
    return {"rule": "lowest test ASR with |ACC - ACC0| / ACC0 < acc_ratio (BackdoorBench defense/anp.py)",
            "acc_ratio": acc_ratio, "ladder": ladder,
            "chosen": candidates[chosen]["setting"] if chosen is not None else None, "metrics": metrics}
