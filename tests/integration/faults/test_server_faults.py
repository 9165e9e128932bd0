"""The servers fail under the running service: a private Kafka broker killed -9 and
started again, a private PostgreSQL restarted with a fast shutdown. Each scenario runs
a server of its own (ports 29092-29093 and 25432), never the shared ones."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from bench.fleet import Fleet, Sampler, fleet, wait_for
from sync_service.config import Settings
from sync_service.db.schema import alembic_config
from tests.integration.faults.scenario import (
    assert_final,
    create_all_topics,
    drained,
    log_outbox,
    stream,
)
from tests.integration.processes import PrivatePostgres, private_kafka, private_postgres
from tests.integration.relay_helpers import Downstream

KAFKA_PORT = 29092
POSTGRES_PORT = 25432


async def _ready(group: Fleet) -> bool:
    relay = group.relay
    return (
        all([await r.ready() for r in group.replicas])
        and relay is not None
        and await relay.metric("sync_relay_active") == 1
    )


async def _published(group: Fleet) -> float:
    assert group.relay is not None
    return await group.relay.metric("sync_outbox_published_total") or 0.0


@pytest.mark.slow
async def test_kafka_killed_mid_stream_and_restarted(
    settings: Settings, logged: AsyncEngine, tmp_path: Path
) -> None:
    async with private_kafka(tmp_path / "kafka", port=KAFKA_PORT) as kafka:
        own = settings.model_copy(update={"kafka_bootstrap": kafka.bootstrap})
        await create_all_topics(own)
        flow = stream(events=8_000, rate=400, seed=53)
        sampler = Sampler(logged, own.group_id)
        stop = asyncio.Event()
        async with (
            Downstream(own) as downstream,
            fleet(own, tmp_path, consumers=1, relay=True) as group,
        ):
            await wait_for(lambda: _ready(group), 120, "the consumer and the relay ready")
            producing = asyncio.create_task(flow.produce(own))
            sampling = asyncio.create_task(sampler.run(stop))
            try:
                await wait_for(lambda: _above(_published(group), 1_000), 60, "publishing")
                await kafka.stop(kill=True)
                stored = sampler.total()
                await asyncio.sleep(8)
                await kafka.start()
                assert not flow.done.is_set(), "the stream ended before the broker came back"
                await wait_for(lambda: drained(sampler, flow), 300, "the whole stream stored")
                assert sampler.total() > stored
            finally:
                stop.set()
                await asyncio.gather(producing, sampling)
            for replica in group.all:
                assert replica.running, f"{replica.name} exited:\n{replica.tail()}"
            await assert_final(logged, own, flow, downstream)


@pytest.fixture
async def private_database(
    settings: Settings,
) -> AsyncIterator[tuple[Settings, PrivatePostgres]]:
    """Settings whose database is on a private cluster (migrated to head), and the cluster."""
    async with private_postgres(port=POSTGRES_PORT) as server:
        name = f"faults_{uuid.uuid4().hex[:8]}"
        admin = create_async_engine(server.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        async with admin.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
        await admin.dispose()
        url = make_url(server.url).set(database=name).render_as_string(hide_password=False)
        await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
        yield settings.model_copy(update={"database_url": url}), server


@pytest.mark.slow
async def test_postgres_restarted_while_the_relay_listens_and_the_consumer_writes(
    private_database: tuple[Settings, PrivatePostgres], tmp_path: Path
) -> None:
    own, server = private_database
    engine = create_async_engine(own.database_url, poolclass=NullPool)
    await log_outbox(engine)
    await create_all_topics(own)
    flow = stream(events=8_000, rate=400, seed=59)
    sampler = Sampler(engine, own.group_id)
    stop = asyncio.Event()
    try:
        async with (
            Downstream(own) as downstream,
            fleet(own, tmp_path, consumers=1, relay=True) as group,
        ):
            await wait_for(lambda: _ready(group), 120, "the consumer and the relay ready")
            producing = asyncio.create_task(flow.produce(own))
            sampling = asyncio.create_task(sampler.run(stop))
            try:
                await wait_for(lambda: _above(_published(group), 1_000), 60, "publishing")
                await server.restart_fast()
                assert not flow.done.is_set(), "the stream ended before the restart"
                await wait_for(lambda: drained(sampler, flow), 300, "the whole stream stored")
            finally:
                stop.set()
                await asyncio.gather(producing, sampling)
            for replica in group.all:
                assert replica.running, f"{replica.name} exited:\n{replica.tail()}"
            retried = [await r.metric("sync_transient_failures_total") for r in group.all]
            assert sum(n or 0 for n in retried) > 0, "no failure seen: the fault did not happen"
            await assert_final(engine, own, flow, downstream)
    finally:
        await engine.dispose()


async def _above(value: object, floor: float) -> bool:
    got = await value  # type: ignore[misc]
    return bool(got > floor)
