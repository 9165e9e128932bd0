"""Watching a drain from outside: the stored positions, the waiting changes and the relay's
committed position, polled until the work is done, the service exits or nothing moves.

Invariant: "done" is what PostgreSQL and Kafka show (stored positions at the end offsets,
nothing waiting, no outbox row after the relay's committed position), never the
service's word.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.progress import say
from bench.service.process import ServiceProcess
from sync_service.config import Settings
from sync_service.ops.offsets import offset_reader, partition_bounds, partition_counts
from sync_service.relay.position import START, Position, decode_position

POLL_S = 0.1
STALL_S = 120.0
"""No stored position and no relay position moved for this long: the run has failed."""
PROGRESS_EVERY_S = 5.0


class RelayTail:
    """Follows the relay's committed position (read_committed, from the topic's start)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._key = settings.relay_transactional_id.encode()
        self.position: Position = START
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=50,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        tp = TopicPartition(self._settings.relay_position_topic, 0)
        self._consumer.assign([tp])
        await self._consumer.seek_to_beginning(tp)
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            fetched = await self._consumer.getmany(timeout_ms=200)
            for records in fetched.values():
                for record in records:
                    if record.key == self._key and record.value is not None:
                        self.position = decode_position(record.value)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


async def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """The read_committed end offset of every partition of `topics`."""
    settings = Settings(kafka_bootstrap=bootstrap)
    counts = await partition_counts(settings, topics)
    async with offset_reader(settings) as reader:
        bounds = await partition_bounds(reader, [(t, p) for t in topics for p in range(counts[t])])
    return {tp: b.end for tp, b in bounds.items()}


@dataclass(frozen=True)
class Progress:
    consumed: int
    """Records whose batch committed: the sum of the stored positions."""
    waiting: bool
    dead_letters: int


async def progress(engine: AsyncEngine, group_id: str) -> Progress:
    query = text(
        "SELECT (SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = :g),"
        " EXISTS (SELECT 1 FROM pending_changes), (SELECT count(*) FROM dead_letters)"
    )
    async with engine.connect() as connection:
        consumed, waiting, dead = (await connection.execute(query, {"g": group_id})).one()
    return Progress(int(consumed), bool(waiting), int(dead))


async def published_all(engine: AsyncEngine, position: Position) -> bool:
    """No outbox row sorts after the relay's committed position."""
    query = text("SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE (txid, id) > (:t, :i))")
    async with engine.connect() as connection:
        return bool(await connection.scalar(query, {"t": position.txid, "i": position.id}))


@dataclass
class Timeline:
    """`time.monotonic()` marks of a watched run, and the records stored at the first."""

    first_commit: float | None = None
    consumed_at_first: int = 0
    consumed_all: float | None = None
    done: float | None = None
    problem: str | None = None


async def watch(
    service: ServiceProcess,
    engine: AsyncEngine,
    tail: RelayTail,
    total: int,
    label: str,
) -> Timeline:
    """Poll until every one of `total` records is stored, nothing waits and the relay has
    published every outbox row; or the service exits, or nothing moves for `STALL_S`."""
    timeline = Timeline()
    group = service.run.settings.group_id
    last_move = last_print = time.monotonic()
    last_seen: tuple[int, Position] = (-1, START)
    while True:
        now = time.monotonic()
        if service.exit_code() is not None:
            timeline.problem = service.exited()
            return timeline
        seen = await progress(engine, group)
        if timeline.first_commit is None and seen.consumed > 0:
            timeline.first_commit, timeline.consumed_at_first = now, seen.consumed
        if seen.consumed >= total and not seen.waiting:
            timeline.consumed_all = timeline.consumed_all or now
            if await published_all(engine, tail.position):
                timeline.done = now
                return timeline
        if (seen.consumed, tail.position) != last_seen:
            last_seen, last_move = (seen.consumed, tail.position), now
        elif now - last_move > STALL_S:
            timeline.problem = (
                f"stalled: {seen.consumed:,} of {total:,} records stored, "
                f"waiting changes: {seen.waiting}; see {service.logs}"
            )
            return timeline
        if now - last_print >= PROGRESS_EVERY_S:
            last_print = now
            say(f"{label}: {seen.consumed:,} / {total:,} records stored")
        await asyncio.sleep(POLL_S)
