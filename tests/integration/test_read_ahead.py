"""A batch's rows read ahead, while the batch before it is written, against PostgreSQL:
the writer brings them up to date with what it committed since, so the batch applies as
if it had read them in its own transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.events.change import Change, Entity
from sync_service.pipeline.batch import Batch, TopicPartition
from sync_service.pipeline.decode import Limits, decode
from sync_service.pipeline.write import BatchWriter
from tests.factories import encode, key_of, order_event, user_event
from tests.integration.harness import rows

pytestmark = pytest.mark.integration

LIMITS = Limits(
    max_bytes=1 << 20, max_depth=8, dead_letter_value_bytes=1024, dead_letter_key_bytes=1024
)


class Log:
    """Records appended to one partition per entity, cut into batches as they come."""

    def __init__(self) -> None:
        self.ends: dict[TopicPartition, int] = {}
        self.positions: dict[TopicPartition, int | None] = {("users", 0): None, ("orders", 0): None}

    def batch(self, *events: dict[str, Any]) -> Batch:
        batch = Batch()
        for event in events:
            entity: Entity = event["entity"]
            tp = ("users" if entity == "user" else "orders", 0)
            offset = self.ends.get(tp, 0)
            change = decode(
                entity=entity, topic=tp[0], partition=0, offset=offset,
                key=key_of(event), value=encode(event), limits=LIMITS,
            )  # fmt: skip
            assert isinstance(change, Change)
            batch.changes.append(change)
            self.ends[tp] = batch.next_offsets[tp] = offset + 1
        return batch


@pytest.fixture
async def writer(settings: Settings) -> AsyncIterator[BatchWriter]:
    engine = make_engine(settings)
    yield BatchWriter(make_sessionmaker(engine), "read-ahead", pending_load_limit=100)
    await engine.dispose()


async def write(writer: BatchWriter, log: Log, batch: Batch, *ahead: Any) -> Any:
    result = await writer.write(batch, dict(log.positions), *ahead)
    log.positions.update(result.next_offsets)
    return result


async def test_rows_read_before_the_previous_batch_committed_are_brought_up_to_date(
    writer: BatchWriter, engine: AsyncEngine
) -> None:
    log = Log()
    await write(writer, log, log.batch(user_event(1, 1, email="e@example.com")))
    before = log.batch(
        user_event(1, 2, email="f@example.com"), user_event(3, 1), user_event(4, 2),
        user_event(5, 1, email="g@example.com"),
    )  # fmt: skip
    later = log.batch(
        user_event(2, 1, email="e@example.com"),  # free once user 1 has moved on
        order_event(10, 3, 1),  # user 3 arrives in the batch before
        user_event(4, 1),  # overtaken by the batch before
        user_event(6, 1, email="g@example.com"),  # taken by user 5 in the batch before
    )
    ahead = await writer.read_ahead(later.changes)  # as the consumer does, at the latest
    await write(writer, log, before)

    result = await write(writer, log, later, ahead)

    assert (result.applied, result.stale, result.waiting) == (
        {"user": 1, "order": 1}, {"user": 1, "order": 0}, 1,
    )  # fmt: skip
    assert await rows(engine, "SELECT id, email, version FROM users ORDER BY id") == [
        (1, "f@example.com", 2), (2, "e@example.com", 1), (3, "user3@example.com", 1),
        (4, "user4@example.com", 2), (5, "g@example.com", 1),
    ]  # fmt: skip
    assert await rows(engine, "SELECT entity_id, blocked_by FROM pending_changes") == [(6, 5)]
    assert await rows(engine, "SELECT id, user_id FROM orders") == [(10, 3)]


async def test_a_read_older_than_the_commits_kept_is_read_again(
    writer: BatchWriter, engine: AsyncEngine
) -> None:
    log = Log()
    before = [log.batch(user_event(7, 2))]
    before += [log.batch(user_event(user_id, 1)) for user_id in (100, 200)]  # more commits
    # than the writer keeps the rows of: user 7's second version is not among them
    later = log.batch(user_event(7, 1))
    ahead = await writer.read_ahead(later.changes)
    for batch in before:
        await write(writer, log, batch)

    result = await write(writer, log, later, ahead)

    assert (result.applied["user"], result.stale["user"]) == (0, 1)
    assert await rows(engine, "SELECT version FROM users WHERE id = 7") == [(2,)]


async def test_rows_the_read_did_not_cover_are_read_in_the_transaction(
    writer: BatchWriter,
) -> None:
    """Waiting changes join a batch inside its transaction: their rows were never read
    ahead."""
    log = Log()
    await write(writer, log, log.batch(user_event(11, 1), order_event(12, 11, 1)))
    ahead = await writer.read_ahead([])
    waiting = log.batch(user_event(11, 2), order_event(12, 11, 2)).changes

    async with writer._sessions() as session:
        stored = await writer._stored(session, waiting, ahead)

    assert (stored["user"][11]["version"], stored["order"][12]["version"]) == (1, 1)
