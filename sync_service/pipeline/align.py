"""Release fetched records oldest first across partitions, so that a backlog drains in
the order its changes happened: an order then rarely arrives before its user (which is
on another topic) and has to wait.

Invariants: within a partition, records leave in offset order; none is released twice
or lost (`drop` aside); across partitions, a record is held back while a partition that
may still deliver an older one has nothing buffered, but never longer than `max_hold_s`.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Collection, Sequence
from typing import Generic, Protocol, TypeVar

TopicPartition = tuple[str, int]


class Record(Protocol):
    """What the aligner reads of a Kafka record."""

    @property
    def offset(self) -> int: ...

    @property
    def timestamp(self) -> int: ...


R = TypeVar("R", bound=Record)


class Aligner(Generic[R]):
    """Per-partition buffers of fetched records, merged by record timestamp."""

    def __init__(self, max_hold_s: float) -> None:
        self._max_hold_s = max_hold_s
        self._buffers: dict[TopicPartition, deque[R]] = {}
        self._last_seen: dict[TopicPartition, int] = {}
        """The newest timestamp fetched per partition: a bound on what it sends next."""
        self._held_since: float | None = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def buffered(self, tp: TopicPartition) -> int:
        buffer = self._buffers.get(tp)
        return len(buffer) if buffer is not None else 0

    def add(self, tp: TopicPartition, records: Sequence[R]) -> None:
        """Buffer `records` of `tp`, fetched in offset order."""
        if not records:
            return
        self._buffers.setdefault(tp, deque()).extend(records)
        self._last_seen[tp] = max(self._last_seen.get(tp, -1), records[-1].timestamp)
        self._count += len(records)

    def drop(self, partitions: Collection[TopicPartition]) -> None:
        """Forget what is buffered for `partitions` (revoked, or about to be re-read)."""
        for tp in partitions:
            self._count -= len(self._buffers.pop(tp, ()))
            self._last_seen.pop(tp, None)

    def release(
        self, limit: int, behind: Collection[TopicPartition], now: float
    ) -> list[tuple[TopicPartition, R]]:
        """Up to `limit` records, oldest first. `behind` are the partitions that have
        records not yet fetched; while one of them has nothing buffered, records newer
        than the last it sent are held back (for at most `max_hold_s`)."""
        waiting_on = set(behind)
        expired = self._held_since is not None and now - self._held_since >= self._max_hold_s
        horizon: float = float("inf")
        if not expired:
            for tp in waiting_on:
                if not self.buffered(tp):
                    horizon = min(horizon, self._last_seen.get(tp, float("-inf")))
        heads = [(buf[0].timestamp, i, tp) for i, (tp, buf) in enumerate(self._buffers.items())
                 if buf]  # fmt: skip
        heapq.heapify(heads)
        out: list[tuple[TopicPartition, R]] = []
        while heads and len(out) < limit:
            timestamp, i, tp = heads[0]
            if timestamp > horizon:
                break
            buffer = self._buffers[tp]
            out.append((tp, buffer.popleft()))
            if buffer:
                heapq.heapreplace(heads, (buffer[0].timestamp, i, tp))
            else:
                heapq.heappop(heads)
                if tp in waiting_on and not expired:  # what it sends next may be older
                    horizon = min(horizon, self._last_seen[tp])
        self._count -= len(out)
        held = bool(heads) and len(out) < limit
        if not held:
            self._held_since = None
        elif self._held_since is None:
            self._held_since = now
        return out
