"""kill -9 during a 50k-event stream, several times: after the last restart the target is
exact, every stored position equals its partition's end offset, and no change was
applied (or published to the outbox) twice."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.ops.traffic import Traffic, table_checksum
from tests.integration.harness import as_environment, count, create_topics, rows, wait_until

EVENTS = 50_000
PARTITIONS = 6
KILLS = 5
CLI = Path(sys.executable).with_name("sync-service")


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **as_environment(settings)}


async def _produce(settings: Settings, traffic: Traffic) -> dict[tuple[str, int], int]:
    """Produce the whole history; returns the number of records per topic-partition."""
    topics = {"user": settings.users_topic, "order": settings.orders_topic}
    sent: dict[tuple[str, int], int] = {}
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, linger_ms=20, enable_idempotence=True
    )
    await producer.start()
    try:
        for event in traffic.events(EVENTS):
            topic = topics[event.entity]
            await producer.send(topic, event.value, key=event.key, partition=event.partition)
            sent[(topic, event.partition)] = sent.get((topic, event.partition), 0) + 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def _stored(engine: AsyncEngine, settings: Settings) -> int:
    return await count(
        engine,
        "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = :g",
        g=settings.group_id,
    )


@pytest.mark.slow
async def test_kill_9_mid_stream_loses_nothing_and_applies_nothing_twice(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=PARTITIONS)
    traffic = Traffic(seed=2026, id_base=random.randrange(10**6) * 10**6, partitions=PARTITIONS)
    sent = await _produce(settings, traffic)
    expected = traffic.expected()
    # Batches of 500: many commits to die between, and a stream that outlasts the kills
    # however fast the consumer has become (each run gets one batch and up to 0.8 s).
    env = _env(settings.model_copy(update={"http_port": 0, "batch_max_events": 500}))
    rng = random.Random(7)

    kills = 0
    while kills < KILLS:
        before = await _stored(engine, settings)
        service = await asyncio.create_subprocess_exec(
            str(CLI), "consume", env=env, stderr=asyncio.subprocess.DEVNULL
        )

        async def moved(floor: int = before) -> bool:
            return await _stored(engine, settings) > floor

        await wait_until(moved, within=120, what="the restarted service to write a batch")
        await asyncio.sleep(rng.uniform(0.0, 0.8))  # somewhere inside a later batch
        service.send_signal(signal.SIGKILL)
        await service.wait()
        kills += 1
        assert await _stored(engine, settings) < EVENTS, "the stream ended before the kills"

    service = await asyncio.create_subprocess_exec(
        str(CLI), "consume", env=env, stderr=asyncio.subprocess.DEVNULL
    )

    async def drained() -> bool:
        return await _stored(engine, settings) == EVENTS

    await wait_until(drained, within=300, what="the whole stream")
    service.send_signal(signal.SIGTERM)
    assert await service.wait() == 0

    low, high = expected.id_range
    assert await table_checksum(engine, (low, high)) == expected.checksum()
    positions = await rows(
        engine,
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = :g",
        g=settings.group_id,
    )
    assert {(t, p): n for t, p, n in positions} == sent
    assert await count(engine, "SELECT count(*) FROM pending_changes") == 0
    assert await count(engine, "SELECT count(*) FROM dead_letters") == expected.dead_letters
    published = await count(engine, "SELECT count(*) FROM outbox")
    assert expected.applied_at_least <= published <= expected.applied_at_most
    # Per aggregate, outbox versions rise with the outbox id: nothing re-applied, in order.
    disorder = await count(
        engine,
        "SELECT count(*) FROM (SELECT version <= lag(version) OVER"
        " (PARTITION BY aggregate_type, aggregate_id ORDER BY id) AS back FROM outbox) s"
        " WHERE back",
    )
    assert disorder == 0
