"""The relay against the real Kafka and PostgreSQL: every outbox row reaches a read_committed
consumer exactly once, in version order per key, whatever order transactions commit in."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.errors import UserError
from sync_service.events.outbound import OutboundEvent, downstream_event_id
from sync_service.relay.position import (
    Position,
    encode_position,
    ensure_position_topic,
    read_position,
)
from sync_service.relay.publish import relay_part
from tests.factories import delete_event, order_event, user_event
from tests.integration.harness import count, create_topics, produce, rows, running, wait_until
from tests.integration.relay_helpers import (
    Downstream,
    assert_exactly_once,
    assert_version_order,
    create_out_topics,
    insert_outbox,
    outbox_row,
)


async def test_each_applied_change_is_published_once_with_the_contract_key_value_and_headers(
    settings: Settings, engine: AsyncEngine
) -> None:
    # A long batch wait puts everything in one batch; no pruning, to inspect the outbox.
    settings = settings.model_copy(update={"batch_max_wait_ms": 500, "relay_prune_every_s": 3600})
    await create_topics(settings)
    await create_out_topics(settings)
    paid = order_event(10, 1, 2, status="paid")
    users = [user_event(1, 1), user_event(1, 2, name="Ada"), user_event(2, 1),
             delete_event("user", 2, 2)]  # fmt: skip
    orders = [order_event(10, 1, 1), paid, order_event(10, 1, 3, status="shipped"),
              paid, order_event(10, 1, 1), order_event(11, 1, 1, status="cancelled")]  # fmt: skip
    await produce(settings, settings.users_topic, users)
    await produce(settings, settings.orders_topic, orders)
    applied = [*users, *orders[:3], orders[5]]  # the repeat of v2 and the late v1 change nothing

    async with Downstream(settings) as downstream:
        async with running(settings, relay=relay_part):
            await downstream.wait_for(len(applied))
        published = await downstream.drain()

    assert_exactly_once(published, [downstream_event_id(uuid.UUID(e["event_id"])) for e in applied])
    by_key: dict[tuple[str, bytes], list[tuple[str, int]]] = {}
    for record in sorted(published, key=lambda p: (p.topic, p.partition, p.offset)):
        by_key.setdefault((record.topic, record.key), []).append(
            (record.value["type"], record.value["version"])
        )
    assert by_key == {
        (settings.out_users_topic, b"1"): [("user.upserted", 1), ("user.upserted", 2)],
        (settings.out_users_topic, b"2"): [("user.upserted", 1), ("user.deleted", 2)],
        (settings.out_orders_topic, b"10"): [("order.upserted", v) for v in (1, 2, 3)],
        (settings.out_orders_topic, b"11"): [("order.upserted", 1)],
    }
    inbound = {downstream_event_id(uuid.UUID(e["event_id"])): e for e in applied}
    for record in published:
        event = OutboundEvent.model_validate(record.value)
        source = inbound[event.event_id]
        assert record.key == event.aggregate_id.encode() == str(source["data"]["id"]).encode()
        assert record.headers == {
            "event_type": event.type.encode(),
            "event_id": str(event.event_id).encode(),
        }
        assert event.source is not None
        assert str(event.source.event_id) == source["event_id"]
        assert event.data["version"] == event.version == source["version"]
    shipped = next(p for p in published if p.key == b"10" and p.value["version"] == 3)
    assert shipped.value["data"]["status"] == "shipped"
    assert shipped.value["data"]["total"] == "10.00"
    deleted = next(p for p in published if p.value["type"] == "user.deleted")
    assert deleted.value["data"]["deleted_at"] is not None
    # The three changes of order 10 were written by one transaction (one batch).
    assert await rows(
        engine, "SELECT count(DISTINCT txid), count(*) FROM outbox WHERE aggregate_id = '10'"
    ) == [(1, 3)]


async def test_rows_are_published_as_postgresql_renders_them_byte_for_byte(
    settings: Settings, engine: AsyncEngine
) -> None:
    """Key, value and headers are the stored text as UTF-8 whatever characters it holds,
    and rows too large to share one batch still go out in order."""
    settings = settings.model_copy(update={"relay_prune_every_s": 3600})
    await create_out_topics(settings)
    # The second and third are too large to share a batch (512 KiB) with each other.
    names = ['Zoë "Ω" 東京 \\ \u2028 😀', "a" * 300_000, "b" * 300_000, "c"]
    written = [outbox_row("user", 1, version) for version in (1, 2, 3, 4)]
    for row, name in zip(written, names, strict=True):
        payload = orjson.loads(row["payload"])
        payload["data"]["name"] = name
        row["payload"] = orjson.dumps(payload).decode()
    async with engine.begin() as connection:
        await insert_outbox(connection, written)
    stored = await rows(
        engine,
        "SELECT aggregate_id, payload::text, event_type, event_id::text FROM outbox ORDER BY id",
    )
    async with Downstream(settings) as downstream:
        async with running(settings, consume=False, relay=relay_part):
            await downstream.wait_for(len(written))
        published = await downstream.drain()
    assert [
        (p.key, p.raw_value, p.headers["event_type"], p.headers["event_id"])
        for p in sorted(published, key=lambda p: p.offset)
    ] == [tuple(field.encode() for field in row) for row in stored]
    assert [p.value["data"]["name"] for p in sorted(published, key=lambda p: p.offset)] == names


async def test_a_row_committed_late_is_neither_skipped_nor_reordered(
    settings: Settings, engine: AsyncEngine
) -> None:
    """Row A gets an id (and a transaction id) before B and D but commits after both: a relay
    reading by id alone would publish B and D, then never A."""
    settings = settings.model_copy(update={"relay_poll_ms": 50})
    await create_out_topics(settings)
    versions = [outbox_row("order", 1, v) for v in (1, 2, 3, 4)]
    async with (
        Downstream(settings) as downstream,
        running(settings, consume=False, relay=relay_part),
    ):
        async with engine.begin() as connection:
            await insert_outbox(connection, versions[:1])
        await downstream.wait_for(1)
        assert len(downstream.records) == 1  # the relay runs
        async with engine.connect() as late:
            late_commit = await late.begin()
            await insert_outbox(late, versions[1:2])
            for row in versions[2:]:
                async with engine.begin() as connection:
                    await insert_outbox(connection, [row])
            await asyncio.sleep(1.0)  # twenty polls and two notifications
            assert len(downstream.records) == 1, "published past a transaction still open"
            await late_commit.commit()
        await downstream.wait_for(4)
    published = await downstream.drain()
    assert_exactly_once(published, [r["event_id"] for r in versions])
    assert [p.value["version"] for p in sorted(published, key=lambda p: p.offset)] == [1, 2, 3, 4]


async def test_concurrent_writers_committing_out_of_order_lose_nothing(
    settings: Settings, engine: AsyncEngine
) -> None:
    """8 writers, 250 transactions each, random commit delays, 10% rollbacks: what is
    published is exactly what committed."""
    await create_out_topics(settings)
    committed: list[str] = []

    async def writer(number: int) -> None:
        rng = random.Random(number)
        versions: Counter[int] = Counter()
        async with engine.connect() as connection:
            for _ in range(250):
                ids = [number * 100 + rng.randrange(20) + 1 for _ in range(rng.randint(1, 4))]
                batch = []
                for entity_id in ids:
                    versions[entity_id] += 1
                    batch.append(outbox_row("order", entity_id, versions[entity_id]))
                transaction = await connection.begin()
                await insert_outbox(connection, batch)
                await asyncio.sleep(rng.uniform(0, 0.01))  # commit after others that began later
                if rng.random() < 0.1:
                    await transaction.rollback()
                else:
                    await transaction.commit()
                    committed.extend(str(r["event_id"]) for r in batch)

    async with Downstream(settings) as downstream:
        async with running(settings, consume=False, relay=relay_part):
            await asyncio.gather(*(writer(n) for n in range(8)))
            await downstream.wait_for(len(committed))
        published = await downstream.drain()
    assert len(committed) > 4_000
    assert_exactly_once(published, committed)
    assert_version_order(published)


async def test_a_restarted_relay_resumes_after_its_position_and_prunes_what_it_published(
    settings: Settings, engine: AsyncEngine
) -> None:
    settings = settings.model_copy(update={"relay_chunk": 50, "relay_prune_every_s": 0.1})
    await create_out_topics(settings)
    first = [outbox_row("user", n % 40 + 1, n // 40 + 1) for n in range(400)]
    second = [outbox_row("user", n % 40 + 1, n // 40 + 11) for n in range(200)]
    published_before = REGISTRY.get_sample_value(
        "sync_outbox_published_total", {"topic": settings.out_users_topic}
    )
    async with Downstream(settings) as downstream:
        for part in range(0, len(first), 100):
            async with engine.begin() as connection:
                await insert_outbox(connection, first[part : part + 100])
        last = await rows(engine, "SELECT txid, id FROM outbox ORDER BY txid DESC, id DESC LIMIT 1")
        async with running(settings, consume=False, relay=relay_part):
            await downstream.wait_for(len(first))
            await wait_until(lambda: _outbox_empty(engine), within=10, what="published rows pruned")
        # Between runs: the position is in Kafka, the outbox has only what came since.
        assert await read_position(settings) == Position(*last[0])
        async with engine.begin() as connection:
            await insert_outbox(connection, second)
        async with running(settings, consume=False, relay=relay_part):
            await downstream.wait_for(len(first) + len(second))
        published = await downstream.drain()
    assert_exactly_once(published, [r["event_id"] for r in [*first, *second]])
    assert_version_order(published)
    assert REGISTRY.get_sample_value(
        "sync_outbox_published_total", {"topic": settings.out_users_topic}
    ) == (published_before or 0) + len(first) + len(second)


async def test_a_lost_database_connection_costs_leadership_for_a_moment_and_nothing_else(
    settings: Settings, engine: AsyncEngine
) -> None:
    settings = settings.model_copy(update={"relay_poll_ms": 50})
    await create_out_topics(settings)
    first = [outbox_row("user", 1, v) for v in range(1, 101)]
    second = [outbox_row("user", 1, v) for v in range(101, 201)]
    async with Downstream(settings) as downstream:
        async with running(settings, consume=False, relay=relay_part):
            async with engine.begin() as connection:
                await insert_outbox(connection, first)
            await downstream.wait_for(len(first))
            (holder,) = await _lease_holders(engine)
            assert await rows(engine, "SELECT pg_terminate_backend(:pid)", pid=holder) == [(True,)]
            async with engine.begin() as connection:
                await insert_outbox(connection, second)
            await downstream.wait_for(len(first) + len(second))
            assert len(await _lease_holders(engine)) == 1
            assert await _lease_holders(engine) != [holder]  # the lease was taken again
        published = await downstream.drain()
    assert_exactly_once(published, [r["event_id"] for r in [*first, *second]])
    assert_version_order(published)


async def test_a_fenced_relay_stands_by_then_leads_again_without_repeating(
    settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    await create_out_topics(settings)
    first = [outbox_row("order", 1, v) for v in range(1, 101)]
    second = [outbox_row("order", 1, v) for v in range(101, 201)]
    async with Downstream(settings) as downstream:
        async with running(settings, consume=False, relay=relay_part):
            async with engine.begin() as connection:
                await insert_outbox(connection, first)
            await downstream.wait_for(len(first))
            # Another producer with the relay's transactional id fences the relay's.
            intruder = AIOKafkaProducer(
                bootstrap_servers=settings.kafka_bootstrap,
                transactional_id=settings.relay_transactional_id,
            )
            await intruder.start()
            await intruder.stop()
            async with engine.begin() as connection:
                await insert_outbox(connection, second)
            await downstream.wait_for(len(first) + len(second))
        published = await downstream.drain()
    assert "producer fenced" in caplog.text
    assert_exactly_once(published, [r["event_id"] for r in [*first, *second]])
    assert_version_order(published)


async def test_a_position_from_another_database_stops_the_relay(settings: Settings) -> None:
    await create_out_topics(settings)
    await ensure_position_topic(settings)
    await produce(
        settings,
        settings.relay_position_topic,
        [(settings.relay_transactional_id.encode(), encode_position(Position(2**62, 1)))],
    )
    with pytest.raises(UserError, match="ahead of this database"):
        async with running(settings, consume=False, relay=relay_part) as service:
            await asyncio.wait_for(service, timeout=30)


async def test_the_position_is_the_last_committed_one_however_far_back_it_is(
    settings: Settings,
) -> None:
    await ensure_position_topic(settings)
    key = settings.relay_transactional_id.encode()
    await produce(settings, settings.relay_position_topic, [(key, encode_position(Position(7, 1)))])
    others = [(b"another-relay", encode_position(Position(9, n))) for n in range(2_500)]
    await produce(settings, settings.relay_position_topic, others)
    aborting = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        transactional_id=f"{settings.relay_transactional_id}-aborting",
    )
    await aborting.start()
    try:
        await aborting.begin_transaction()
        await aborting.send_and_wait(
            settings.relay_position_topic, encode_position(Position(8, 1)), key=key
        )
        await aborting.abort_transaction()
    finally:
        await aborting.stop()
    assert await read_position(settings) == Position(7, 1)


async def _lease_holders(engine: AsyncEngine) -> list[int]:
    """The backends holding an advisory lock in the test's database: the relay's lease."""
    found = await rows(
        engine,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    return [pid for (pid,) in found]


async def _outbox_empty(engine: AsyncEngine) -> bool:
    return await count(engine, "SELECT count(*) FROM outbox") == 0
