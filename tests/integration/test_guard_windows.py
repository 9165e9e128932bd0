"""The dead-letter guard reads every partition's window in one statement: each partition is
judged on its own window (from its stored start, never before the last `window` offsets),
a partition already held is left alone, and the most common kind names the trip."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.events.change import DeadLetter, DeadLetterKind, Source
from sync_service.pipeline.batch import Batch
from sync_service.pipeline.guard import DeadLetterGuard, Trip

pytestmark = pytest.mark.integration

GROUP, TOPIC, WINDOW = "guard-windows", "guard.windows", 10


@pytest.fixture
async def sessions(
    database_url: str, engine: AsyncEngine
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with engine.begin() as connection:
        await connection.execute(
            text("DELETE FROM partition_guards WHERE group_id = :g"), {"g": GROUP}
        )
    service = make_engine(Settings(database_url=database_url))
    yield make_sessionmaker(service)
    await service.dispose()


def letter(partition: int, offset: int, kind: DeadLetterKind) -> DeadLetter:
    return DeadLetter(
        Source(TOPIC, partition, offset), b"k", b"v", 1, kind, f"{kind} at {offset}", 1
    )


async def store(session: AsyncSession, letters: list[DeadLetter]) -> None:
    await session.execute(
        text(
            'INSERT INTO dead_letters (topic, partition, "offset", key, key_size, value,'
            " value_size, kind, reason) VALUES (:t, :p, :o, 'k', 1, 'v', 1, :kind, :reason)"
        ),
        [
            {"t": d.source.topic, "p": d.source.partition, "o": d.source.offset,
             "kind": d.kind, "reason": d.reason}
            for d in letters
        ],
    )  # fmt: skip


async def test_each_partition_is_judged_on_its_own_window_in_one_batch(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    guard = DeadLetterGuard(GROUP, WINDOW, max_ratio=0.5)  # more than 5 of 10 trips it
    earlier = [letter(0, o, "not_json") for o in (0, 1, 2)]  # outside partition 0's window
    batch = Batch(
        dead=[
            # 0: 3 + 3 in offsets 10-19, a tie broken by the kind's name.
            *(letter(0, o, "not_json") for o in (11, 12, 13)),
            *(letter(0, o, "invalid") for o in (15, 16, 17)),
            # 1: 5 of 10, not more.
            *(letter(1, o, "oversized") for o in range(5)),
            # 2: held already, whatever it holds.
            *(letter(2, o, "invalid") for o in range(10)),
            # 3: resumed at offset 8, so 6 of its letters were counted before.
            *(letter(3, o, "bad_key") for o in range(2, 10)),
        ],
        next_offsets={(TOPIC, 0): 20, (TOPIC, 1): 10, (TOPIC, 2): 10, (TOPIC, 3): 10},
    )
    async with sessions() as session, session.begin():
        await store(session, earlier + batch.dead)
        await session.execute(
            text(
                "INSERT INTO partition_guards (group_id, topic, partition, paused_at, window_from)"
                " VALUES (:g, :t, 2, now(), 0), (:g, :t, 3, NULL, 8)"
            ),
            {"g": GROUP, "t": TOPIC},
        )
        trips = await guard.check(session, batch)
    assert trips == [Trip(TOPIC, 0, 6, WINDOW, "invalid", "invalid at 15")]
    async with sessions() as session:
        stored = await session.execute(
            text(
                "SELECT partition, paused_at IS NOT NULL, dead, kind FROM partition_guards"
                " WHERE group_id = :g ORDER BY partition"
            ),
            {"g": GROUP},
        )
        assert [tuple(row) for row in stored] == [
            (0, True, 6, "invalid"),
            (2, True, None, None),
            (3, False, None, None),
        ]


async def test_a_batch_that_tips_a_window_counts_the_letters_before_it(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    guard = DeadLetterGuard(GROUP, WINDOW, max_ratio=0.5)
    before = [letter(5, o, "invalid") for o in (3, 4, 5, 6)]
    batch = Batch(dead=[letter(5, o, "not_json") for o in (10, 11)], next_offsets={(TOPIC, 5): 12})
    async with sessions() as session, session.begin():
        await store(session, before + batch.dead)
        [trip] = await guard.check(session, batch)  # offsets 2-11: 6 letters
    assert (trip.dead, trip.kind, trip.reason) == (6, "invalid", "invalid at 3")
