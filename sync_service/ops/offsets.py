"""`sync-service offsets`: per inbound partition, the position stored in PostgreSQL against
Kafka's read_committed end offset, and what waits in the database behind them.

Lag counts the records the consumer would still read: from the stored position (the
beginning where none is stored, or where retention removed it) to the end offset.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.connections import kafka
from sync_service.db.models import ConsumerOffset
from sync_service.errors import UserError
from sync_service.kafka import quiet_connect_errors, require_topics, unreachable
from sync_service.ops.stats import Backlogs, backlogs
from sync_service.retry import describe
from sync_service.service import connect

TP = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Bounds:
    """The offsets a partition can be read from: `beginning` up to (excluding) `end`."""

    beginning: int
    end: int


@dataclass(frozen=True, slots=True)
class PartitionOffsets:
    topic: str
    partition: int
    position: int | None
    """The stored next offset; None until the consumer first writes this partition."""
    bounds: Bounds
    replay: tuple[int, int] | None = None
    """A bounded replay under way: its end, and the offset the partition then resumes at."""

    @property
    def lag(self) -> int:
        start = self.bounds.beginning if self.position is None else self.position
        start = max(start, self.bounds.beginning)
        if self.replay is not None:  # the rest of the range, then from where it resumes
            end, resume = self.replay
            return max(0, end - start) + max(0, self.bounds.end - resume)
        return max(0, self.bounds.end - start)


@dataclass(frozen=True, slots=True)
class OffsetsReport:
    group: str
    partitions: list[PartitionOffsets]
    backlogs: Backlogs

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    def as_json(self) -> dict[str, Any]:
        figures = self.backlogs
        return {
            "group": self.group,
            "partitions": [
                {
                    "topic": p.topic,
                    "partition": p.partition,
                    "position": p.position,
                    "beginning": p.bounds.beginning,
                    "end": p.bounds.end,
                    "lag": p.lag,
                    **(
                        {"replay_end": p.replay[0], "resume_offset": p.replay[1]}
                        if p.replay is not None
                        else {}
                    ),
                }
                for p in self.partitions
            ],
            "lag": self.lag,
            "waiting": {
                "changes": figures.pending,
                "oldest_age_s": _age_s(figures, figures.pending_oldest),
            },
            "dead_letters": {"not_redriven": figures.dead_letters},
            "outbox": {
                "backlog": figures.outbox,
                "oldest_age_s": _age_s(figures, figures.outbox_oldest),
                "held_back": figures.outbox_held,
                "held_by": None
                if figures.horizon is None or not figures.outbox_held
                else {
                    "pid": figures.horizon.pid,
                    "application_name": figures.horizon.application,
                    "state": figures.horizon.state,
                    "age_s": round(figures.horizon.age_s, 3),
                },
            },
        }

    def render(self) -> str:
        header = ("topic", "partition", "position", "end", "lag")
        cells = [
            (p.topic, str(p.partition), _or_dash(p.position), str(p.bounds.end), str(p.lag))
            for p in self.partitions
        ]
        widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
        lines = [f"consumer group {self.group}"]
        for row in [header, *cells]:
            lines.append(
                "  ".join(
                    cell.ljust(width) if i == 0 else cell.rjust(width)
                    for i, (cell, width) in enumerate(zip(row, widths, strict=True))
                ).rstrip()
            )
        lines += [
            f"replay under way: {p.topic}[{p.partition}] to offset {p.replay[0]}, then on "
            f"from {p.replay[1]}"
            for p in self.partitions
            if p.replay is not None
        ]
        figures = self.backlogs
        lines += [
            f"total lag: {self.lag}",
            f"waiting changes: {figures.pending}{_oldest(figures, figures.pending_oldest)}",
            f"dead letters not re-driven: {figures.dead_letters}",
            f"outbox backlog: {figures.outbox}{_oldest(figures, figures.outbox_oldest)}",
        ]
        if figures.outbox_held and figures.horizon is not None:
            h = figures.horizon
            lines.append(
                f"outbox held back: {figures.outbox_held} rows wait for a transaction open"
                f" {format_age(h.age_s)} (pid {h.pid}, {h.application or 'no application_name'},"
                f" {h.state}); the relay publishes them once it ends"
            )
        return "\n".join(lines)


async def read_offsets(settings: Settings) -> OffsetsReport:
    """The positions, end offsets and backlogs of `settings`' group and inbound topics."""
    topics = [settings.users_topic, settings.orders_topic]
    engine = await connect(settings)
    try:
        async with offset_reader(settings) as reader:
            counts = await partition_counts(settings, topics)
            partitions = [(t, p) for t in topics for p in range(counts[t])]
            bounds = await partition_bounds(reader, partitions)
        stored = await stored_positions(engine, settings.group_id, partitions)
        replays = await replays_under_way(engine, settings.group_id)
        figures = await backlogs(engine)
    finally:
        await engine.dispose()
    return OffsetsReport(
        settings.group_id,
        [
            PartitionOffsets(t, p, stored.get((t, p)), bounds[(t, p)], replays.get((t, p)))
            for t, p in partitions
        ],
        figures,
    )


@contextlib.asynccontextmanager
async def offset_reader(settings: Settings) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer outside any group, for offset lookups only. It reads with
    read_committed, so end offsets are last stable offsets: what the service can read."""
    with quiet_connect_errors():
        consumer = kafka.consumer(
            settings,
            enable_auto_commit=False,
            isolation_level="read_committed",
            request_timeout_ms=10_000,
        )
        try:
            await kafka.start(consumer, settings)
        except (KafkaError, OSError) as error:
            await consumer.stop()
            raise unreachable(settings, error) from None
        try:
            yield consumer
        except (KafkaError, OSError) as error:
            raise UserError(
                f"Kafka at {settings.kafka_bootstrap} failed to answer: {describe(error)}"
            ) from None
        finally:
            await consumer.stop()


async def partition_counts(settings: Settings, topics: Sequence[str]) -> dict[str, int]:
    """The partition count of each topic (a one-line error for one that is missing)."""
    with quiet_connect_errors():
        return await require_topics(settings, topics)


async def partition_bounds(reader: AIOKafkaConsumer, partitions: Sequence[TP]) -> dict[TP, Bounds]:
    """Beginning and end offsets of existing `partitions` (lookups of a missing one hang)."""
    tps = [TopicPartition(t, p) for t, p in partitions]
    beginning = await reader.beginning_offsets(tps)
    end = await reader.end_offsets(tps)
    return {(tp.topic, tp.partition): Bounds(beginning[tp], end[tp]) for tp in tps}


async def stored_positions(
    engine: AsyncEngine, group_id: str, partitions: Sequence[TP]
) -> dict[TP, int]:
    """The next offsets `group_id` has stored for `partitions`."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(ConsumerOffset.topic, ConsumerOffset.partition, ConsumerOffset.next_offset)
            .where(ConsumerOffset.group_id == group_id)
            .where(tuple_(ConsumerOffset.topic, ConsumerOffset.partition).in_(partitions))
        )
        return {(t, p): n for t, p, n in rows}


async def replays_under_way(engine: AsyncEngine, group_id: str) -> dict[TP, tuple[int, int]]:
    """The bounded replays of `group_id` not yet ended: (end, resume offset) by partition."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(ConsumerOffset.topic, ConsumerOffset.partition, ConsumerOffset.replay_end,
                   ConsumerOffset.resume_offset)
            .where(ConsumerOffset.group_id == group_id)
            .where(ConsumerOffset.replay_end.is_not(None))
        )  # fmt: skip
        return {
            (t, p): (end, resume)
            for t, p, end, resume in rows
            if end is not None and resume is not None
        }


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _age_s(figures: Backlogs, then: datetime | None) -> float | None:
    return None if then is None else round(figures.age(then), 3)


def _oldest(figures: Backlogs, then: datetime | None) -> str:
    if then is None:
        return ""
    return f" (oldest {format_age(figures.age(then))} old)"


def format_age(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`, `3d04h`: two units are enough to act on."""
    whole = max(0, int(seconds))
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
