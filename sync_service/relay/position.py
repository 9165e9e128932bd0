"""The relay's position: the (txid, id) of the last outbox row it published.

It is stored only in Kafka, in the same transaction as the events it covers, so what a
read_committed reader finds there is exactly what downstream consumers can see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from sync_service.config import Settings
from sync_service.connections import kafka
from sync_service.kafka import ensure_topics

# Compacted: only the last position per key matters. Segments roll every 10 minutes so
# that the log cleaner can actually drop the superseded ones.
POSITION_TOPIC_CONFIG = {"cleanup.policy": "compact", "segment.ms": "600000"}
_FIRST_WINDOW = 1_000
"""Offsets read back from the end first: the latest position is almost always there."""


class Position(NamedTuple):
    """An outbox row's place in commit-safe order; rows after it are not published yet."""

    txid: int
    id: int


START = Position(0, 0)


def encode_position(position: Position) -> bytes:
    return orjson.dumps({"txid": position.txid, "id": position.id})


def decode_position(value: bytes) -> Position:
    fields = orjson.loads(value)
    return Position(int(fields["txid"]), int(fields["id"]))


def latest(records: Iterable[Any], key: bytes, end: int) -> Position | None:
    """The last position stored under `key` among `records` before offset `end`."""
    found = None
    for record in records:
        if record.offset < end and record.key == key and record.value is not None:
            found = decode_position(record.value)
    return found


async def ensure_position_topic(settings: Settings) -> None:
    """Create the compacted, single-partition position topic if it is missing."""
    await ensure_topics(
        settings,
        {settings.relay_position_topic: 1},
        {settings.relay_position_topic: POSITION_TOPIC_CONFIG},
    )


async def read_position(settings: Settings, timeout_s: float = 30.0) -> Position:
    """The last committed position of this relay's transactional id (START if none).

    Call it only after the transactional producer has started: its initialisation
    finishes or aborts whatever the previous holder of the id left open, so nothing
    can still commit behind what is read here."""
    consumer = kafka.consumer(
        settings, group_id=None, enable_auto_commit=False, isolation_level="read_committed"
    )
    try:
        await kafka.start(consumer, settings)
        return await asyncio.wait_for(_read(consumer, settings), timeout=timeout_s)
    finally:
        await consumer.stop()


async def _read(consumer: AIOKafkaConsumer, settings: Settings) -> Position:
    tp = TopicPartition(settings.relay_position_topic, 0)
    key = settings.relay_transactional_id.encode()
    consumer.assign([tp])
    first = (await consumer.beginning_offsets([tp]))[tp]
    end = (await consumer.end_offsets([tp]))[tp]  # the last stable offset: read_committed
    window = _FIRST_WINDOW
    # Scan back from the end in growing windows: the uncompacted tail can be long, and
    # other relays (other transactional ids) may share the topic.
    while end > first:
        start = max(first, end - window)
        consumer.seek(tp, start)
        found: Position | None = None
        while await consumer.position(tp) < end:
            fetched = await consumer.getmany(tp, timeout_ms=500)
            last = latest(fetched.get(tp, []), key, end)
            if last is not None:
                found = last
        if found is not None:
            return found
        end, window = start, window * 4
    return START
