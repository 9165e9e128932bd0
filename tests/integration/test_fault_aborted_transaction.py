"""Fault suite: records of an aborted upstream Kafka transaction are never applied.

An upstream that writes in Kafka transactions leaves the records of an aborted one in
the log, followed by an abort marker; a committed one ends with a commit marker. The
consumer reads `read_committed`, so it never sees the aborted records, and its stored
positions move past them and past the markers, up to the partitions' end offsets.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from tests.factories import encode, key_of, order_event, user_event
from tests.integration.harness import count, create_topics, produce, rows, running, wait_until


async def _transactional(settings: Settings, name: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        transactional_id=f"hostile-{name}-{uuid.uuid4().hex[:8]}",
    )
    await producer.start()
    return producer


async def _send(producer: AIOKafkaProducer, topic: str, events: list[dict[str, Any]]) -> None:
    for event in events:
        await producer.send(topic, value=encode(event), key=key_of(event), partition=0)


async def _end_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    """The log end offsets (markers included) of partition 0 of both topics."""
    reader = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await reader.start()
    try:
        tps = [TopicPartition(settings.users_topic, 0), TopicPartition(settings.orders_topic, 0)]
        return {(tp.topic, tp.partition): n for tp, n in (await reader.end_offsets(tps)).items()}
    finally:
        await reader.stop()


async def _stored(engine: AsyncEngine, settings: Settings) -> dict[tuple[str, int], int]:
    found = await rows(
        engine,
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = :g",
        g=settings.group_id,
    )
    return {(topic, partition): offset for topic, partition, offset in found}


async def test_records_of_an_aborted_transaction_are_never_applied(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=1)
    users = settings.users_topic
    await produce(settings, users, [user_event(1, 1)])  # before: not transactional
    aborting = await _transactional(settings, "aborting")
    committing = await _transactional(settings, "committing")
    try:
        # Interleaved in one partition: the aborted transaction is open while the other
        # one writes and commits, so its records sit between committed ones.
        await aborting.begin_transaction()
        await _send(aborting, users, [user_event(1, 2, name="Aborted"), user_event(2, 1)])
        await committing.begin_transaction()
        await _send(committing, users, [user_event(3, 1), user_event(1, 3, name="Committed")])
        await _send(committing, settings.orders_topic, [order_event(8, 3, 1)])
        await committing.commit_transaction()  # the orders log ends with its marker
        await _send(aborting, users, [user_event(4, 1), user_event(3, 2, name="Aborted")])
        await aborting.abort_transaction()
        # The log ends with an abort marker: nothing but a marker follows the last record.
        await aborting.begin_transaction()
        await _send(aborting, users, [user_event(5, 1)])
        await aborting.abort_transaction()
    finally:
        await aborting.stop()
        await committing.stop()
    end = await _end_offsets(settings)
    assert end == {(users, 0): 11, (settings.orders_topic, 0): 2}  # markers included

    async with running(settings):

        async def caught_up() -> bool:
            return await _stored(engine, settings) == end

        await wait_until(caught_up, what="stored positions at the end offsets, markers included")

    assert await rows(engine, "SELECT id, version, name FROM users ORDER BY id") == [
        (1, 3, "Committed"),
        (3, 1, "User 3"),
    ]
    published = await rows(engine, "SELECT aggregate_id, version FROM outbox ORDER BY id")
    assert sorted(published) == [("1", 1), ("1", 3), ("3", 1), ("8", 1)]
    assert await rows(engine, "SELECT id, user_id FROM orders") == [(8, 3)]
    assert await count(engine, "SELECT count(*) FROM dead_letters") == 0
    assert await count(engine, "SELECT count(*) FROM pending_changes") == 0
    assert await _stored(engine, settings) == end
