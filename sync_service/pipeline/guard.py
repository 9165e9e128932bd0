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

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sqlalchemy import BigInteger, Integer, Table, Text, bindparam, func, select, true, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from sync_service.db.models import DeadLetterRow, PartitionGuard
from sync_service.db.statements import array_rows
from sync_service.pipeline.batch import Batch, TopicPartition

_LETTERS = DeadLetterRow.__table__
_GUARDS: Table = PartitionGuard.__table__  # type: ignore[assignment]
_CHECKED = array_rows(
    ("topic", "topics", Text),
    ("partition", "partitions", Integer),
    ("end", "ends", BigInteger),
    name="checked",
)
_STORED = (
    select(_GUARDS.c.window_from, _GUARDS.c.paused_at)
    .where(_GUARDS.c.group_id == bindparam("group_id"))
    .where(_GUARDS.c.topic == _CHECKED.c.topic, _GUARDS.c.partition == _CHECKED.c.partition)
    .lateral("stored")
)
_START = func.greatest(
    func.coalesce(_STORED.c.window_from, 0), _CHECKED.c.end - bindparam("window", type_=BigInteger)
)
_KINDS = (
    # Unique (topic, partition, offset): an index range scan of at most `window` rows.
    select(
        _LETTERS.c.kind, func.count().label("count"), func.min(_LETTERS.c.reason).label("reason")
    )
    .where(_LETTERS.c.topic == _CHECKED.c.topic, _LETTERS.c.partition == _CHECKED.c.partition)
    .where(_LETTERS.c.offset >= _START, _LETTERS.c.offset < _CHECKED.c.end)
    .group_by(_LETTERS.c.kind)
    .lateral("kinds")
)
_WINDOWS = (
    select(
        _CHECKED.c.topic,
        _CHECKED.c.partition,
        _STORED.c.paused_at.is_not(None),
        _KINDS.c.kind,
        _KINDS.c.count,
        _KINDS.c.reason,
    )
    .select_from(_CHECKED)
    .outerjoin(_STORED, true())
    .outerjoin(_KINDS, true())
)
"""Per partition checked (arrays `topics`, `partitions`, `ends`): whether the guard holds
it already, and the dead letters of its window by kind (one row of NULLs if none): from
its stored `window_from` (0 if none) or `end - window`, whichever is later, up to `end`."""


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
        it tips over the ratio, now stored as paused. Every partition's window is read in
        one statement, whatever the number of partitions."""
        partitions = sorted({(d.source.topic, d.source.partition) for d in batch.dead})
        if not partitions or self._most >= self._window:
            return []
        rows = await session.execute(
            _WINDOWS,
            {
                "group_id": self._group_id,
                "window": self._window,
                "topics": [t for t, _ in partitions],
                "partitions": [p for _, p in partitions],
                "ends": [batch.next_offsets[tp] for tp in partitions],
            },
        )
        kinds: dict[TopicPartition, list[tuple[str, int, str]]] = {}
        for topic, partition, paused, kind, count, reason in rows:
            found = kinds.setdefault((topic, partition), [])
            if not paused and kind is not None:  # paused: by a batch read before it was stored
                found.append((kind, count, reason))
        trips = []
        for (topic, partition), found in sorted(kinds.items()):
            dead = sum(count for _, count, _ in found)
            if dead <= self._most:
                continue
            kind, _, reason = min(found, key=lambda k: (-k[1], k[0]))
            trip = Trip(topic, partition, dead, self._window, kind, reason)
            await self._pause(session, trip)
            trips.append(trip)
        return trips

    async def _pause(self, session: AsyncSession, trip: Trip) -> None:
        verdict = {
            "paused_at": func.now(),
            "dead": trip.dead,
            "window": trip.window,
            "kind": trip.kind,
            "reason": trip.reason,
        }
        stmt = insert(_GUARDS).values(
            group_id=self._group_id, topic=trip.topic, partition=trip.partition
        )
        await session.execute(
            stmt.values(**verdict).on_conflict_do_update(
                index_elements=["group_id", "topic", "partition"], set_=verdict
            )
        )


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
