"""An outage is a few lines, not a flood: a private Kafka broker (never the shared one) is
killed for ~20 s under `sync-service run` with work waiting for the relay, and a private
PostgreSQL is stopped for ~20 s while changes keep arriving. The log says
once that the server is unreachable and why, summarises every `SYNC_LOG_OUTAGE_SUMMARY_S`,
and says once that it is back; aiokafka's own connection errors (dozens a second) are
counted into those lines, not written. Afterwards the service carries on."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from sync_service.config import Settings
from tests.factories import user_event
from tests.integration.harness import count, create_topics, produce, wait_until
from tests.integration.processes import (
    command,
    environment,
    private_kafka,
    private_postgres,
    service,
)
from tests.integration.relay_helpers import create_out_topics, free_port, insert_outbox, outbox_row

OUTAGE_S = 20


@pytest.mark.slow
async def test_a_kafka_outage_is_told_in_a_few_lines(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    async with private_kafka(tmp_path / "kafka", port=24092) as kafka:
        settings = settings.model_copy(
            update={
                "kafka_bootstrap": kafka.bootstrap,
                "http_port": free_port(),
                "log_outage_summary_s": 10.0,
            }
        )
        await create_topics(settings, partitions=3)
        await create_out_topics(settings, partitions=3)
        await produce(settings, settings.users_topic, [user_event(i, 1) for i in range(1, 51)])
        async with service(environment(settings), "run") as running:
            await running.wait_for_line("relay active")
            await running.wait_for_line("assigned 6 partitions")

            async def users(n: int, version: int) -> bool:
                sql = "SELECT count(*) FROM users WHERE version = :v"
                return await count(engine, sql, v=version) == n

            await wait_until(lambda: users(50, 1), within=120, what="the first users")

            down_at = time.monotonic()
            await kafka.stop(kill=True)
            await asyncio.sleep(2)
            # Work for the relay while the broker is away: it must try, fail and retry.
            async with engine.begin() as connection:
                await insert_outbox(connection, [outbox_row("user", 1000 + i, 1) for i in range(5)])
            await asyncio.sleep(OUTAGE_S - 2)
            await kafka.start()
            back = await running.wait_for_line("Kafka reachable again", since=down_at, within=180)
            back_at = time.monotonic()
            during = [line for line in running.stderr.since(down_at) if line]
            during = during[: during.index(back) + 1]

            await produce(settings, settings.users_topic, [user_event(i, 2) for i in range(1, 51)])
            await wait_until(lambda: users(50, 2), within=120, what="the users after the outage")

    print(f"\n{len(during)} lines in {back_at - down_at:.0f}s of outage:\n" + "\n".join(during))
    assert len(during) < 20, "\n".join(during)
    unreachable = [line for line in during if "Kafka unreachable" in line]
    assert len(unreachable) == 1, during
    assert re.search(r'cause="\w+', unreachable[0]), unreachable[0]  # it names the cause
    assert any("Kafka still unreachable" in line for line in during), during
    failures = int(re.search(r"failures=(\d+)", back)[1])  # type: ignore[index]
    assert failures > len(during), back  # what the client tried and was not written
    assert not [line for line in during if " aiokafka" in line and "Unable connect" in line]


@pytest.mark.slow
async def test_a_postgresql_outage_is_told_in_a_few_lines(settings: Settings) -> None:
    """A private PostgreSQL (port 26432) stopped (fast) for ~20 s while changes keep
    arriving: the consumer's and the relay's retries fold into one outage."""
    async with private_postgres(port=26432) as server:
        admin = create_async_engine(server.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        async with admin.connect() as connection:
            await connection.execute(text("CREATE DATABASE logs_outage"))
        await admin.dispose()
        url = make_url(server.url).set(database="logs_outage")
        settings = settings.model_copy(
            update={
                "database_url": url.render_as_string(hide_password=False),
                "http_port": free_port(),
                "log_outage_summary_s": 10.0,
            }
        )
        env = environment(settings)
        migrated = await command(env, "db", "upgrade")
        assert migrated.code == 0, migrated
        engine = create_async_engine(url, poolclass=NullPool)
        await create_topics(settings, partitions=3)
        await create_out_topics(settings, partitions=3)
        await produce(settings, settings.users_topic, [user_event(i, 1) for i in range(1, 51)])

        async def users(n: int, version: int) -> bool:
            sql = "SELECT count(*) FROM users WHERE version = :v"
            return await count(engine, sql, v=version) == n

        try:
            async with service(env, "run") as running:
                await running.wait_for_line("relay active")
                await wait_until(lambda: users(50, 1), within=120, what="the first users")

                down_at = time.monotonic()
                await server.stop()
                await produce(
                    settings, settings.users_topic, [user_event(i, 2) for i in range(1, 51)]
                )
                await asyncio.sleep(OUTAGE_S)
                await server.start()
                back = await running.wait_for_line(
                    "PostgreSQL reachable again", since=down_at, within=180
                )
                back_at = time.monotonic()
                during = [line for line in running.stderr.since(down_at) if line]
                during = during[: during.index(back) + 1]
                await wait_until(lambda: users(50, 2), within=120, what="the users after it")
        finally:
            await engine.dispose()

    print(f"\n{len(during)} lines in {back_at - down_at:.0f}s of outage:\n" + "\n".join(during))
    assert len(during) < 20, "\n".join(during)
    unreachable = [line for line in during if "PostgreSQL unreachable" in line]
    assert len(unreachable) == 1, during
    assert re.search(r'cause="\w+', unreachable[0]), unreachable[0]
    assert any("PostgreSQL still unreachable" in line for line in during), during
    assert not [line for line in during if "failed, retrying" in line], during
