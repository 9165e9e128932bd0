"""The small arithmetic every question's figures share: milliseconds, one-line errors,
spans that overlap a window, and a latency summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.report import percentile


def ms(seconds: float, digits: int = 1) -> float:
    return round(seconds * 1000, digits)


def first_line(error: BaseException) -> str:
    """The error's class and message without SQLAlchemy's trailing link to its docs."""
    message = str(error).split(" (Background on this error", 1)[0].strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"[:200]


def overlapping(
    spans: Sequence[tuple[float, float]], start: float, end: float
) -> list[tuple[float, float]]:
    """The spans (start, end) that share any instant with [start, end]."""
    return [(a, b) for a, b in spans if a <= end and b >= start]


def latency_summary(spans: Sequence[tuple[float, float]]) -> dict[str, Any]:
    durations = [b - a for a, b in spans]
    if not durations:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "count": len(durations),
        "p50_ms": ms(percentile(durations, 50)),
        "p99_ms": ms(percentile(durations, 99)),
        "max_ms": ms(max(durations)),
    }
