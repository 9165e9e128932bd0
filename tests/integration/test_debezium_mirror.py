"""The real Debezium PostgreSQL connector feeds sync_service, and the target mirrors the source.

A source database of the test's own (unique emails, the foreign key, hard deletes) holds
rows before the connector starts (its snapshot), then concurrent transactions run: new users
with their orders in one transaction, updates, two users swapping emails, a user deleted
and its email taken by another in the same transaction, status changes, order deletes, a
deleted id inserted again, and the Connect JVM killed and started again mid-stream (it
re-sends what it had not flushed). At the end every live source row equals its target row
column by column, every deleted one is soft-deleted, nothing is dead-lettered or waiting,
and downstream holds exactly one event per source change, per aggregate in commit order;
a second snapshot of the source then changes nothing and publishes nothing.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sync_service.config import Settings
from sync_service.relay.publish import relay_part
from tests.conftest import Endpoints
from tests.integration.debezium_source import (
    REPO,
    DebeziumSource,
    connector_config,
    end_offsets,
    fetch_jars,
    source_database,
)
from tests.integration.harness import (
    count,
    create_topics,
    positions_reached,
    rows,
    running,
    wait_until,
)
from tests.integration.relay_helpers import Downstream, Published, create_out_topics

WORKERS = 4
SEED_USERS, SEED_ORDERS = 8, 12  # per worker, before the connector starts
TRANSACTIONS = 60  # per worker, after the snapshot (and a third more after the restart)
USER_COLUMNS = ("id", "email", "name", "active", "country", "created_at", "updated_at")
ORDER_COLUMNS = ("id", "user_id", "total", "currency", "status", "created_at", "updated_at")
Key = tuple[str, int]  # (entity, id)
STATE = REPO / ".services" / "debezium-mirror"
VERSIONS = (
    "SELECT 'user', id, version, deleted_at FROM users UNION ALL"
    " SELECT 'order', id, version, deleted_at FROM orders ORDER BY 1, 2"
)


@dataclass
class Ledger:
    """Every source change per aggregate, in commit order: each aggregate belongs to one
    worker, whose transactions commit one after another."""

    changes: dict[Key, list[dict[str, Any] | None]] = field(
        default_factory=lambda: defaultdict(list)
    )
    """An upsert's row as written, or None for a delete."""

    def total(self) -> int:
        return sum(len(v) for v in self.changes.values())


class Worker:
    """One client of the source: owns its users and orders, so that its transactions never
    conflict with another's, while all of them commit concurrently."""

    def __init__(self, number: int, engine: AsyncEngine, ledger: Ledger) -> None:
        self.rng = random.Random(number)
        self.engine = engine
        self.ledger = ledger
        self.base = (number + 1) * 1_000_000
        self.next_user, self.next_order, self.next_email = 0, 0, 0
        self.users: dict[int, dict[str, Any]] = {}
        self.deleted: list[int] = []
        self.orders: dict[int, dict[str, Any]] = {}

    def _email(self) -> str:
        self.next_email += 1
        return f"w{self.base}.{self.next_email}@example.com"

    def _new_user(self, user_id: int | None = None) -> dict[str, Any]:
        if user_id is None:
            self.next_user += 1
            user_id = self.base + self.next_user
        now = datetime.now(UTC)
        name = f"User {user_id}" + self.rng.choice(["", " Müller", " Zoë"])
        country = self.rng.choice(["GB", "DE", None])
        return {"id": user_id, "email": self._email(), "name": name, "active": True,
                "country": country, "created_at": now, "updated_at": now}  # fmt: skip

    def _new_order(self, user_id: int) -> dict[str, Any]:
        self.next_order += 1
        now = datetime.now(UTC)
        cents = self.rng.choice([0, 1, 1234, 99_999_999_999_900, self.rng.randrange(10**9)])
        return {"id": self.base + 500_000 + self.next_order, "user_id": user_id,
                "total": Decimal(cents).scaleb(-2), "currency": self.rng.choice(["EUR", "USD"]),
                "status": "pending", "created_at": now, "updated_at": now}  # fmt: skip

    async def seed(self) -> None:
        async with self.engine.begin() as connection:
            for _ in range(SEED_USERS):
                await self._insert(connection, "user", self._new_user())
            users = list(self.users)
            for _ in range(SEED_ORDERS):
                await self._insert(connection, "order", self._new_order(self.rng.choice(users)))

    async def run(self, transactions: int, done: list[int]) -> None:
        for _ in range(transactions):
            async with self.engine.begin() as connection:
                await self._transaction(connection)
            done.append(1)
            await asyncio.sleep(self.rng.random() * 0.15)

    async def _transaction(self, connection: AsyncConnection) -> None:
        rng = self.rng
        roll = rng.random()
        live = list(self.users)
        if roll < 0.2 or len(live) < 3:  # a new user with its first orders, in one transaction
            user = self._new_user()
            await self._insert(connection, "user", user)
            for _ in range(rng.randrange(3)):
                await self._insert(connection, "order", self._new_order(user["id"]))
        elif roll < 0.35:
            user = dict(self.users[rng.choice(live)])
            user.update(name=f"{user['name']}'", active=not user["active"],
                        country=rng.choice(["FR", None]), updated_at=datetime.now(UTC))  # fmt: skip
            await self._update(connection, "user", user)
        elif roll < 0.45:  # two users swap their emails
            first, second = (dict(self.users[i]) for i in rng.sample(live, 2))
            first["email"], second["email"] = second["email"], first["email"]
            for user in (first, second):
                user["updated_at"] = datetime.now(UTC)
                await self._update(connection, "user", user)
        elif roll < 0.52:  # a user leaves, and another takes the freed email at once
            leaving, taker = rng.sample(live, 2)
            for order_id in [o for o, row in self.orders.items() if row["user_id"] == leaving]:
                await self._delete(connection, "order", order_id)
            email = self.users[leaving]["email"]
            await self._delete(connection, "user", leaving)
            user = dict(self.users[taker])
            user.update(email=email, updated_at=datetime.now(UTC))
            await self._update(connection, "user", user)
        elif roll < 0.57 and self.deleted:  # a deleted id comes back
            await self._insert(connection, "user", self._new_user(self.deleted.pop(0)))
        elif roll < 0.75 or not self.orders:
            await self._insert(connection, "order", self._new_order(rng.choice(live)))
        elif roll < 0.93:
            order = dict(self.orders[rng.choice(list(self.orders))])
            order.update(status=rng.choice(["paid", "shipped", "cancelled", "refunded"]),
                         updated_at=datetime.now(UTC))  # fmt: skip
            if rng.random() < 0.3:
                order["total"] += Decimal("0.01")
            await self._update(connection, "order", order)
        else:
            await self._delete(connection, "order", rng.choice(list(self.orders)))

    async def _insert(self, connection: AsyncConnection, entity: str, row: dict[str, Any]) -> None:
        columns = USER_COLUMNS if entity == "user" else ORDER_COLUMNS
        await connection.execute(
            text(f"INSERT INTO {entity}s ({', '.join(columns)})"
                 f" VALUES ({', '.join(':' + c for c in columns)})"),
            row,
        )  # fmt: skip
        self._record(entity, row)

    async def _update(self, connection: AsyncConnection, entity: str, row: dict[str, Any]) -> None:
        columns = USER_COLUMNS if entity == "user" else ORDER_COLUMNS
        assignments = ", ".join(f"{c} = :{c}" for c in columns[1:])
        await connection.execute(text(f"UPDATE {entity}s SET {assignments} WHERE id = :id"), row)
        self._record(entity, row)

    async def _delete(self, connection: AsyncConnection, entity: str, entity_id: int) -> None:
        await connection.execute(text(f"DELETE FROM {entity}s WHERE id = :id"), {"id": entity_id})
        self.ledger.changes[entity, entity_id].append(None)
        if entity == "user":
            del self.users[entity_id]
            self.deleted.append(entity_id)
        else:
            del self.orders[entity_id]

    def _record(self, entity: str, row: dict[str, Any]) -> None:
        # Recorded as the statement runs; the transaction always commits (no conflicts).
        self.ledger.changes[entity, row["id"]].append(dict(row))
        (self.users if entity == "user" else self.orders)[row["id"]] = dict(row)


async def _table(engine: AsyncEngine, entity: str, live_only: bool) -> list[tuple[Any, ...]]:
    columns = USER_COLUMNS if entity == "user" else ORDER_COLUMNS
    where = " WHERE deleted_at IS NULL" if live_only else ""
    found = await rows(engine, f"SELECT {', '.join(columns)} FROM {entity}s{where} ORDER BY id")
    return [tuple(r) for r in found]


async def _differences(source: AsyncEngine, target: AsyncEngine) -> list[str]:
    """What keeps the target from mirroring the source, in a few lines."""
    found = []
    for entity in ("user", "order"):
        want = {r[0]: r for r in await _table(source, entity, False)}
        have = {r[0]: r for r in await _table(target, entity, True)}
        wrong = [(want.get(i), have.get(i)) for i in sorted(set(want) | set(have))
                 if want.get(i) != have.get(i)]  # fmt: skip
        if wrong:
            found.append(f"{len(wrong)} {entity}s differ, e.g. (source, target) {wrong[:2]}")
    letters = await rows(target, "SELECT topic, reason FROM dead_letters LIMIT 2")
    waiting = await rows(
        target, "SELECT entity, entity_id, version, reason FROM pending_changes LIMIT 3"
    )
    return (
        found
        + ([f"dead letters: {letters}"] if letters else [])
        + ([f"waiting: {waiting}"] if waiting else [])
    )


async def _inbound(settings: Settings) -> list[tuple[str, bytes, bytes | None]]:
    consumer = AIOKafkaConsumer(
        settings.users_topic, settings.orders_topic, bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
    )  # fmt: skip
    await consumer.start()
    records: list[tuple[str, bytes, bytes | None]] = []
    try:
        while True:
            fetched = await consumer.getmany(timeout_ms=2000)
            if not fetched:
                return records
            for tp, batch in fetched.items():
                records.extend((tp.topic, r.key or b"", r.value) for r in batch)
    finally:
        await consumer.stop()


def _as_row(entity: str, data: dict[str, Any]) -> dict[str, Any]:
    """A downstream event's data in the source's types."""
    columns = USER_COLUMNS if entity == "user" else ORDER_COLUMNS
    row: dict[str, Any] = {c: data.get(c) for c in columns}
    for column in ("created_at", "updated_at"):
        row[column] = datetime.fromisoformat(row[column])
    if entity == "order":
        row["total"] = Decimal(row["total"])
    return row


async def test_the_target_mirrors_a_source_read_by_the_real_debezium_connector(
    settings: Settings, engine: AsyncEngine, endpoints: Endpoints
) -> None:
    await asyncio.to_thread(fetch_jars)
    run = settings.group_id.removeprefix("test-")
    prefix = f"test.{run}"  # the conftest deletes every topic of this test by this prefix
    settings = settings.model_copy(
        update={"inbound_format": "debezium", "users_topic": f"{prefix}.public.users",
                "orders_topic": f"{prefix}.public.orders"}
    )  # fmt: skip
    await create_topics(settings, partitions=3)
    await create_out_topics(settings)
    ledger = Ledger()
    async with source_database(endpoints.database_url, "debezium") as source:
        source_engine = source.engine()
        workers = [Worker(n, source_engine, ledger) for n in range(WORKERS)]
        for worker in workers:
            await worker.seed()
        seeded = ledger.total()
        state = STATE / run  # the worker's offsets and logs, kept when the test fails
        connect = DebeziumSource(
            settings.kafka_bootstrap, state, f"debezium-{run}",
            connector_config(source, prefix=prefix),
        )  # fmt: skip
        topics = [settings.users_topic, settings.orders_topic]
        try:
            async with Downstream(settings) as downstream, running(settings, relay=relay_part):
                await connect.start()

                async def snapshot_done() -> bool:
                    if failure := await connect.failure():
                        raise AssertionError(
                            f"the connector failed (see {state}): {failure[:2000]}"
                        )
                    return await end_offsets(settings.kafka_bootstrap, topics) >= seeded

                await wait_until(snapshot_done, within=120, what="the connector's snapshot")
                done: list[int] = []
                work = asyncio.gather(*(w.run(TRANSACTIONS, done) for w in workers))

                async def streaming_flushed() -> bool:
                    # The connector has stored a position of its stream (not only of its
                    # snapshot): killed now, it resumes there and re-sends what followed.
                    offsets = state / "connect.offsets"
                    return offsets.exists() and b"lsn_proc" in offsets.read_bytes()

                await wait_until(streaming_flushed, within=60, what="a streaming offset")
                # Half-way to the next flush (every 2 s): a second of changes to re-send.
                flushed = (state / "connect.offsets").stat().st_mtime
                await asyncio.sleep(max(0.0, flushed + 1.0 - time.time()))
                await connect.restart()  # kill -9, and start again from its offsets file
                await work
                await asyncio.gather(*(w.run(TRANSACTIONS // 3, done) for w in workers))

                async def mirrored() -> bool:
                    if failure := await connect.failure():
                        raise AssertionError(
                            f"the connector failed (see {state}): {failure[:2000]}"
                        )
                    return not await _differences(source_engine, engine)

                try:
                    await wait_until(mirrored, within=150, what="the target to mirror the source")
                except AssertionError as timeout:
                    found = await _differences(source_engine, engine)
                    raise AssertionError(f"{timeout}: {found}") from None
                await downstream.wait_for(ledger.total(), patience_s=60)
                published = await downstream.drain()
                stored = await rows(engine, VERSIONS)

                # A second connector with a slot of its own snapshots the source again:
                # every read is of a row stored as it is, so nothing changes or goes out.
                again = {**connect.config, "slot.name": f"{source.slot}_again"}
                reads = len(await _table(source_engine, "user", False)) + len(
                    await _table(source_engine, "order", False)
                )
                ends = await end_offsets(settings.kafka_bootstrap, topics) + reads
                # One connector per topic prefix in a worker (their metrics share names).
                await asyncio.to_thread(connect.worker.delete, connect.name)
                await asyncio.to_thread(connect.worker.create, f"debezium-{run}-again", again)

                async def read_again() -> bool:
                    return await end_offsets(settings.kafka_bootstrap, topics) >= ends

                await wait_until(read_again, within=60, what="the second snapshot")
                await wait_until(
                    lambda: positions_reached(engine, settings, ends), within=60,
                    what="the second snapshot to be consumed",
                )  # fmt: skip
                await asyncio.sleep(1.0)  # what a read published would have reached the relay
                assert await rows(engine, VERSIONS) == stored
                assert len(await downstream.drain()) == len(published)
        finally:
            await connect.stop()
            await source_engine.dispose()

    shutil.rmtree(state, ignore_errors=True)

    # Every deleted source row is a soft-deleted target row.
    for (entity, entity_id), changes in ledger.changes.items():
        if changes[-1] is None:
            deleted = await rows(
                engine, f"SELECT deleted_at IS NOT NULL FROM {entity}s WHERE id = :i", i=entity_id
            )
            assert deleted == [(True,)], f"{entity} {entity_id} is not soft-deleted"
    assert await count(engine, "SELECT count(*) FROM dead_letters") == 0, await rows(
        engine, "SELECT topic, reason FROM dead_letters LIMIT 3"
    )
    assert await count(engine, "SELECT count(*) FROM pending_changes") == 0

    # The restart re-sent changes, and they changed nothing.
    inbound = await _inbound(settings)
    values = [r for r in inbound if r[2] is not None]
    assert len(values) > ledger.total(), "the restart re-sent nothing: no duplicates tested"
    assert len(inbound) - len(values) >= sum(
        1 for c in ledger.changes.values() for x in c if x is None
    )  # a tombstone after each delete, skipped

    # Downstream: exactly one event per source change, per aggregate in commit order.
    _assert_downstream(settings, published, ledger)


def _assert_downstream(settings: Settings, published: list[Published], ledger: Ledger) -> None:
    assert len({p.event_id for p in published}) == len(published), "a duplicate downstream"
    entities = {settings.out_users_topic: "user", settings.out_orders_topic: "order"}
    seen: dict[Key, list[Published]] = defaultdict(list)
    for p in sorted(published, key=lambda p: (p.topic, p.partition, p.offset)):
        seen[entities[p.topic], int(p.key)].append(p)
    assert set(seen) == set(ledger.changes)
    for key, changes in ledger.changes.items():
        events = seen[key]
        versions = [int(e.value["version"]) for e in events]
        assert versions == sorted(set(versions)), f"{key}: out of order {versions}"
        got = [
            None if e.value["type"].endswith(".deleted") else _as_row(key[0], e.value["data"])
            for e in events
        ]
        assert got == changes, f"{key}: downstream {got} != source {changes}"
    assert sum(len(c) for c in seen.values()) == ledger.total()
    for event in published:  # the outbound contract is unchanged: the same keys as ever
        assert set(orjson.loads(event.raw_value)) == {
            "event_id", "type", "aggregate_id", "version", "occurred_at", "data", "source",
        }  # fmt: skip
