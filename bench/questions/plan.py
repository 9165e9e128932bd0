"""What a run of the questions measures: the full plan, and the quick one that keeps the
shape of every experiment at a fraction of the time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

QUESTIONS: Final = ("pool", "loading", "migrations")


@dataclass(frozen=True)
class Shape:
    """Customers with `orders` orders of `lines` lines each; the text columns' widths set
    how much a join repeats per child row."""

    name: str
    orders: int
    lines: int
    profile_bytes: int
    note_bytes: int


SHAPES: Final = (
    Shape("2x2", 2, 2, 100, 50),
    Shape("10x10", 10, 10, 100, 50),
    Shape("50x20", 50, 20, 100, 50),
    Shape("50x20 wide", 50, 20, 2_000, 500),
)

Mode = Literal["alone", "queued", "lock_timeout", "lock_timeout_retry"]
MODES: Final[tuple[Mode, ...]] = ("alone", "queued", "lock_timeout", "lock_timeout_retry")


@dataclass(frozen=True)
class Plan:
    """How much each question measures; `--quick` keeps the shape of every experiment
    (the hold is 3/4 of the pool timeout in both) at a fraction of the time."""

    burst_sizes: tuple[int, ...] = (5, 10, 20, 50, 100)
    hold_s: float = 1.5
    pool_timeout_s: float = 2.0
    checkouts: int = 500
    shapes: tuple[Shape, ...] = SHAPES
    parents: tuple[int, ...] = (1, 10, 30)
    repeats: int = 3
    repeat_budget_s: float = 0.5
    ledger_rows: int = 500_000
    reader_hold_s: float = 3.0
    lock_timeout_s: float = 2.0
    lead_s: float = 0.5
    modes: tuple[Mode, ...] = MODES


FULL: Final = Plan()
QUICK: Final = Plan(
    burst_sizes=(5, 20, 100),
    hold_s=0.3,
    pool_timeout_s=0.4,
    checkouts=200,
    shapes=(SHAPES[1], SHAPES[3]),
    parents=(1, 10),
    repeats=3,
    repeat_budget_s=0.2,
    ledger_rows=50_000,
    reader_hold_s=1.0,
    lock_timeout_s=0.4,
    lead_s=0.25,
    modes=("alone", "queued", "lock_timeout"),
)
