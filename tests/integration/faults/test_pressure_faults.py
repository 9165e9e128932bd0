"""The database in the way: a pool of one connection held by a slow statement, and a long
transaction elsewhere on the server that holds the relay's horizon back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.fleet import SYNC_SERVICE, Fleet, Sampler, fleet, service_env, wait_for
from sync_service.config import Settings
from tests.integration.faults.scenario import assert_final, create_all_topics, drained, stream
from tests.integration.relay_helpers import Downstream


async def test_pool_of_one_behind_a_slow_statement_is_retried(
    settings: Settings, logged: AsyncEngine, tmp_path: Path
) -> None:
    """The consumer's only connection is held by a readiness check that waits on a lock
    (up to the lock timeout); each batch's checkout times out meanwhile, and is retried:
    nothing is dead-lettered and nothing is lost."""
    await create_all_topics(settings)
    tight = settings.model_copy(update={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.5})
    flow = stream(events=4_000, rate=400, seed=41)
    sampler = Sampler(logged, settings.group_id)
    stop = asyncio.Event()
    async with (
        Downstream(settings) as downstream,
        fleet(tight, tmp_path, consumers=1, relay=True) as group,
    ):
        consumer = group.replicas[0]
        producing = asyncio.create_task(flow.produce(settings))
        sampling = asyncio.create_task(sampler.run(stop))
        try:
            await wait_for(consumer.ready, 120, "the consumer ready")
            async with logged.connect() as blocker:
                # The gauges' count of dead letters (every 5 s) waits on this lock, up to
                # the lock timeout, on the pool's only connection.
                await blocker.execute(text("LOCK TABLE dead_letters IN ACCESS EXCLUSIVE MODE"))
                await asyncio.sleep(12)
                await blocker.rollback()
            await wait_for(lambda: drained(sampler, flow), 180, "the whole stream stored")
        finally:
            stop.set()
            await asyncio.gather(producing, sampling)
        timeouts = await consumer.metric(
            "sync_transient_failures_total", stage="write batch", kind="TimeoutError"
        )
        assert timeouts, "no batch waited for the pool: the scenario did not happen"
        await assert_final(logged, settings, flow, downstream)


async def test_a_long_transaction_holds_the_relay_back_visibly(
    settings: Settings, logged: AsyncEngine, tmp_path: Path
) -> None:
    """Rows committed after a still-open transaction began are not published (the relay
    reads below the snapshot's xmin only); the gauges and `sync-service offsets` show them
    and the transaction; once it ends they are published at once."""
    await create_all_topics(settings)
    flow = stream(events=3_000, rate=1_000, seed=43)
    sampler = Sampler(logged, settings.group_id)
    stop = asyncio.Event()
    async with (
        Downstream(settings) as downstream,
        fleet(settings, tmp_path, consumers=1, relay=True) as group,
    ):
        await wait_for(lambda: _ready(group), 120, "the consumer and the relay ready")
        sampling = asyncio.create_task(sampler.run(stop))
        async with logged.connect() as holder:
            await holder.execute(text("SELECT pg_current_xact_id()"))  # takes an id, holds xmin
            began = time.monotonic()
            await flow.produce(settings)
            await wait_for(lambda: drained(sampler, flow), 120, "the whole stream stored")
            relay = group.relay
            assert relay is not None
            await wait_for(
                lambda: _positive(relay.metric("sync_outbox_held_back")), 30, "the held-back gauge"
            )
            age = await relay.metric("sync_oldest_transaction_age_seconds")
            assert age is not None
            assert age > 0
            held_s = time.monotonic() - began
            report = await _offsets(settings)
            outbox = report["outbox"]
            assert outbox["held_back"] > 0
            assert outbox["held_by"] is not None
            assert outbox["held_by"]["age_s"] >= held_s - 1
            assert downstream.records == [], "published past an open older transaction"
            await holder.rollback()
        ended = time.monotonic()
        count = await _logged_rows(logged)
        await wait_for(lambda: _at_least(downstream, count), 30, "publishing after the end")
        caught_up_s = time.monotonic() - ended
        stop.set()
        await sampling
        assert caught_up_s < 10, f"published {caught_up_s:.1f} s after the transaction ended"
        await assert_final(logged, settings, flow, downstream)


async def _ready(group: Fleet) -> bool:
    return (
        all([await r.ready() for r in group.replicas])
        and group.relay is not None
        and (await group.relay.metric("sync_relay_active") == 1)
    )


async def _positive(value: object) -> bool:
    got = await value  # type: ignore[misc]
    return got is not None and got > 0


async def _at_least(downstream: Downstream, count: int) -> bool:
    return len(downstream.records) >= count


async def _logged_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(
            (await connection.execute(text("SELECT count(*) FROM faults_outbox_log"))).scalar_one()
        )


async def _offsets(settings: Settings) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        str(SYNC_SERVICE), "offsets", "--json", env=service_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    report: dict[str, Any] = orjson.loads(out)
    return report
