"""Rebuild from nothing, against the real Kafka and PostgreSQL: a live target fed by the
consumer; beside it an empty database, `sync-service db upgrade`, a replay of both topics
from their earliest offsets and a consumer pointed at it; the two targets end identical,
row by row (README: "Rebuilding a target from nothing")."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from sync_service.config import Settings
from sync_service.ops.traffic import Traffic, table_checksum
from tests.conftest import Endpoints
from tests.integration.harness import (
    count,
    create_topics,
    positions_reached,
    rows,
    running,
    wait_until,
)
from tests.integration.test_cli import cli

EVENTS = 4_000
PARTITIONS = 3
USERS = (
    "SELECT id, email, name, active, country, created_at, updated_at, version, deleted_at"
    " FROM users ORDER BY id"
)
ORDERS = (
    "SELECT id, user_id, total, currency, status, created_at, updated_at, version, deleted_at"
    " FROM orders ORDER BY id"
)


@pytest.fixture
async def empty_database(endpoints: Endpoints) -> AsyncIterator[str]:
    """A database with nothing in it, not even Alembic's table; dropped afterwards."""
    server = make_url(endpoints.database_url)
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"sync_rebuild_{uuid.uuid4().hex[:10]}"
    async with admin.connect() as connection:
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield server.set(database=name).render_as_string(hide_password=False)
    async with admin.connect() as connection:
        await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await admin.dispose()


async def _produce(settings: Settings, traffic: Traffic) -> int:
    topics = {"user": settings.users_topic, "order": settings.orders_topic}
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=20)
    await producer.start()
    sent = 0
    try:
        for event in traffic.events(EVENTS):
            await producer.send(
                topics[event.entity], event.value, key=event.key, partition=event.partition
            )
            sent += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def _settled(engine: AsyncEngine, settings: Settings, total: int) -> bool:
    waiting = await count(engine, "SELECT count(*) FROM pending_changes")
    return waiting == 0 and await positions_reached(engine, settings, total)


async def test_a_target_rebuilt_from_the_earliest_offsets_equals_the_live_one(
    settings: Settings, engine: AsyncEngine, empty_database: str
) -> None:
    await create_topics(settings, partitions=PARTITIONS)
    traffic = Traffic(seed=12, id_base=uuid.uuid4().int % 10**6 * 10**6, bad_rate=0.005,
                      partitions=PARTITIONS)  # fmt: skip
    total = await _produce(settings, traffic)
    expected = traffic.expected()
    rebuild = settings.model_copy(
        update={"database_url": empty_database, "group_id": f"{settings.group_id}-rebuild"}
    )
    target = create_async_engine(empty_database, poolclass=NullPool)
    try:
        async with running(settings):
            await wait_until(lambda: _settled(engine, settings, total), within=180,
                             what="the live target to consume everything")  # fmt: skip

            # The procedure of README's "Rebuilding a target from nothing", step by step.
            upgraded = await cli(rebuild, "db", "upgrade")
            assert upgraded.code == 0, upgraded.stderr
            assert upgraded.stdout.startswith("schema upgraded from nothing to ")
            for topic in (settings.users_topic, settings.orders_topic):
                replayed = await cli(rebuild, "replay", "--topic", topic, "--all-partitions",
                                     "--from-time", "1970-01-01T00:00:00Z")  # fmt: skip
                assert replayed.code == 0, replayed.stderr
                assert replayed.stdout.splitlines() == [
                    f"{topic}[{p}]: position none -> 0; a running consumer picks this up on"
                    " its next batch"
                    for p in range(PARTITIONS)
                ]
            async with running(rebuild):
                await wait_until(lambda: _settled(target, rebuild, total), within=180,
                                 what="the rebuilt target to consume everything")  # fmt: skip

        live_users, live_orders = await rows(engine, USERS), await rows(engine, ORDERS)
        assert len(live_users) > 100
        assert len(live_orders) > 100
        assert any(u.deleted_at is not None for u in live_users)
        assert await rows(target, USERS) == live_users
        assert await rows(target, ORDERS) == live_orders
        low, high = expected.id_range
        assert await table_checksum(target, (low, high)) == expected.checksum()
        dead = 'SELECT topic, partition, "offset", kind, reason FROM dead_letters ORDER BY 1, 2, 3'
        assert await rows(target, dead) == await rows(engine, dead)
        assert len(await rows(target, dead)) == expected.dead_letters
        actions = await rows(target, "SELECT action, ok FROM operator_actions")
        assert actions == [("replay", True), ("replay", True)]
    finally:
        await target.dispose()
