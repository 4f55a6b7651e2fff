"""Ranges and choices of configured keys, declared where the key is read: in the constructor's signature.

A component declares ``epochs: Annotated[int, Range(ge=1)]`` or ``corner: Literal["bottom_right", ...]``
and ``bdbench.validate`` checks every configured value against it before any compute, so each attack,
defense, recipe and data set is its own schema and no central list can fall out of date. A check that
needs the data (a patch that must fit the image) is the component's ``check_shape``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``ge``/``gt`` below, ``le``/``lt`` above (None = unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        high = f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else ""
        return " and ".join(p for p in (low, high) if p) or "any number"


PositiveInt = Annotated[int, Range(ge=1)]
Count = Annotated[int, Range(ge=0)]
Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
Rate = Annotated[float, Range(gt=0, lt=1)]
Pixel = Annotated[int, Range(ge=0, le=255)]
