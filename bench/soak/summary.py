"""The soak's arithmetic, kept apart from any I/O: latency percentiles per window, each
service process's memory growth after its warm-up, recovery after each fault, the verdicts.

Invariant: every figure here is a function of the samples and faults alone, so a results
file can be summarised again (and the functions tested) without running anything.
"""

from __future__ import annotations

import math
import statistics
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GROWTH_TOLERANCE = 0.10
"""A process's RSS may end up to 10% above its level at the end of its warm-up. CPython
returns an arena to the system only when every object in it is freed, so a batch of a
few thousand events that happens to straddle a sample moves RSS by a few MB either way;
10% of the ~100 MB a replica holds is well above that noise, and a leak of a few bytes per
event (3 million events in 25 minutes at 2,000/s) is well above 10%."""
LEVEL_WINDOW_S = 60.0
"""A level is the median of the samples of one minute, so one sample's spike is no level."""
MIN_JUDGED_S = 2 * LEVEL_WINDOW_S
"""A process is judged only if it ran at least this long after its warm-up."""


def percentile(values: Sequence[float], share: float) -> float | None:
    """The nearest-rank percentile (`share` in (0, 1]) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Growth:
    """One service process's resident memory after its warm-up against its last minute."""

    process: str
    started_s: float
    ended_s: float
    warm_mb: float | None
    end_mb: float | None
    slope_mb_per_hour: float | None
    judged: bool

    @property
    def growth_mb(self) -> float | None:
        if self.warm_mb is None or self.end_mb is None:
            return None
        return self.end_mb - self.warm_mb

    @property
    def growth_share(self) -> float | None:
        grown = self.growth_mb
        return None if grown is None or not self.warm_mb else grown / self.warm_mb

    @property
    def ok(self) -> bool | None:
        """None when the process did not run long enough after its warm-up to be judged."""
        share = self.growth_share
        if not self.judged or share is None:
            return None
        return share <= GROWTH_TOLERANCE

    def as_dict(self) -> dict[str, Any]:
        return {
            "process": self.process,
            "started_s": round(self.started_s, 1),
            "ended_s": round(self.ended_s, 1),
            "warm_mb": _round(self.warm_mb),
            "end_mb": _round(self.end_mb),
            "growth_mb": _round(self.growth_mb),
            "growth_percent": _round(
                None if self.growth_share is None else 100 * self.growth_share
            ),
            "slope_mb_per_hour": _round(self.slope_mb_per_hour),
            "judged": self.judged,
            "ok": self.ok,
        }


def growth(process: str, series: Sequence[tuple[float, float]], warmup_s: float) -> Growth:
    """Judge one process from its `(seconds, rss_mb)` samples (in time order): its level in
    the minute after its own warm-up (counted from its first sample: a restarted process
    warms up again) against its level in its last minute."""
    started, ended = series[0][0], series[-1][0]
    warm_end = started + warmup_s
    judged = ended - warm_end >= MIN_JUDGED_S
    warm = _median(mb for t, mb in series if warm_end <= t < warm_end + LEVEL_WINDOW_S)
    end = _median(mb for t, mb in series if t > ended - LEVEL_WINDOW_S and t >= warm_end)
    after = [(t, mb) for t, mb in series if t >= warm_end]
    slope = _slope(after)
    return Growth(
        process,
        started,
        ended,
        warm,
        end,
        None if slope is None else slope * 3600.0,
        judged and warm is not None and end is not None,
    )


def processes(samples: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Each process's RSS series, keyed `role#pid` (a restart is another process); a
    sample of 0 MB (a process killed and not yet reaped) is none."""
    series: dict[str, list[tuple[float, float]]] = {}
    for sample in samples:
        for role, seen in sample["processes"].items():
            if seen.get("rss_mb"):
                key = f"{role}#{seen['pid']}"
                series.setdefault(key, []).append((sample["t"], seen["rss_mb"]))
    return series


def recovery_s(
    lags: Sequence[tuple[float, int]], fault_at: float, fault_end: float, floor: int
) -> float | None:
    """Seconds from a fault's start until the lag, after the fault ended, came back to
    what it was before (twice the median of the minute before, at least `floor`, which is
    about one second's events); None if it never did."""
    before = [lag for t, lag in lags if fault_at - LEVEL_WINDOW_S <= t < fault_at]
    normal = max(floor, 2 * int(statistics.median(before))) if before else floor
    for t, lag in lags:
        if t >= fault_end and lag <= normal:
            return t - fault_at
    return None


class Window:
    """Latencies seen since the last sample (for that sample's p50/p99) and over the whole
    run (when seen and how long, in two flat arrays: millions of tuples would cost the
    soak itself hundreds of MB), for the overall figures."""

    def __init__(self) -> None:
        self._current: list[float] = []
        self.seen_at: array[float] = array("d")
        self.seconds: array[float] = array("d")

    def add(self, at: float, seconds: float) -> None:
        self._current.append(seconds)
        self.seen_at.append(at)
        self.seconds.append(seconds)

    def take(self) -> dict[str, Any]:
        """This window's count, p50 and p99 (ms); the next window starts empty."""
        current, self._current = self._current, []
        return {
            "n": len(current),
            "p50_ms": _ms(percentile(current, 0.50)),
            "p99_ms": _ms(percentile(current, 0.99)),
        }


def overall(window: Window, since: float) -> dict[str, Any]:
    """Count, p50, p99, p99.9 and max (ms) of the latencies seen at or after `since`."""
    values = [s for at, s in zip(window.seen_at, window.seconds, strict=True) if at >= since]
    return {
        "n": len(values),
        "p50_ms": _ms(percentile(values, 0.50)),
        "p99_ms": _ms(percentile(values, 0.99)),
        "p999_ms": _ms(percentile(values, 0.999)),
        "max_ms": _ms(max(values) if values else None),
    }


def verdict(growths: Sequence[Growth]) -> str:
    """`pass` when every judged process stayed within the tolerance and one at least was
    judged; `fail` when one grew past it; `not judged` when none ran long enough."""
    judged = [g for g in growths if g.ok is not None]
    if not judged:
        return "not judged"
    return "pass" if all(g.ok for g in judged) else "fail"


def _median(values: Iterable[float]) -> float | None:
    got = list(values)
    return statistics.median(got) if got else None


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope (MB per second); None for fewer than two distinct times."""
    if len(points) < 2:
        return None
    mean_t = statistics.fmean(t for t, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / spread


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
