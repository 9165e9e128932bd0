"""The dead-letter guard: a partition whose last `window` messages held more than
`max_ratio` dead letters stops being consumed until an operator resumes it.

The window is read from `dead_letters` itself (the letters at offsets in
`[next_offset - window, next_offset)`), inside the transaction that stores a batch's
dead letters and positions, and a verdict is stored in `partition_guards` in that same
transaction: so the window and the pause survive any restart or rebalance exactly, and a
batch without dead letters (a healthy stream) costs nothing. Offsets stand for messages;
a transactional upstream's commit markers take offsets too, which only makes the guard
more lenient. A resume moves the window's start to the partition's position, so the
letters that tripped the guard are not counted again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sqlalchemy import Table, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from sync_service.db.models import DeadLetterRow, PartitionGuard
from sync_service.pipeline.batch import Batch, TopicPartition

_LETTERS = DeadLetterRow.__table__
_GUARDS: Table = PartitionGuard.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Trip:
    """Why the guard holds a partition."""

    topic: str
    partition: int
    dead: int
    window: int
    kind: str
    reason: str

    @property
    def ratio(self) -> float:
        return self.dead / self.window

    def describe(self) -> str:
        """One line: the partition, the ratio, the most common reason, what to do."""
        return (
            f"dead-letter guard paused {self.topic}[{self.partition}]: {self.dead} of its last "
            f"{self.window} messages were dead letters ({self.ratio:.2f}), most often "
            f"{self.kind} ({self.reason}); fix the upstream, then run `sync-service dlq "
            f"resume --topic {self.topic} --partition {self.partition}`"
        )


class DeadLetterGuard:
    """Judges each partition that a batch dead-lettered something on."""

    def __init__(self, group_id: str, window: int, max_ratio: float) -> None:
        self._group_id = group_id
        self._window = window
        self._most = max_ratio * window
        """More dead letters than this in a window trip the guard."""

    async def check(self, session: AsyncSession, batch: Batch) -> list[Trip]:
        """After `batch`'s dead letters are inserted (same transaction): the partitions
        it tips over the ratio, now stored as paused."""
        per_partition = Counter((d.source.topic, d.source.partition) for d in batch.dead)
        if not per_partition or self._most >= self._window:
            return []
        partitions = sorted(per_partition)
        stored = await session.execute(
            select(_GUARDS.c.topic, _GUARDS.c.partition, _GUARDS.c.window_from, _GUARDS.c.paused_at)
            .where(_GUARDS.c.group_id == self._group_id)
            .where(tuple_(_GUARDS.c.topic, _GUARDS.c.partition).in_(partitions))
        )
        starts: dict[TopicPartition, int] = {}
        for topic, partition, window_from, paused_at in stored:
            starts[(topic, partition)] = window_from if paused_at is None else -1
        trips = []
        for tp in partitions:
            start = starts.get(tp, 0)
            if start < 0:
                continue  # already paused (a batch read before the pause was stored)
            end = batch.next_offsets[tp]
            trip = await self._judge(session, tp, max(start, end - self._window), end)
            if trip is not None:
                trips.append(trip)
        return trips

    async def _judge(
        self, session: AsyncSession, tp: TopicPartition, start: int, end: int
    ) -> Trip | None:
        # Unique (topic, partition, offset): an index range scan of at most `window` rows.
        kinds = (
            await session.execute(
                select(_LETTERS.c.kind, func.count(), func.min(_LETTERS.c.reason))
                .where(_LETTERS.c.topic == tp[0], _LETTERS.c.partition == tp[1])
                .where(_LETTERS.c.offset >= start, _LETTERS.c.offset < end)
                .group_by(_LETTERS.c.kind)
                .order_by(func.count().desc(), _LETTERS.c.kind)
            )
        ).all()
        dead = sum(count for _, count, _ in kinds)
        if dead <= self._most:
            return None
        kind, _, reason = kinds[0]
        trip = Trip(tp[0], tp[1], dead, self._window, kind, reason)
        verdict = {
            "paused_at": func.now(),
            "dead": dead,
            "window": self._window,
            "kind": kind,
            "reason": reason,
        }
        stmt = insert(_GUARDS).values(group_id=self._group_id, topic=tp[0], partition=tp[1])
        await session.execute(
            stmt.values(**verdict).on_conflict_do_update(
                index_elements=["group_id", "topic", "partition"], set_=verdict
            )
        )
        return trip


async def paused_partitions(
    session: AsyncSession, group_id: str, partitions: Collection[TopicPartition]
) -> dict[TopicPartition, Trip]:
    """Which of `partitions` the guard holds for `group_id`, and why."""
    if not partitions:
        return {}
    rows = await session.execute(
        select(
            _GUARDS.c.topic,
            _GUARDS.c.partition,
            _GUARDS.c.dead,
            _GUARDS.c.window,
            _GUARDS.c.kind,
            _GUARDS.c.reason,
        )
        .where(_GUARDS.c.group_id == group_id, _GUARDS.c.paused_at.is_not(None))
        .where(tuple_(_GUARDS.c.topic, _GUARDS.c.partition).in_(list(partitions)))
    )
    return {
        (topic, partition): Trip(topic, partition, dead or 0, window or 1, kind or "", reason or "")
        for topic, partition, dead, window, kind, reason in rows
    }


def guard_check(held: Iterable[Trip]) -> str | None:
    """`/readyz`'s word on the guard: None while it holds nothing."""
    paused = [
        f"{t.topic}[{t.partition}] paused by the dead-letter guard ({t.dead} of {t.window} "
        f"dead letters, most often {t.kind})"
        for t in sorted(held, key=lambda t: (t.topic, t.partition))
    ]
    return "; ".join(paused) + ": `sync-service dlq resume`" if paused else None
