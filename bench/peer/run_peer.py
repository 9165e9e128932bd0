"""Run the peer end to end: events in its format on its own topics, then Debezium's JDBC
sink drains them into the `peer` database once per configuration, timed to the final state.

Each timed run starts from empty tables and a new connector (a new consumer group, so it
reads the same topics from the start); a run counts only once the state checks equal.
An untimed drain of other events warms the JVM first, as a long-running worker would be.

    .venv/bin/python -m bench.peer.run_peer --events 100000 --batch-sizes 500,2000,5000 \
        --variants plain,reduced,unnest
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from sqlalchemy.engine import URL

from bench.peer import database
from bench.peer.encode import PeerEncoder, in_version_order
from bench.peer.worker import ConnectWorker, Layout, PeerError, fetch, sink_config
from sync_service.config import Settings
from sync_service.errors import UserError
from sync_service.kafka import admin, ensure_topics

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 12


def sample_events(count: int, seed: int = 7) -> list[bytes]:
    """A small seeded workload of native envelopes for checking the peer: user creations,
    updates and deletes, orders and their status changes, ~1% duplicates and ~1% pairs of
    one entity's events swapped (out of order). The benchmark feeds its own workload."""
    rng = random.Random(seed)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    versions: dict[tuple[str, int], int] = {}
    users: list[int] = []
    orders: list[int] = []
    events: list[dict[str, Any]] = []

    def emit(entity: str, entity_id: int, op: str, data: dict[str, Any]) -> None:
        version = versions.get((entity, entity_id), 0) + rng.randint(1, 3)
        versions[(entity, entity_id)] = version
        now = (t0 + timedelta(milliseconds=len(events) * 7)).isoformat().replace("+00:00", "Z")
        row = {"id": entity_id, **data}
        if op == "upsert":
            row.update(created_at=t0.isoformat(), updated_at=now)
        events.append(
            {"event_id": str(uuid.UUID(int=rng.getrandbits(128))), "entity": entity, "op": op,
             "version": version, "occurred_at": now, "data": row}
        )  # fmt: skip

    while len(events) < count:
        roll = rng.random()
        if roll < 0.2 or not users:
            users.append(len(versions) + 1)
            user = users[-1]
            emit("user", user, "upsert", {"email": f"u{user}@example.com", "name": f"User {user}",
                                          "active": True, "country": "GB"})  # fmt: skip
        elif roll < 0.35:
            user = rng.choice(users)
            emit("user", user, "upsert", {"email": f"u{user}.{len(events)}@example.com",
                                          "name": f"User {user}", "active": rng.random() < 0.9,
                                          "country": rng.choice(["GB", "DE", None])})  # fmt: skip
        elif roll < 0.37:
            emit("user", users.pop(rng.randrange(len(users))), "delete", {})
        elif roll < 0.6 or not orders:
            orders.append(len(versions) + 1)
            emit("order", orders[-1], "upsert", _order(rng, rng.choice(users), "pending"))
        elif roll < 0.98:
            order = rng.choice(orders)
            status = rng.choice(["paid", "shipped", "cancelled", "refunded"])
            emit("order", order, "upsert", _order(rng, rng.choice(users), status))
        else:
            emit("order", orders.pop(rng.randrange(len(orders))), "delete", {})
    for _ in range(count // 100):  # duplicates: a redelivered event, later on
        events.insert(rng.randrange(len(events)), events[rng.randrange(len(events))])
    for _ in range(count // 100):  # out of order: swap two events of one entity
        first = rng.randrange(len(events))
        key = (events[first]["entity"], events[first]["data"]["id"])
        later = [i for i in range(first + 1, min(first + 500, len(events)))
                 if (events[i]["entity"], events[i]["data"]["id"]) == key]  # fmt: skip
        if later:
            events[first], events[later[0]] = events[later[0]], events[first]
    return [orjson.dumps(event) for event in events]


def _order(rng: random.Random, user: int, status: str) -> dict[str, Any]:
    cents = rng.randrange(0, 10**9)
    return {"user_id": user, "total": f"{cents // 100}.{cents % 100:02d}", "currency": "EUR",
            "status": status}  # fmt: skip


def _key_version(value: bytes) -> tuple[tuple[str, int], int]:
    event = orjson.loads(value)
    return (event["entity"], event["data"]["id"]), event["version"]


async def produce(bootstrap: str, records: Sequence[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks="all"
    )
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send(topic, value=value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


VARIANTS: dict[str, tuple[bool, bool]] = {
    "plain": (False, False),
    "reduced": (True, False),
    "unnest": (True, True),
}
"""Sink settings tried beside the batch size: (use.reduction.buffer, the UNNEST insert)."""


@dataclass
class PeerRun:
    variant: str
    batch_size: int
    tasks: int
    events: int
    seconds: float
    """From the connector's creation to the final state: task start-up included."""
    events_per_s: float
    startup_seconds: float
    """From the connector's creation to its first row: Hibernate's bootstrap, the group join."""
    steady_events_per_s: float
    """Events over the time from the first row to the final state (meaningful only when
    the drain spans many batches: the first batch is already written at the first row)."""
    load_average: float
    """The machine's 1-minute load average at the end: other work on it shows here."""


async def timed_drain(
    worker: ConnectWorker,
    url: URL,
    topics: list[str],
    expected: database.PeerState,
    *,
    events: int,
    batch_size: int,
    variant: str = "plain",
    tasks: int = 1,
    wait_s: float = 600.0,
) -> PeerRun:
    """One timed run: empty tables, a new connector on `topics` (read from the start), the
    clock from its creation to the final state; the connector is deleted afterwards."""
    await database.truncate(url)
    reduction_buffer, unnest_insert = VARIANTS[variant]
    config = sink_config(
        topics=topics,
        jdbc_url=database.jdbc_url(url),
        user=url.username or "postgres",
        password=url.password or "",
        batch_size=batch_size,
        tasks=tasks,
        reduction_buffer=reduction_buffer,
        unnest_insert=unnest_insert,
    )
    name = f"peer-{uuid.uuid4().hex[:8]}-{variant}-{batch_size}"
    started = time.monotonic()
    worker.create(name, config)
    try:
        reached = await database.wait_for_state(url, expected, wait_s=wait_s)
    except TimeoutError as error:
        raise PeerError(f"{error} (connector: {worker.failure(name) or 'running'})") from None
    finally:
        worker.delete(name)
    seconds = reached.final - started
    return PeerRun(
        variant=variant,
        batch_size=batch_size,
        tasks=tasks,
        events=events,
        seconds=seconds,
        events_per_s=events / seconds,
        startup_seconds=reached.first_row - started,
        steady_events_per_s=events / max(reached.final - reached.first_row, 1e-3),
        load_average=os.getloadavg()[0],
    )


@dataclass(frozen=True)
class PeerInput:
    """A workload on the peer's topics, with the state the peer must end with."""

    topics: list[str]
    expected: database.PeerState
    events: int
    value_bytes: int


async def load_topics(bootstrap: str, events: list[bytes], prefix: str) -> PeerInput:
    """Encode native envelopes for the peer and produce them to `<prefix>.users|orders`.

    Each entity's events go in version order (see `in_version_order`): the sink has no
    version guard, and this way it is asked for the same final state as our service."""
    events = in_version_order(events, lambda v: _key_version(v)[0], lambda v: _key_version(v)[1])
    encoder = PeerEncoder(f"{prefix}.users", f"{prefix}.orders")
    topics = list(encoder.topics.values())
    await ensure_topics(Settings(kafka_bootstrap=bootstrap), dict.fromkeys(topics, PARTITIONS))
    records = [encoder.encode(value) for value in events]
    await produce(bootstrap, records)
    return PeerInput(
        topics, database.expected_state(events), len(events), sum(len(r[2]) for r in records)
    )


async def drop_topics(bootstrap: str, topics: list[str]) -> None:
    """Delete the run's topics: each run writes its own, and they are large."""
    client = await admin(Settings(kafka_bootstrap=bootstrap))
    try:
        await client.delete_topics(topics)
    finally:
        await client.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    layout = Layout(REPO)
    fetch(layout)
    run_id = uuid.uuid4().hex[:8]
    timed = await load_topics(
        args.bootstrap, sample_events(args.events, args.seed), f"peer.{run_id}"
    )
    warm = await load_topics(
        args.bootstrap, sample_events(args.warmup, args.seed + 1), f"peer.{run_id}.warm"
    )
    url = await database.prepare(args.database_url)
    runs: list[PeerRun] = []
    worker = ConnectWorker(layout, bootstrap=args.bootstrap, heap=args.heap)
    startup = worker.start()
    try:
        # A long-running worker has its hot paths compiled; the first drain of a fresh JVM
        # pays for that, so an untimed drain of other events comes first.
        cold = await timed_drain(
            worker, url, warm.topics, warm.expected, events=warm.events,
            batch_size=max(args.batch_sizes), variant=args.variants[0], wait_s=args.timeout,
        )  # fmt: skip
        print(f"warm-up: {cold}", file=sys.stderr)
        for variant in args.variants:
            for batch_size in args.batch_sizes:
                peer_run = await timed_drain(
                    worker, url, timed.topics, timed.expected, events=timed.events,
                    batch_size=batch_size, variant=variant, tasks=args.tasks, wait_s=args.timeout,
                )  # fmt: skip
                runs.append(peer_run)
                print(peer_run, file=sys.stderr)
        peak_rss = worker.peak_rss_bytes()
    finally:
        worker.stop()
        await drop_topics(args.bootstrap, [*timed.topics, *warm.topics])
    return {
        "startup_seconds": startup,
        "peak_rss_bytes": peak_rss,
        "value_bytes_mean": timed.value_bytes / timed.events,
        "rows": {entity: len(rows) for entity, rows in timed.expected.rows.items()},
        "warm_up": asdict(cold),
        "runs": [asdict(r) for r in runs],
    }


def _variants(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[500, 2000, 5000])  # fmt: skip
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument(
        "--variants",
        type=_variants,
        default=["plain"],
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--warmup", type=int, default=20_000, help="events of the untimed drain")
    parser.add_argument("--heap", default="1g")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--bootstrap", default="localhost:9092")
    parser.add_argument(
        "--database-url", default="postgresql+asyncpg://postgres@localhost:5432/sync"
    )
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(run(args))
    except (PeerError, UserError) as error:
        print(f"peer: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
