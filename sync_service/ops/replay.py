"""`sync-service replay`: move a partition's stored position to any offset Kafka still
holds; a running consumer is fenced on its next write and seeks there.

Replaying is safe because applying is idempotent: an event whose version is not above the
stored one changes nothing and writes no outbox row.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.db.models import ConsumerOffset
from sync_service.errors import UserError
from sync_service.ops.offsets import Bounds, offset_reader, partition_bounds, partition_counts
from sync_service.service import connect


async def replay(
    settings: Settings,
    topic: str,
    partition: int,
    from_offset: int | None,
    from_time: datetime | None,
) -> str:
    """Set the stored position of (group, topic, partition) to `from_offset`, or to the
    first record at or after `from_time` (the end offset when none is). Returns one line."""
    inbound = (settings.users_topic, settings.orders_topic)
    if topic not in inbound:
        raise UserError(f"unknown topic {topic!r}: replay works on {inbound[0]} and {inbound[1]}")
    if (from_offset is None) == (from_time is None):
        raise UserError("give exactly one of --from-offset and --from-time")
    engine = await connect(settings)
    try:
        async with offset_reader(settings) as reader:
            count = (await partition_counts(settings, [topic]))[topic]
            if not 0 <= partition < count:
                raise UserError(
                    f"{topic} has partitions 0 to {count - 1}; there is no partition {partition}"
                )
            bounds = (await partition_bounds(reader, [(topic, partition)]))[(topic, partition)]
            if from_time is not None:
                target = await _offset_at(reader, topic, partition, from_time, bounds)
            else:
                assert from_offset is not None
                target = from_offset
        if not bounds.beginning <= target <= bounds.end:
            raise UserError(
                f"offset {target} is outside {topic}[{partition}]: it can be replayed from "
                f"offset {bounds.beginning} to {bounds.end} (the end)"
            )
        before = await _store_position(engine, settings.group_id, topic, partition, target)
    finally:
        await engine.dispose()
    was = "none" if before is None else str(before)
    return (
        f"{topic}[{partition}]: position {was} -> {target}; "
        "a running consumer picks this up on its next batch"
    )


async def _offset_at(
    reader: AIOKafkaConsumer, topic: str, partition: int, when: datetime, bounds: Bounds
) -> int:
    """The offset of the first record at or after `when` (a time without a zone is UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # Kafka reads negative timestamps as "earliest"/"latest" markers: clamp to the epoch.
    millis = max(0, int(when.timestamp() * 1000))
    tp = TopicPartition(topic, partition)
    found = (await reader.offsets_for_times({tp: millis})).get(tp)
    return bounds.end if found is None else int(found.offset)


async def _store_position(
    engine: AsyncEngine, group_id: str, topic: str, partition: int, next_offset: int
) -> int | None:
    """Set the stored next offset; returns the one it replaces (None if none was stored).
    The row lock orders this with a consumer's write: whichever commits second sees the
    other's position (the consumer is then fenced and re-reads)."""
    key = (ConsumerOffset.group_id == group_id, ConsumerOffset.topic == topic,
           ConsumerOffset.partition == partition)  # fmt: skip
    async with engine.begin() as connection:
        before = (
            await connection.execute(
                select(ConsumerOffset.next_offset).where(*key).with_for_update()
            )
        ).scalar_one_or_none()
        stmt = insert(ConsumerOffset).values(
            group_id=group_id, topic=topic, partition=partition, next_offset=next_offset
        )
        await connection.execute(
            stmt.on_conflict_do_update(
                index_elements=["group_id", "topic", "partition"],
                set_={"next_offset": stmt.excluded.next_offset, "updated_at": func.now()},
            )
        )
    return before
