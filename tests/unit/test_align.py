"""The aligner releases records oldest first across partitions, keeps each partition's
offset order, loses and doubles nothing, and holds records back only while a partition
that is behind has nothing buffered, and never longer than its limit."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from sync_service.pipeline.align import Aligner

A, B = ("users", 0), ("orders", 0)


@dataclass(frozen=True)
class R:
    offset: int
    timestamp: int


def stream(*timestamps: int) -> list[R]:
    return [R(offset, ts) for offset, ts in enumerate(timestamps)]


def test_records_leave_oldest_first_across_partitions() -> None:
    aligner: Aligner[R] = Aligner(max_hold_s=1.0)
    aligner.add(A, stream(1, 5, 9))
    aligner.add(B, stream(2, 3, 10))
    out = aligner.release(10, behind=[], now=0.0)
    assert [(tp, r.timestamp) for tp, r in out] == [
        (A, 1), (B, 2), (B, 3), (A, 5), (A, 9), (B, 10)
    ]  # fmt: skip
    assert len(aligner) == 0


def test_newer_records_wait_while_a_partition_behind_has_none_buffered() -> None:
    aligner: Aligner[R] = Aligner(max_hold_s=1.0)
    aligner.add(A, stream(1, 2))
    aligner.add(B, stream(5, 6))
    assert [r.timestamp for _, r in aligner.release(10, behind=[A], now=0.0)] == [1, 2]
    # A sent up to 2 and has more to send: B's 5 may be newer than A's next, so it waits.
    assert aligner.release(10, behind=[A], now=0.5) == []
    aligner.add(A, stream(3, 7))
    assert [r.timestamp for _, r in aligner.release(10, behind=[A], now=0.6)] == [3, 5, 6, 7]


def test_a_hold_ends_after_its_limit() -> None:
    aligner: Aligner[R] = Aligner(max_hold_s=1.0)
    aligner.add(B, stream(5, 6))
    assert aligner.release(10, behind=[A], now=0.0) == []  # A has sent nothing yet
    assert aligner.release(10, behind=[A], now=0.9) == []
    assert [r.timestamp for _, r in aligner.release(10, behind=[A], now=1.0)] == [5, 6]


def test_a_partition_that_is_not_behind_holds_nothing_back() -> None:
    aligner: Aligner[R] = Aligner(max_hold_s=1.0)
    aligner.add(B, stream(5))
    assert [r.timestamp for _, r in aligner.release(10, behind=[], now=0.0)] == [5]


def test_dropped_partitions_are_forgotten() -> None:
    aligner: Aligner[R] = Aligner(max_hold_s=1.0)
    aligner.add(A, stream(1, 2))
    aligner.add(B, stream(3))
    aligner.drop([A])
    assert (len(aligner), aligner.buffered(A)) == (1, 0)
    assert [(tp, r.timestamp) for tp, r in aligner.release(10, behind=[], now=0.0)] == [(B, 3)]


partitions = st.lists(st.lists(st.integers(0, 50), max_size=30).map(sorted), min_size=1, max_size=5)


@given(partitions, st.lists(st.integers(1, 7), min_size=1, max_size=40))
def test_every_record_leaves_once_in_offset_order_and_by_time(
    streams: list[list[int]], limits: list[int]
) -> None:
    aligner: Aligner[R] = Aligner(max_hold_s=1.0)
    for p, timestamps in enumerate(streams):
        aligner.add(("t", p), stream(*timestamps))
    out: list[tuple[tuple[str, int], R]] = []
    total = sum(map(len, streams))
    for i in range(total + 1):
        limit = limits[i % len(limits)]
        released = aligner.release(limit, behind=[], now=0.0)
        assert len(released) == min(limit, total - len(out))
        out += released
    assert len(aligner) == 0
    for p, timestamps in enumerate(streams):
        assert [r.offset for tp, r in out if tp == ("t", p)] == list(range(len(timestamps)))
    assert [r.timestamp for _, r in out] == sorted(ts for s in streams for ts in s)
