"""Two writers racing on one aggregate (an upstream that put it on two partitions, say):
the one that commits second finds a row changed since its read, raises `LostUpdate`
with nothing written, and its retry plans again from what is stored. Each version is
applied once, and its outbox rows stay in version order.

Writer A writes and holds its transaction open; writer B reads (A's rows are not
visible yet), plans, and blocks on A's row; A commits, and B's statement goes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.events.change import Change
from sync_service.pipeline.batch import Batch, BatchBuilder, TopicPartition
from sync_service.pipeline.decode import Limits, decode
from sync_service.pipeline.write import BatchWriter, LostUpdate, WriteResult
from tests.factories import encode, user_event

pytestmark = pytest.mark.integration

GROUP, TOPIC = "racing-writers", "racing.users"
A, B = (TOPIC, 0), (TOPIC, 1)


@pytest.fixture
async def sessions(
    settings: Settings, engine: AsyncEngine
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    service = make_engine(settings)
    yield make_sessionmaker(service)
    await service.dispose()


def batch(settings: Settings, tp: TopicPartition, *versions: int, name: str = "x") -> Batch:
    builder = BatchBuilder(max_events=100, max_wait_s=1)
    for offset, version in enumerate(versions):
        value = encode(user_event(1, version, name=f"{name}{version}"))
        change = decode(entity="user", topic=tp[0], partition=tp[1], offset=offset, key=b"1",
                        value=value, limits=Limits.of(settings))  # fmt: skip
        assert isinstance(change, Change)
        builder.add(change, now=0)
    return builder.take()


def held(writer: BatchWriter, wrote: asyncio.Event, commit: asyncio.Event) -> None:
    """Make `writer` stop after its rows and outbox are written, until `commit` is set."""
    store_positions: Callable[..., Any] = writer._store_positions

    async def hold(*args: Any) -> None:
        wrote.set()
        await commit.wait()
        await store_positions(*args)

    writer._store_positions = hold  # type: ignore[method-assign,assignment]


async def blocked_on_a_lock(engine: AsyncEngine) -> None:
    """Return once some session of this database waits for a lock (B, on A's row)."""
    for _ in range(500):
        async with engine.connect() as connection:
            waiting = await connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the second writer never waited for the first one's row")


async def race(
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    first: Batch,
    second: Batch,
) -> BaseException | WriteResult:
    """Write `first` (A) and `second` (B) as described above; B's outcome (A must succeed)."""
    a, b = (BatchWriter(sessions, GROUP, pending_load_limit=100) for _ in "ab")
    wrote, commit = asyncio.Event(), asyncio.Event()
    held(a, wrote, commit)
    writing_a = asyncio.create_task(a.write(first, {A: None}))
    await wrote.wait()
    writing_b = asyncio.create_task(b.write(second, {B: None}))
    await blocked_on_a_lock(engine)
    commit.set()
    await writing_a
    [outcome] = await asyncio.gather(writing_b, return_exceptions=True)
    return outcome


async def outbox(engine: AsyncEngine) -> list[tuple[int, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT version, payload->'data'->>'name' FROM outbox ORDER BY txid, id")
        )
        return [(int(v), str(n)) for v, n in rows]


async def positions(engine: AsyncEngine) -> dict[int, int]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT partition, next_offset FROM consumer_offsets WHERE group_id = :g"),
            {"g": GROUP},
        )
        return {int(p): int(n) for p, n in rows}


async def test_a_new_row_inserted_by_another_writer_first_is_a_lost_update_then_stale(
    settings: Settings, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    first, second = batch(settings, A, 1, name="a"), batch(settings, B, 1, name="b")
    outcome = await race(engine, sessions, first, second)

    assert isinstance(outcome, LostUpdate), outcome
    assert await positions(engine) == {0: 1}  # B wrote nothing
    retried = await BatchWriter(sessions, GROUP, 100).write(second, {B: None})
    assert retried.stale["user"] == 1
    assert retried.outbox == 0
    assert await outbox(engine) == [(1, "a1")]


async def test_a_row_changed_by_another_writer_since_the_read_is_a_lost_update(
    settings: Settings, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    await BatchWriter(sessions, GROUP, 100).write(
        batch(settings, (TOPIC, 2), 1), {(TOPIC, 2): None}
    )
    # B read version 1 and plans 2 and 3; A writes 2 first. A version-guarded upsert
    # would write B's 3 over A's 2, and its outbox would hold version 2 twice.
    first, second = batch(settings, A, 2, name="a"), batch(settings, B, 2, 3, name="b")
    outcome = await race(engine, sessions, first, second)

    assert isinstance(outcome, LostUpdate), outcome
    retried = await BatchWriter(sessions, GROUP, 100).write(second, {B: None})
    assert (retried.stale["user"], retried.applied["user"]) == (1, 1)
    assert await outbox(engine) == [(1, "x1"), (2, "a2"), (3, "b3")]
    async with engine.connect() as connection:
        stored = (await connection.execute(text("SELECT version, name FROM users"))).all()
    assert [tuple(row) for row in stored] == [(3, "b3")]
