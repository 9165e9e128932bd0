"""The demo end to end: generated traffic through Kafka, the service and the relay ends in
exactly the state the generator expects; and the checksum reads rows as Python does."""

from __future__ import annotations

import io
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.db.models import Order, User
from sync_service.kafka import require_topics
from sync_service.ops.demo import run_demo
from sync_service.ops.traffic import canonical_row, checksum_of, table_checksum, table_rows
from tests.integration.harness import scalar

SEED = 9
"""Its 2,000 events hold dead letters, late and duplicate events, deletes and reused emails."""
USERS_IN = "SELECT count(*) FROM users WHERE id BETWEEN :low AND :high"
ORDERS_IN = "SELECT count(*) FROM orders WHERE id BETWEEN :low AND :high"


async def test_two_demo_runs_each_end_in_the_expected_state(
    settings: Settings, engine: AsyncEngine
) -> None:
    output = io.StringIO()
    console = Console(file=output, width=120)
    first = await run_demo(settings, events=2_000, seed=SEED, console=console)
    second = await run_demo(settings, events=2_000, seed=SEED, console=console)

    for summary in (first, second):
        expected = summary.expected
        assert expected is not None
        assert (summary.outcome, summary.problems, summary.relay) == ("done", [], True)
        assert min(expected.dead_letters, expected.late, expected.duplicates) > 0
        low, high = expected.id_range
        assert await table_checksum(engine, (low, high)) == expected.checksum()
        assert await scalar(engine, USERS_IN, low=low, high=high) == len(expected.users)
        assert await scalar(engine, ORDERS_IN, low=low, high=high) == len(expected.orders)
        assert summary.figures.dead_letters == expected.dead_letters
    # The same seed again: the same history in an id block and email space of its own.
    assert first.run != second.run
    assert first.expected is not None
    assert second.expected is not None
    assert first.expected.id_range != second.expected.id_range
    assert (first.expected.events, first.expected.changes) == (
        second.expected.events, second.expected.changes,
    )  # fmt: skip
    assert await scalar(engine, "SELECT count(*) FROM dead_letters") == (
        first.expected.dead_letters + second.expected.dead_letters
    )
    assert await scalar(engine, "SELECT count(*) FROM pending_changes") == 0
    assert output.getvalue().count("│ checksum") == 2
    assert output.getvalue().count("matches") == 2

    # Downstream: one event per applied change, once each, in version order per aggregate.
    published = await _downstream(settings)
    applied = first.figures.applied + second.figures.applied
    assert len(published) == applied
    assert len({p["event_id"] for p in published}) == applied
    versions: dict[tuple[str, str], list[int]] = defaultdict(list)
    for p in published:  # read in offset order per partition, and a key keeps its partition
        versions[(p["type"].split(".")[0], p["aggregate_id"])].append(p["version"])
    assert all(v == sorted(set(v)) for v in versions.values())


async def _downstream(settings: Settings) -> list[dict[str, Any]]:
    """Every committed record of the downstream topics, per partition in offset order."""
    topics = (settings.out_users_topic, settings.out_orders_topic)
    counts = await require_topics(settings, topics)
    partitions = [TopicPartition(t, p) for t in topics for p in range(counts[t])]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        values: list[dict[str, Any]] = []
        for tp in partitions:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=1_000)
                values.extend(orjson.loads(r.value) for r in batch.get(tp, []))
        return values
    finally:
        await consumer.stop()


async def test_the_checksum_of_the_tables_agrees_with_canonical_rows(engine: AsyncEngine) -> None:
    cet = timezone(timedelta(hours=1))
    users: list[dict[str, Any]] = [
        {"id": 1, "email": "zoe@example.com", "name": "Zoë Müller", "active": True,
         "country": None, "created_at": datetime(2026, 1, 2, 4, 4, 5, 123456, tzinfo=cet),
         "updated_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "version": 3,
         "deleted_at": None},
        {"id": 2, "email": "ada@example.com", "name": "Ada", "active": False, "country": "GB",
         "created_at": datetime(2026, 1, 1, tzinfo=UTC),
         "updated_at": datetime(2026, 1, 1, 0, 0, 0, 1000, tzinfo=UTC), "version": 9,
         "deleted_at": datetime(2026, 2, 1, 12, 30, tzinfo=UTC)},
    ]  # fmt: skip
    orders: list[dict[str, Any]] = [
        {"id": 5, "user_id": 1, "total": Decimal("0.50"), "currency": "EUR",
         "status": "paid", "created_at": datetime(2026, 1, 3, tzinfo=UTC),
         "updated_at": datetime(2026, 1, 3, 0, 0, 1, tzinfo=UTC), "version": 2,
         "deleted_at": None},
        {"id": 6, "user_id": 2, "total": Decimal("123456789012.00"), "currency": "USD",
         "status": "refunded", "created_at": datetime(2026, 1, 4, tzinfo=UTC),
         "updated_at": datetime(2026, 1, 5, tzinfo=UTC), "version": 4,
         "deleted_at": datetime(2026, 1, 6, tzinfo=UTC)},
    ]  # fmt: skip
    async with engine.begin() as connection:
        await connection.execute(insert(User), users)
        await connection.execute(insert(Order), orders)
        await connection.execute(insert(User), [{"id": 3, "version": 1, "deleted_at": datetime(
            2026, 1, 1, tzinfo=UTC)}])  # fmt: skip
    tombstone = {"id": 3, "version": 1, "deleted_at": "2026-01-01T00:00:00Z"}

    expected = checksum_of(
        [canonical_row("user", u) for u in (*users, tombstone)],
        [canonical_row("order", o) for o in orders],
    )
    assert await table_checksum(engine) == expected
    assert await table_checksum(engine, (2, 5)) == checksum_of(
        [canonical_row("user", users[1]), canonical_row("user", tombstone)],
        [canonical_row("order", orders[0])],
    )
    assert await table_checksum(engine, (2, 5)) != expected
    assert await table_rows(engine, (2, 5)) == {
        "user": (canonical_row("user", users[1]), canonical_row("user", tombstone)),
        "order": (canonical_row("order", orders[0]),),
    }


async def test_the_demo_in_debezium_format_ends_in_the_expected_state(
    settings: Settings, engine: AsyncEngine
) -> None:
    """The same traffic written as Debezium's PostgreSQL connector writes it, read by the
    service with SYNC_INBOUND_FORMAT=debezium, ends in the same state."""
    console = Console(file=io.StringIO(), width=120)
    summary = await run_demo(
        settings, events=2_000, seed=SEED, console=console, inbound_format="debezium"
    )
    expected = summary.expected
    assert expected is not None
    assert (summary.outcome, summary.problems) == ("done", [])
    low, high = expected.id_range
    assert await table_checksum(engine, (low, high)) == expected.checksum()
    assert summary.figures.dead_letters == expected.dead_letters > 0
    assert await scalar(engine, "SELECT count(*) FROM pending_changes") == 0
