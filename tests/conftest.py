"""Shared fixtures. Unit tests need nothing; integration tests get real services:

1. the endpoints in SYNC_KAFKA_BOOTSTRAP / SYNC_DATABASE_URL when they are set;
2. otherwise, when a Docker engine answers, Kafka and PostgreSQL from testcontainers;
3. otherwise the local ones that `scripts/services up` starts (localhost:9092, :5432).

Each test session gets a database of its own, built by `alembic upgrade head` (the
migrations are what is tested), and each test its own topics and consumer group.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from sync_service.config import Settings

LOCAL_KAFKA = "localhost:9092"
LOCAL_DATABASE = "postgresql+asyncpg://postgres@localhost:5432/sync"


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str
    database_url: str
    """The server's maintenance database; tests create their own next to it."""


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def endpoints() -> Iterator[Endpoints]:
    kafka = os.environ.get("SYNC_KAFKA_BOOTSTRAP")
    database = os.environ.get("SYNC_DATABASE_URL")
    if kafka and database:
        yield Endpoints(kafka, database)
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer
        from testcontainers.postgres import PostgresContainer

        with (
            KafkaContainer("confluentinc/cp-kafka:7.7.1").with_kraft() as kafka_c,
            PostgresContainer("postgres:15", driver="asyncpg") as pg_c,
        ):
            yield Endpoints(kafka_c.get_bootstrap_server(), pg_c.get_connection_url())
        return
    yield Endpoints(kafka or LOCAL_KAFKA, database or LOCAL_DATABASE)


@pytest.fixture(scope="session")
async def database_url(endpoints: Endpoints) -> AsyncIterator[str]:
    """A database of this test session's own, migrated to head."""
    from alembic import command

    from sync_service.db.schema import alembic_config

    server = make_url(endpoints.database_url)
    name = f"sync_test_{uuid.uuid4().hex[:10]}"
    # No pool: a test may restart the server, and the drop below needs a live connection.
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OSError as error:
        pytest.fail(
            f"no PostgreSQL at {server.render_as_string()}: run `scripts/services up` "
            f"(or set SYNC_DATABASE_URL): {error}"
        )
    url = server.set(database=name).render_as_string(hide_password=False)
    import asyncio

    await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
    yield url
    async with admin.connect() as connection:
        await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await admin.dispose()


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the session's database, with every table emptied first."""
    engine = create_async_engine(database_url)
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "TRUNCATE users, orders, outbox, pending_changes, dead_letters,"
                " consumer_offsets, operator_actions RESTART IDENTITY CASCADE"
            )
        )
    yield engine
    await engine.dispose()


@pytest.fixture
async def settings(
    endpoints: Endpoints, database_url: str, engine: AsyncEngine
) -> AsyncIterator[Settings]:
    """Settings with topics, group and relay ids of this test's own (topics deleted after)."""
    run = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka_bootstrap=endpoints.kafka_bootstrap,
        database_url=database_url,
        group_id=f"test-{run}",
        users_topic=f"test.{run}.users",
        orders_topic=f"test.{run}.orders",
        out_users_topic=f"test.{run}.out.users",
        out_orders_topic=f"test.{run}.out.orders",
        relay_transactional_id=f"test-{run}-relay",
        relay_position_topic=f"test.{run}.relay-position",
        http_port=0,
        batch_max_wait_ms=50,
        pending_retry_ms=200,
        retry_initial_ms=50,
        retry_max_ms=1_000,
    )
    yield settings
    await _delete_topics(settings.kafka_bootstrap, f"test.{run}.")


async def _delete_topics(bootstrap: str, prefix: str) -> None:
    """Best effort: a broker that keeps every test's topics restarts ever more slowly."""
    from aiokafka.admin import AIOKafkaAdminClient

    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await client.start()
        doomed = [t for t in await client.list_topics() if t.startswith(prefix)]
        if doomed:
            await client.delete_topics(doomed)
    except Exception:  # the test's verdict stands; only disk space is at stake
        pass
    finally:
        await client.close()
