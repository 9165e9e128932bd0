"""What a stalled replica and a rolling restart cost the rest of a consumer group.

    python -m bench.groups stall [--no-timeouts]     # SIGSTOP one of 3 replicas mid-batch
    python -m bench.groups rolling [--kill]          # SIGTERM (or kill -9) and restart each
                                                     # of 3 replicas: dynamic members, then
                                                     # static ones

Three `sync-service consume` processes share a group on 6+6 partitions while a steady
stream (1,000 events/s) flows; the stored positions are read every 100 ms. Figures:

- stall: the longest time in which none of the *other* replicas' partitions advanced,
  from the SIGSTOP (taken while the replica's batch transaction is open) to 10 s after
  SIGCONT; and the same for the paused replica's own partitions.
- rolling: the stop-the-world time (the sum of stops over 1 s in which no partition at
  all advanced), the longest such stop, and the longest stop of any one partition, from
  the first SIGTERM to 5 s after the last replica is ready again.

Results go to stdout as JSON and to bench/results/groups-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.fleet import (
    TP,
    Fleet,
    Sampler,
    Stream,
    assigned_partitions,
    fleet,
    pause_mid_batch,
    wait_for,
)
from bench.progress import say
from bench.service.database import create_database, drop_database
from sync_service.config import Settings
from sync_service.kafka import ensure_topics
from sync_service.ops.migrate import upgrade
from sync_service.ops.traffic import Traffic

PARTITIONS = 6
RATE = 1_000.0
RESULTS = Path(__file__).with_name("results")


async def prepare(base: Settings, token: str) -> tuple[Settings, str]:
    """A migrated database and 6+6-partition change topics of a run's own, and its settings."""
    name = f"bench_groups_{token}"
    url = await create_database(base.database_url, name)
    await upgrade(Settings(database_url=url))
    prefix = f"bench.{token}.groups"
    settings = base.model_copy(
        update={
            "database_url": url,
            "group_id": f"{prefix}.group",
            "users_topic": f"{prefix}.cdc.users",
            "orders_topic": f"{prefix}.cdc.orders",
            "out_users_topic": f"{prefix}.sync.users",
            "out_orders_topic": f"{prefix}.sync.orders",
            "relay_transactional_id": f"{prefix}.relay",
            "relay_position_topic": f"{prefix}.relay-position",
        }
    )
    await ensure_topics(
        settings,
        {settings.users_topic: PARTITIONS, settings.orders_topic: PARTITIONS},
    )
    return settings, name


async def teardown(base: Settings, settings: Settings, database: str) -> None:
    """Best effort: drop the run's database and delete its topics."""
    from aiokafka.admin import AIOKafkaAdminClient

    await drop_database(base.database_url, database)
    client = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        await client.start()
        prefix = settings.group_id.rsplit(".", 1)[0]
        doomed = [t for t in await client.list_topics() if t.startswith(prefix)]
        if doomed:
            await client.delete_topics(doomed)
    except Exception as error:
        say(f"groups: topics not deleted: {error}")
    finally:
        await client.close()


async def _all_ready(group: Fleet) -> bool:
    return all([await r.ready() for r in group.replicas])


async def _drained(sampler: Sampler, stream: Stream) -> bool:
    return stream.done.is_set() and sampler.total() >= sum(stream.sent.values())


async def stall(base: Settings, pause_s: float, timeouts: bool) -> dict[str, Any]:
    token = secrets.token_hex(4)
    settings, database = await prepare(base, token)
    if not timeouts:
        settings = settings.model_copy(
            update={"idle_in_transaction_timeout_ms": 0, "lock_timeout_ms": 0}
        )
    engine = create_async_engine(settings.database_url, poolclass=NullPool)
    traffic = Traffic(seed=13, id_base=random.randrange(10**6) * 10**6, partitions=PARTITIONS)
    stream = Stream(traffic, events=int(RATE * (pause_s + 60)), rate=RATE)
    sampler = Sampler(engine, settings.group_id)
    stop = asyncio.Event()
    logs = Path(tempfile.mkdtemp(prefix="bench-groups-"))
    try:
        async with fleet(settings, logs, consumers=3) as group:
            producing = asyncio.create_task(stream.produce(settings))
            sampling = asyncio.create_task(sampler.run(stop))
            await wait_for(lambda: _all_ready(group), 120, "3 ready replicas")
            await asyncio.sleep(10)
            stalled = group.replicas[0]
            owned = assigned_partitions(stalled.log)
            await pause_mid_batch(engine, stalled.pid)
            paused_at = time.monotonic()
            say(f"groups: paused {stalled.name} mid-batch (owns {len(owned)} partitions)")
            await asyncio.sleep(pause_s)
            stalled.signal(signal.SIGCONT)
            resumed_at = time.monotonic()
            await wait_for(lambda: _drained(sampler, stream), 300, "the whole stream")
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(producing, sampling)
            everything = set(stream.sent)
            others = everything - owned
            end = resumed_at + 10
            fenced = stalled.log.read_text(errors="replace").count("positions moved")
    finally:
        stop.set()
        await engine.dispose()
        await teardown(base, settings, database)
    return {
        "scenario": "stall",
        "timeouts": timeouts,
        "idle_in_transaction_timeout_ms": settings.idle_in_transaction_timeout_ms,
        "lock_timeout_ms": settings.lock_timeout_ms,
        "session_timeout_ms": settings.group_session_timeout_ms,
        "pause_s": pause_s,
        "others_longest_stop_s": round(sampler.longest_stop(paused_at, end, others), 2),
        "others_longest_stop_one_partition_s": round(
            max(sampler.longest_stop(paused_at, end, [tp]) for tp in others), 2
        ),
        "paused_replica_partitions_longest_stop_s": round(
            max(sampler.longest_stop(paused_at, end, [tp]) for tp in owned), 2
        ),
        "paused_replica_fenced_after_resume": fenced,
        "events": sum(stream.sent.values()),
        "logs": str(logs),
    }


async def rolling(base: Settings, static: bool, kill: bool) -> dict[str, Any]:
    token = secrets.token_hex(4)
    settings, database = await prepare(base, token)
    engine = create_async_engine(settings.database_url, poolclass=NullPool)
    traffic = Traffic(seed=17, id_base=random.randrange(10**6) * 10**6, partitions=PARTITIONS)
    stream = Stream(traffic, events=int(RATE * 150), rate=RATE)
    sampler = Sampler(engine, settings.group_id)
    stop = asyncio.Event()
    logs = Path(tempfile.mkdtemp(prefix="bench-groups-"))
    restarts: list[float] = []
    try:
        async with fleet(settings, logs, consumers=3, static=static) as group:
            producing = asyncio.create_task(stream.produce(settings))
            sampling = asyncio.create_task(sampler.run(stop))
            await wait_for(lambda: _all_ready(group), 120, "3 ready replicas")
            await asyncio.sleep(10)
            started = time.monotonic()
            for i in range(len(group.replicas)):
                began = time.monotonic()
                if kill:
                    await group.replicas[i].kill()
                elif (code := await group.replicas[i].terminate()) != 0:
                    raise RuntimeError(f"{group.replicas[i].name} exited {code} on SIGTERM")
                replica = await group.replace(i)
                await wait_for(replica.ready, 120, f"{replica.name} ready")
                restarts.append(round(time.monotonic() - began, 2))
                await asyncio.sleep(3)
            end = time.monotonic() + 5
            await asyncio.sleep(5)
            stop.set()
            producing.cancel()
            await asyncio.gather(producing, sampling, return_exceptions=True)
    finally:
        stop.set()
        await engine.dispose()
        await teardown(base, settings, database)
    partitions: list[TP] = sorted({tp for _, p in sampler.samples for tp in p})
    return {
        "scenario": "restart by kill -9" if kill else "rolling restart by SIGTERM",
        "membership": "static" if static else "dynamic",
        "session_timeout_ms": settings.model_copy(
            update={"instance_id": "x" if static else ""}
        ).group_session_timeout_ms,
        "restart_s": restarts,
        "stop_the_world_s": round(sampler.stopped_time(started, end), 2),
        "longest_group_stop_s": round(sampler.longest_stop(started, end), 2),
        "longest_partition_stop_s": round(
            max(sampler.longest_stop(started, end, [tp]) for tp in partitions), 2
        ),
        "window_s": round(end - started, 1),
        "logs": str(logs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.groups", description=__doc__.split("\n")[0]
    )
    parser.add_argument("scenario", choices=["stall", "rolling"])
    parser.add_argument("--pause", type=float, default=30.0, help="seconds the replica is stopped")
    parser.add_argument("--kill", action="store_true", help="rolling: kill -9, not SIGTERM")
    parser.add_argument(
        "--no-timeouts", action="store_true", help="stall without the idle and lock timeouts"
    )
    args = parser.parse_args()
    base = Settings()
    if args.scenario == "stall":
        results = [asyncio.run(stall(base, args.pause, not args.no_timeouts))]
    else:
        results = [asyncio.run(rolling(base, static, args.kill)) for static in (False, True)]
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = RESULTS / f"groups-{args.scenario}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    say(f"groups: written to {path}")


if __name__ == "__main__":
    main()
