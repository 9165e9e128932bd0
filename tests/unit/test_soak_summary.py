"""The soak's arithmetic: each process judged on its own growth after its own warm-up, a
restart is another process, recovery after a fault, latencies timed by stored positions."""

from __future__ import annotations

import pytest

from bench.soak.load import CommitClock, DownstreamClock
from bench.soak.summary import (
    GROWTH_TOLERANCE,
    Window,
    growth,
    overall,
    percentile,
    processes,
    recovery_s,
    verdict,
)


def _flat(
    mb: float, until_s: float, every_s: float = 5.0, start_s: float = 0.0
) -> list[tuple[float, float]]:
    return [(start_s + i * every_s, mb) for i in range(int((until_s - start_s) / every_s) + 1)]


def test_percentile_is_the_nearest_rank() -> None:
    assert percentile([0.5, 0.1, 0.4, 0.2, 0.3], 0.5) == 0.3
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile([], 0.99) is None


def test_a_warm_up_climb_is_not_growth_but_a_climb_after_it_is() -> None:
    # Climbs from 50 to 100 MB in its first 5 minutes, then holds with a little noise.
    series = [
        (t, min(100.0, 50.0 + t / 6.0) + (1.0 if t % 10 else -1.0)) for t in range(0, 1800, 5)
    ]
    held = growth("consume-1#10", series, warmup_s=300.0)
    assert held.judged
    assert held.warm_mb == pytest.approx(100.0, abs=1.0)
    assert held.ok is True
    assert abs(held.slope_mb_per_hour or 0.0) < 1.0

    # The same, then 1 MB a minute after the warm-up: 25 MB (25%) by the end.
    leaking = [(t, mb + max(0.0, t - 300.0) / 60.0) for t, mb in series]
    grew = growth("consume-1#10", leaking, warmup_s=300.0)
    assert grew.ok is False
    assert grew.growth_mb == pytest.approx(24.0, abs=1.5)
    assert grew.slope_mb_per_hour == pytest.approx(60.0, rel=0.05)
    assert verdict([held, grew]) == "fail"
    assert verdict([held]) == "pass"


def test_growth_within_the_tolerance_passes_and_just_past_it_fails() -> None:
    warm = _flat(100.0, 400.0)
    within = [*warm, *_flat(100.0 * (1 + GROWTH_TOLERANCE) - 0.5, 900.0, start_s=405.0)]
    past = [*warm, *_flat(100.0 * (1 + GROWTH_TOLERANCE) + 0.5, 900.0, start_s=405.0)]
    assert growth("relay#1", within, warmup_s=300.0).ok is True
    assert growth("relay#1", past, warmup_s=300.0).ok is False


def test_a_process_too_short_lived_after_its_warm_up_is_not_judged() -> None:
    short = growth("consume-1#11", _flat(80.0, 360.0, start_s=120.0), warmup_s=300.0)
    assert not short.judged
    assert short.ok is None
    assert verdict([short]) == "not judged"


def test_a_restart_is_another_process_with_its_own_warm_up() -> None:
    def sample(t: float, pid: int, mb: float) -> dict[str, object]:
        return {"t": t, "processes": {"consume-1": {"pid": pid, "rss_mb": mb}}}

    samples = [sample(0.0, 7, 90.0), sample(5.0, 7, 95.0), sample(7.0, 7, 0.0)]
    samples.append(sample(10.0, 8, 40.0))
    samples.append({"t": 15.0, "processes": {"consume-1": {"pid": 8, "rss_mb": None}}})
    assert processes(samples) == {
        "consume-1#7": [(0.0, 90.0), (5.0, 95.0)],
        "consume-1#8": [(10.0, 40.0)],
    }


def test_recovery_is_when_the_lag_is_back_to_its_level_after_the_fault_ended() -> None:
    lags = [(float(t), 500) for t in range(0, 600, 5)]
    lags += [(600.0, 20_000), (605.0, 45_000), (610.0, 30_000), (615.0, 900), (620.0, 400)]
    # Before: 500 (twice that is 1,000); back under it at 615 s, 15 s after it began.
    assert recovery_s(lags, fault_at=600.0, fault_end=602.0, floor=200) == 15.0
    # A sample under the level before the fault ended does not count.
    assert recovery_s(lags, fault_at=600.0, fault_end=618.0, floor=200) == 20.0
    assert recovery_s(lags[:-2], fault_at=600.0, fault_end=602.0, floor=200) is None


def test_windows_give_each_sample_its_own_latencies_and_the_run_all_of_them() -> None:
    window = Window()
    for i in range(100):
        window.add(float(i), (i + 1) / 1000.0)
    first = window.take()
    assert first == {"n": 100, "p50_ms": 50.0, "p99_ms": 99.0}
    assert window.take() == {"n": 0, "p50_ms": None, "p99_ms": None}
    assert overall(window, since=90.0)["n"] == 10
    assert overall(window, since=0.0)["max_ms"] == 100.0


def test_a_commit_is_timed_when_the_stored_position_passes_the_offset() -> None:
    window = Window()
    clock = CommitClock(window)
    for offset in range(5):
        clock.sent(("t", 0), offset, at=10.0 + offset)
    clock.sent(("t", 1), 0, at=10.0)

    assert clock.committed({("t", 0): 3}, now=20.0) == 3  # offsets 0, 1, 2
    assert clock.waiting() == 3
    assert clock.committed({("t", 0): 3, ("t", 1): 1}, now=21.0) == 1
    assert window.take()["n"] == 4
    assert list(window.seconds) == [10.0, 9.0, 8.0, 11.0]


def test_downstream_keeps_a_duplicates_first_send_and_forgets_what_never_comes() -> None:
    window = Window()
    clock = DownstreamClock(window)
    clock.sent("a", 1.0)
    clock.sent("a", 2.0)  # a duplicate: still timed from the first send
    clock.sent("b", 3.0)  # a stale change: never published
    clock.seen({"a": 4.0, "unknown": 4.0})
    assert list(window.seconds) == [3.0]
    clock.forget(before=10.0)
    assert clock.forgotten == 1
