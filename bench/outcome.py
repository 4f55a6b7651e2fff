"""What became of a cell: the one rule that the runner's record, the closing line, the tables, the figures and the
leaderboard all read (docs/outcomes.md).

A defense is judged by what it leaves: a low ASR on a model whose clean accuracy is gone is damage, not a defense.
In order of precedence:

- ``failed``: the cell stopped with an error (a failed record); run again on the next sweep.
- ``diverged``: the defense's loss went non-finite; a result, not a crash.
- ``no backdoor``: the poisoned model's own ASR is below ``no_backdoor_asr``: there was nothing to remove.
- ``collapsed``: the defended model is at chance or gives one class most predictions (``bdbench.metrics.collapsed``).
- ``damaged``: its clean ACC fell more than ``max_acc_drop`` points below the undefended model's.
- ``ok`` (shown as "finished"): none of the above; the only outcome whose numbers are averaged and ranked first.

The thresholds live in ``conf/config.yaml`` (``outcome``); they judge, they never change a cell, so they are not
part of a cell's identity and a report can re-judge published records under them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from omegaconf import OmegaConf

OK, DAMAGED, COLLAPSED, NO_BACKDOOR, DIVERGED, FAILED = "ok", "damaged", "collapsed", "no backdoor", "diverged", "failed"
RANK = (OK, DAMAGED, COLLAPSED, NO_BACKDOOR, DIVERGED, FAILED)  # best first: the leaderboard never lifts a later one
RAN = (OK, DAMAGED, COLLAPSED, NO_BACKDOOR)  # ran to the end: metrics exist, costs and undefended models count
NOT_OK = RANK[1:]


@dataclass(frozen=True)
class Rule:
    """The thresholds, in the units a reader thinks in: points of ACC, a share of backdoor test images."""

    max_acc_drop: float = 10.0
    no_backdoor_asr: float = 0.5

    def __post_init__(self) -> None:
        for key, top, what in (("max_acc_drop", 100, "points of clean accuracy"), ("no_backdoor_asr", 1, "a share")):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
                raise ValueError(f"outcome.{key}={value!r}: {what}; valid: a number in 0..{top}")

    def words(self) -> str:
        return (f"damaged: clean ACC more than {self.max_acc_drop:g} points below the undefended model; "
                f"no backdoor: the poisoned model's own ASR below {self.no_backdoor_asr:.0%}")


@cache
def configured() -> Rule:
    """The rule in ``conf/config.yaml`` (what a report applies to every record it reads)."""
    from bdbench.validate import CONF_DIR

    return Rule(**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").outcome))


def judge(status: str, metrics: dict | None, undefended: dict | None, num_classes: int, rule: Rule) -> str:
    """The outcome of one cell from its record's status, metrics and undefended metrics (fractions)."""
    from bdbench.metrics import COLLAPSE_CHANCE_FACTOR

    if status != OK:
        return DIVERGED if status == DIVERGED else FAILED
    asr = (undefended or {}).get("asr")
    if asr is not None and asr < rule.no_backdoor_asr:
        return NO_BACKDOOR
    # records written before the top-class rule (schema 2) carry no verdict: judged by ACC alone
    if metrics.get("collapsed", metrics["acc"] <= COLLAPSE_CHANCE_FACTOR / num_classes):
        return COLLAPSED
    if undefended and undefended.get("acc") is not None and \
            round(100 * (undefended["acc"] - metrics["acc"]), 6) > rule.max_acc_drop:
        return DAMAGED
    return OK


def of_record(record: dict, rule: Rule | None = None) -> str:
    """A record's outcome under ``rule`` (default: the configured one)."""
    config = record.get("config") or {}
    num_classes = (config.get("dataset") or {}).get("num_classes", 10)
    return judge(record.get("status", FAILED), record.get("metrics"), record.get("undefended"), num_classes,
                 rule or configured())
