"""Group changes under traffic: a rebalance storm with a replica paused past its session
timeout, and a rolling restart by SIGTERM with every SIGTERM sent mid-batch."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.fleet import (
    Fleet,
    Sampler,
    assigned_partitions,
    fleet,
    in_transaction,
    pause_mid_batch,
    wait_for,
)
from sync_service.config import Settings
from tests.integration.faults.scenario import assert_final, create_all_topics, drained, stream
from tests.integration.relay_helpers import Downstream

PAUSE_S = 15.0
"""At least: past the session timeout (10 s) and the idle-in-transaction timeout (5 s)."""
OTHERS_MAY_STOP_S = 8.0
"""The longest the other replicas' partitions may stand still meanwhile (0.4 s measured
by bench.groups on a loaded machine; 18 s before the idle and lock timeouts)."""


async def _all_ready(group: Fleet) -> bool:
    return all([await r.ready() for r in group.replicas])


@pytest.mark.slow
async def test_rebalance_storm_with_a_paused_replica(
    settings: Settings, logged: AsyncEngine, tmp_path: Path
) -> None:
    await create_all_topics(settings)
    flow = stream(events=24_000, rate=500, seed=31)
    sampler = Sampler(logged, settings.group_id)
    stop = asyncio.Event()
    async with Downstream(settings) as downstream, fleet(settings, tmp_path, relay=True) as group:
        await wait_for(lambda: _all_ready(group), 120, "3 ready replicas")
        producing = asyncio.create_task(flow.produce(settings))
        sampling = asyncio.create_task(sampler.run(stop))
        try:
            await asyncio.sleep(2)

            # One replica stops dead inside a batch transaction, past its session timeout.
            paused = group.replicas[0]
            owned = assigned_partitions(paused.log)
            await pause_mid_batch(logged, paused.pid)
            paused_at = time.monotonic()
            await asyncio.sleep(PAUSE_S)
            # It wakes behind a new owner: only once another replica wrote to its partitions.
            await wait_for(
                lambda: _taken_over(sampler, owned, paused_at), 60, "its partitions taken over"
            )
            paused.signal(signal.SIGCONT)
            others = set(flow.sent) - owned
            others_stop = sampler.longest_stop(paused_at, time.monotonic(), others)
            assert others_stop < OTHERS_MAY_STOP_S, f"the others stood still {others_stop:.1f} s"

            # Then kill -9 and replace one of the others every few seconds.
            rng = random.Random(5)
            for _ in range(4):
                assert not flow.done.is_set(), "the stream ended before the storm"
                index = rng.choice([1, 2])
                await group.replicas[index].kill()
                await group.replace(index)
                await asyncio.sleep(rng.uniform(3, 5))
            await wait_for(lambda: drained(sampler, flow), 300, "the whole stream stored")
        finally:
            stop.set()
            await asyncio.gather(producing, sampling)
        # Woken, the paused replica found its transaction ended and its partitions
        # moved: it was fenced and re-read them.
        assert "positions moved under this consumer" in paused.log.read_text()
        await assert_final(logged, settings, flow, downstream)


async def _taken_over(sampler: Sampler, partitions: set[tuple[str, int]], since: float) -> bool:
    return any(at > since for at in sampler.advances(partitions))


@pytest.mark.slow
async def test_rolling_restart_by_sigterm_mid_batch(
    settings: Settings, logged: AsyncEngine, tmp_path: Path
) -> None:
    await create_all_topics(settings)
    flow = stream(events=15_000, rate=300, seed=37)
    sampler = Sampler(logged, settings.group_id)
    stop = asyncio.Event()
    async with (
        Downstream(settings) as downstream,
        fleet(settings, tmp_path, relay=True, static=True) as group,
    ):
        await wait_for(lambda: _all_ready(group), 120, "3 ready replicas")
        producing = asyncio.create_task(flow.produce(settings))
        sampling = asyncio.create_task(sampler.run(stop))
        try:
            for index, replica in enumerate(group.replicas):
                assert not flow.done.is_set(), "the stream ended before the restarts"
                await wait_for(
                    functools.partial(_mid_batch, logged, replica.pid),
                    30,
                    f"{replica.name} mid-batch",
                )
                began = time.monotonic()
                assert await replica.terminate(timeout_s=45) == 0, replica.tail()
                # The batch in flight committed or rolled back well within the grace period.
                assert time.monotonic() - began < 15
                await group.replace(index)
                await wait_for(replica.ready, 120, f"{replica.name} ready again")
                await asyncio.sleep(1)
            await wait_for(lambda: drained(sampler, flow), 300, "the whole stream stored")
        finally:
            stop.set()
            await asyncio.gather(producing, sampling)
        await assert_final(logged, settings, flow, downstream)


async def _mid_batch(engine: AsyncEngine, pid: int) -> bool:
    with contextlib.suppress(Exception):
        return await in_transaction(engine, pid) is not None
    return False


@pytest.mark.slow
async def test_a_dynamic_replica_leaves_the_group_at_once_on_sigterm(
    settings: Settings, logged: AsyncEngine, tmp_path: Path
) -> None:
    """Without an instance id, SIGTERM mid-batch ends the batch, then leaves the group: the
    other replica owns every partition long before the session timeout would say so."""
    await create_all_topics(settings)
    own = settings.model_copy(update={"session_timeout_ms": 30_000})
    flow = stream(events=6_000, rate=300, seed=47)
    sampler = Sampler(logged, own.group_id)
    stop = asyncio.Event()
    async with (
        Downstream(own) as downstream,
        fleet(own, tmp_path, consumers=2, relay=True) as group,
    ):
        await wait_for(lambda: _all_ready(group), 120, "2 ready replicas")
        producing = asyncio.create_task(flow.produce(own))
        sampling = asyncio.create_task(sampler.run(stop))
        try:
            leaving, staying = group.replicas
            await wait_for(functools.partial(_mid_batch, logged, leaving.pid), 30, "mid-batch")
            assert await leaving.terminate(timeout_s=45) == 0, leaving.tail()
            left = time.monotonic()
            everything = {(t, p) for t in (own.users_topic, own.orders_topic) for p in range(6)}
            await wait_for(
                lambda: _owns(staying.log, everything), 20, "the other replica owning everything"
            )
            assert time.monotonic() - left < 15, "the group waited for the session timeout"
            await wait_for(lambda: drained(sampler, flow), 180, "the whole stream stored")
        finally:
            stop.set()
            await asyncio.gather(producing, sampling)
        await assert_final(logged, own, flow, downstream)


async def _owns(log: Path, partitions: set[tuple[str, int]]) -> bool:
    return assigned_partitions(log) == partitions
