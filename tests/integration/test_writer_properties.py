"""Random valid histories, delivered in any order Kafka allows, through the real BatchWriter
into PostgreSQL: the tables end at the source's state, with one outbox row per change.

No Kafka here: the records are decoded and batched as the consumer would, with positions
that advance per partition, so that every write is fenced and stored as in production.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, target
from sqlalchemy import exc, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.db.models import ConsumerOffset, Order, OutboxEvent, User
from sync_service.events.change import Entity
from sync_service.events.outbound import downstream_event_id
from sync_service.pipeline.batch import BatchBuilder
from sync_service.pipeline.write import BatchWriter
from tests.histories import Scenario, TopicPartition, VersionKey, scenarios

pytestmark = pytest.mark.integration

GROUP = "writer-properties"
TABLES = "users, orders, outbox, pending_changes, dead_letters, consumer_offsets"


@pytest.fixture(scope="module")
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on an engine built as the service builds its own."""
    engine = make_engine(Settings(database_url=database_url))
    yield make_sessionmaker(engine)
    await engine.dispose()


@settings(
    max_examples=25,
    deadline=None,
    # `engine` is per test, not per example: each example empties the tables itself.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios(max_changes=20))
async def test_any_delivery_through_the_writer_ends_at_the_source_state(
    scenario: Scenario, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with engine.begin() as connection:
        await connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    writer = BatchWriter(sessions, GROUP, pending_load_limit=10_000)
    positions: dict[TopicPartition, int | None] = dict.fromkeys(scenario.logs)
    outbox_written = waited = 0
    for number, delivery in enumerate(scenario.batches):
        builder = BatchBuilder(max_events=10_000, max_wait_s=1)
        for record in delivery.records:
            builder.add(record.decoded(), now=0)
        batch = builder.take()
        batch.sweep = delivery.sweep
        try:
            result = await writer.write(batch, dict(positions))
        except exc.IntegrityError as error:  # the deferred email rule, the user foreign key
            pytest.fail(f"batch {number} broke a rule: {error.orig}")
        positions.update(result.next_offsets)
        outbox_written += result.outbox
        waited += result.waiting
    target(float(waited), label="changes that waited")  # steer towards the harder histories

    history = scenario.history
    assert await _tables(engine) == history.final
    assert await _count(engine, "pending_changes") == 0
    assert await _count(engine, "dead_letters") == 0
    assert await _positions(engine) == {tp: len(log) for tp, log in scenario.logs.items()}

    outbox = await _outbox(engine)
    keys: list[VersionKey] = [(e, int(i), v) for e, i, *_, v, _ in outbox]
    assert len(keys) == len(set(keys)) == outbox_written, "a change was applied twice"
    assert set(keys) == set(history.by_version)
    per_aggregate: dict[tuple[Entity, int], list[int]] = defaultdict(list)
    for entity, entity_id, version in keys:
        per_aggregate[(entity, entity_id)].append(version)
    assert all(v == sorted(v) for v in per_aggregate.values()), "out of version order"
    for key, (entity, _id, event_type, event_id, _version, payload) in zip(
        keys, outbox, strict=True
    ):
        source = history.by_version[key]
        op = "deleted" if source.envelope["op"] == "delete" else "upserted"
        assert (event_type, event_id) == (f"{entity}.{op}", downstream_event_id(source.event_id))
        assert payload["data"] == orjson.loads(orjson.dumps(source.after, default=str))


async def _tables(engine: AsyncEngine) -> dict[Entity, dict[int, dict[str, Any]]]:
    async with engine.connect() as connection:
        users = (await connection.execute(select(User.__table__))).mappings()
        orders = (await connection.execute(select(Order.__table__))).mappings()
        return {
            "user": {row["id"]: dict(row) for row in users},
            "order": {row["id"]: dict(row) for row in orders},
        }


async def _count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def _positions(engine: AsyncEngine) -> dict[TopicPartition, int]:
    offsets = ConsumerOffset.__table__
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(offsets.c.topic, offsets.c.partition, offsets.c.next_offset).where(
                offsets.c.group_id == GROUP
            )
        )
        return {(topic, partition): next_offset for topic, partition, next_offset in rows}


async def _outbox(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    outbox = OutboxEvent.__table__
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(
                outbox.c.aggregate_type,
                outbox.c.aggregate_id,
                outbox.c.event_type,
                outbox.c.event_id,
                outbox.c.version,
                outbox.c.payload,
            ).order_by(outbox.c.id)
        )
        return [tuple(row) for row in rows]
