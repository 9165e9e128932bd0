"""PostgreSQL stopped for some seconds in the middle of a stream: the service retries with
backoff, dead-letters nothing, loses nothing, and applies everything once it is back.

The database is stopped with `scripts/services pg-stop` (override with the commands in
SYNC_TEST_PG_STOP / SYNC_TEST_PG_START, e.g. for a server the scripts did not start).
"""

from __future__ import annotations

import asyncio
import os
import shlex
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.observability import metrics
from tests.factories import order_event, user_event
from tests.integration.harness import (
    count,
    create_topics,
    produce,
    rows,
    running,
    scalar,
    wait_until,
)

SERVICES = Path(__file__).resolve().parents[2] / "scripts" / "services"


async def _sh(command: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *shlex.split(command), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, f"{command} failed: {output.decode()[-500:]}"


@pytest.mark.slow
async def test_database_outage_mid_stream_loses_nothing(
    settings: Settings, engine: AsyncEngine
) -> None:
    stop_db = os.environ.get("SYNC_TEST_PG_STOP", f"{SERVICES} pg-stop")
    start_db = os.environ.get("SYNC_TEST_PG_START", f"{SERVICES} pg-start")
    await create_topics(settings)
    first = [user_event(i, 1) for i in range(1, 501)]
    during = [order_event(i, i, 1) for i in range(1, 501)]
    after = [user_event(i, 2, name="after") for i in range(1, 501)]
    retries_before = _retries()
    async with running(settings):
        await produce(settings, settings.users_topic, first)

        async def users_in() -> bool:
            return await count(engine, "SELECT count(*) FROM users") == 500

        await wait_until(users_in, what="the first users")
        await engine.dispose()
        await _sh(stop_db)
        try:
            await produce(settings, settings.orders_topic, during)
            await asyncio.sleep(5)  # the service keeps failing to write, and retrying
        finally:
            await _sh(start_db)
        await produce(settings, settings.users_topic, after)

        async def all_in() -> bool:
            counts = await rows(
                engine,
                "SELECT (SELECT count(*) FROM orders),"
                " (SELECT count(*) FROM users WHERE version = 2)",
            )
            return counts == [(500, 500)]

        await wait_until(all_in, within=120, what="everything after the outage")
    assert _retries() > retries_before, "the outage was not noticed: no write was retried"
    assert await scalar(engine, "SELECT count(*) FROM dead_letters") == 0
    assert await scalar(engine, "SELECT count(*) FROM pending_changes") == 0
    assert await scalar(engine, "SELECT count(*) FROM outbox") == 1500
    stored = await scalar(
        engine,
        "SELECT sum(next_offset) FROM consumer_offsets WHERE group_id = :g",
        g=settings.group_id,
    )
    assert stored == 1500


def _retries() -> float:
    return sum(
        sample.value
        for metric in metrics.RETRIES.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
