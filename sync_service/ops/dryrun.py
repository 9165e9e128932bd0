"""`sync-service replay --dry-run`: what a replay of a range would do, written nowhere.

The range is read with a consumer of its own (no group, read_committed), decoded as the
consumer decodes, and planned by the consumer's planner against the stored rows and
waiting changes, in one read-only transaction. Chunks are planned in order, each against
the rows as the chunks before it would have left them, so the figures are the ones a
replay would produce if nothing else wrote meanwhile.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from sync_service.config import Settings
from sync_service.errors import UserError
from sync_service.events.change import Change, DeadLetter, Entity, Source
from sync_service.ops.offsets import offset_reader
from sync_service.ops.replay import Range, ReplayRequest, check, resolve
from sync_service.pipeline.decode import Limits, change_from_envelope, decode
from sync_service.pipeline.plan import PendingKey, Row, needs, plan
from sync_service.pipeline.write import load_stored
from sync_service.service import connect

CHUNK = 5_000
"""Records planned at once (what a consumer batch holds by default)."""
STALL_S = 30.0
"""How long Kafka may return nothing for a partition before the dry run gives up."""
OUTCOMES = ("applied", "stale", "waiting", "dead_letters")

_PENDING = text(
    """
    SELECT entity, entity_id, envelope, topic, partition, "offset" FROM pending_changes
    WHERE (entity, entity_id) IN (
        SELECT e, i FROM unnest(CAST(:entities AS text[]), CAST(:ids AS bigint[])) AS k(e, i)
        UNION
        SELECT entity, entity_id FROM pending_changes WHERE blocked_by = ANY(:users)
    )
    """
)


@dataclass(slots=True)
class PartitionTally:
    partition: int
    start: int
    stop: int
    entity: Entity
    records: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))


@dataclass(frozen=True, slots=True)
class DryRunReport:
    topic: str
    partitions: list[PartitionTally]

    def total(self) -> dict[str, int]:
        return {o: sum(p.counts[o] for p in self.partitions) for o in OUTCOMES}

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "dry_run": True,
            "partitions": [
                {
                    "partition": p.partition,
                    "from_offset": p.start,
                    "to_offset": p.stop,
                    "records": p.records,
                    "entities": {p.entity: p.counts},
                }
                for p in self.partitions
            ],
            "total": {"records": sum(p.records for p in self.partitions), **self.total()},
        }

    def render(self) -> str:
        header = ("partition", "entity", "range", "records", *OUTCOMES)
        cells = [
            (str(p.partition), p.entity, f"{p.start}-{p.stop}", str(p.records),
             *(str(p.counts[o]) for o in OUTCOMES))
            for p in self.partitions
        ]  # fmt: skip
        total = self.total()
        cells.append(("total", "", "", str(sum(p.records for p in self.partitions)),
                      *(str(total[o]) for o in OUTCOMES)))  # fmt: skip
        widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
        lines = [f"dry run of a replay of {self.topic} (nothing was written)"]
        for row in [header, *cells]:
            lines.append(
                "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                          for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            )  # fmt: skip
        return "\n".join(lines)


async def dry_run(settings: Settings, request: ReplayRequest) -> DryRunReport:
    """Read `request`'s range and say, per partition, how many of its changes would apply,
    are stale, would wait, and how many records would be dead letters."""
    check(request, settings)
    engine = await connect(settings)
    try:
        ranges = await resolve(settings, request)
        entity: Entity = "user" if request.topic == settings.users_topic else "order"
        tallies = {
            r.partition: PartitionTally(r.partition, r.start, r.stop, entity) for r in ranges
        }
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="REPEATABLE READ")
            async with connection.begin() as transaction:
                await connection.execute(text("SET TRANSACTION READ ONLY"))
                planner = _Planner(connection, tallies)
                # Closed on any failure too, so that its Kafka consumer stops at once.
                async with aclosing(_read(settings, request.topic, entity, ranges)) as chunks:
                    async for chunk in chunks:
                        await planner.plan(chunk)
                planner.finish()
                await transaction.rollback()
    finally:
        await engine.dispose()
    return DryRunReport(request.topic, [tallies[r.partition] for r in ranges])


async def _read(
    settings: Settings, topic: str, entity: Entity, ranges: list[Range]
) -> AsyncGenerator[list[Change | DeadLetter], None]:
    """The decoded records of each range, in chunks, in offset order per partition."""
    limits = Limits.of(settings)
    todo = {TopicPartition(topic, r.partition): r for r in ranges if r.stop > r.start}
    if not todo:
        return
    async with offset_reader(settings) as reader:
        reader.assign(list(todo))
        for tp, r in todo.items():
            reader.seek(tp, r.start)
        chunk: list[Change | DeadLetter] = []
        progress = time.monotonic()
        while todo:
            fetched = await reader.getmany(*todo, timeout_ms=500, max_records=CHUNK)
            for tp, records in fetched.items():
                stop = todo[tp].stop if tp in todo else -1
                for record in records:
                    if record.offset < stop:
                        chunk.append(decode(entity=entity, topic=topic, partition=tp.partition,
                                            offset=record.offset, key=record.key,
                                            value=record.value, limits=limits))  # fmt: skip
            for tp in list(todo):
                if await reader.position(tp) >= todo[tp].stop:
                    del todo[tp]
                    progress = time.monotonic()
            if fetched:
                progress = time.monotonic()
            elif time.monotonic() - progress > STALL_S:
                late = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in todo)
                raise UserError(f"Kafka returned nothing for {late} for {STALL_S:.0f}s")
            if len(chunk) >= CHUNK or (chunk and not todo):
                yield chunk
                chunk = []


class _Planner:
    """Plans chunk after chunk as the writer would, keeping in memory what the chunks
    before would have written (rows, waiting changes) instead of writing it."""

    def __init__(self, connection: AsyncConnection, tallies: dict[int, PartitionTally]) -> None:
        self._session = AsyncSession(bind=connection)
        self._connection = connection
        self._tallies = tallies
        self._rows: dict[Entity, dict[int, Row]] = {"user": {}, "order": {}}
        self._email_holders: dict[str, set[int]] = defaultdict(set)
        self._waiting: dict[PendingKey, Change] = {}
        self._loaded: set[tuple[Entity, int]] = set()
        self._outcome: dict[int, tuple[Change, str]] = {}
        """id() of each change read from the range -> its latest outcome."""

    async def plan(self, chunk: list[Change | DeadLetter]) -> None:
        changes = []
        for item in chunk:
            tally = self._tallies[item.source.partition]
            tally.records += 1
            if isinstance(item, DeadLetter):
                tally.counts["dead_letters"] += 1
            else:
                changes.append(item)
                self._outcome[id(item)] = (item, "applied")
        await self._load_waiting(changes)
        pending = list(self._waiting.values())
        stored = await self._stored([*pending, *changes])
        result = plan(changes, pending, stored)
        for applied in result.applied:
            self._mark(applied.change, "applied")
        for change in result.stale:
            self._mark(change, "stale")
        for key in result.unpend:
            self._waiting.pop(key, None)
        for waiting in result.wait:
            self._mark(waiting.change, "waiting")
            c = waiting.change
            self._waiting[(c.entity, c.id, c.version)] = c
        for entity, rows in result.rows.items():
            for row in rows:
                self._remember(entity, row)

    def finish(self) -> None:
        for change, outcome in self._outcome.values():
            self._tallies[change.source.partition].counts[outcome] += 1

    def _mark(self, change: Change, outcome: str) -> None:
        if id(change) in self._outcome:  # a change read from the range, not one stored
            self._outcome[id(change)] = (change, outcome)

    async def _load_waiting(self, changes: Iterable[Change]) -> None:
        """The stored waiting changes of the chunk's entities and of those waiting for its
        users, whole entities, once each."""
        keys = {(c.entity, c.id) for c in changes} - self._loaded
        users = sorted({c.id for c in changes if c.entity == "user"})
        if not keys and not users:
            return
        found = await self._connection.execute(
            _PENDING,
            {"entities": [e for e, _ in keys], "ids": [i for _, i in keys], "users": users},
        )
        returned = set()
        for entity, entity_id, envelope, topic, partition, offset in found:
            if (entity, entity_id) in self._loaded:  # settled in memory since
                continue
            returned.add((entity, entity_id))
            change = change_from_envelope(entity, envelope, Source(topic, partition, offset))
            self._waiting.setdefault((change.entity, change.id, change.version), change)
        self._loaded |= keys | returned

    async def _stored(self, changes: list[Change]) -> dict[Entity, dict[int, Row]]:
        """The rows `plan` needs: the database's, overlaid with what earlier chunks wrote."""
        stored = await load_stored(self._session, changes)
        wanted = needs(changes)
        users, orders = stored["user"], stored["order"]
        for user_id in list(users):
            if user_id in self._rows["user"]:
                users[user_id] = self._rows["user"][user_id]
        for user_id in wanted.user_ids:
            if user_id in self._rows["user"]:
                users[user_id] = self._rows["user"][user_id]
        for email in wanted.emails:
            for holder in self._email_holders.get(email, ()):
                users[holder] = self._rows["user"][holder]
        for order_id in wanted.order_ids:
            if order_id in self._rows["order"]:
                orders[order_id] = self._rows["order"][order_id]
        return stored

    def _remember(self, entity: Entity, row: Row) -> None:
        if entity == "user":
            before = self._rows["user"].get(row["id"])
            if before is not None and before["email"] is not None:
                self._email_holders[before["email"]].discard(row["id"])
            if row["email"] is not None and row["deleted_at"] is None:
                self._email_holders[row["email"]].add(row["id"])
        self._rows[entity][row["id"]] = row
