"""The service's connections carry a lock timeout and an idle-in-transaction timeout, every
serving process ends a stalled one's transaction where those cannot, and what each ends
is a transient failure (retried), never a dead letter or a crash."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.db.stalls import end_stalled
from sync_service.pipeline.batch import Batch
from sync_service.pipeline.write import BatchWriter
from sync_service.retry import is_transient


async def test_the_fence_behind_a_held_position_lock_times_out_as_transient(
    settings: Settings, engine: AsyncEngine
) -> None:
    own = settings.model_copy(update={"lock_timeout_ms": 300, "instance_id": "faults-fence"})
    service = make_engine(own)
    writer = BatchWriter(make_sessionmaker(service), own.group_id, own.pending_load_limit)
    tp = (own.users_topic, 0)
    async with engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)"
                 " VALUES (:g, :t, 0, 5)"),
            {"g": own.group_id, "t": tp[0]},
        )  # fmt: skip
    try:
        async with engine.connect() as holder:  # another owner's batch, say, or a person
            await holder.execute(
                text("SELECT * FROM consumer_offsets WHERE group_id = :g FOR UPDATE"),
                {"g": own.group_id},
            )
            with pytest.raises(DBAPIError, match="lock timeout") as caught:
                await writer.write(Batch(next_offsets={tp: 6}), {tp: 5})
            assert is_transient(caught.value)
            await holder.rollback()
        # Once the lock is free, the same batch goes through.
        result = await writer.write(Batch(next_offsets={tp: 6}), {tp: 5})
        assert result.next_offsets == {tp: 6}
        async with service.connect() as connection:
            name = await connection.scalar(text("SELECT current_setting('application_name')"))
        assert name == "sync-service/faults-fence"
    finally:
        await service.dispose()


async def test_a_transaction_left_idle_is_ended_and_its_error_is_transient(
    settings: Settings,
) -> None:
    own = settings.model_copy(update={"idle_in_transaction_timeout_ms": 300})
    service = make_engine(own)
    try:
        async with service.connect() as connection:
            await connection.execute(text("SELECT pg_current_xact_id()"))  # a stalled batch
            await asyncio.sleep(1.0)
            with pytest.raises(DBAPIError) as caught:
                await connection.execute(text("SELECT 1"))
            assert is_transient(caught.value), caught.value
    finally:
        await service.dispose()


async def test_a_process_stalled_inside_a_statement_is_ended_and_its_locks_freed(
    settings: Settings, engine: AsyncEngine
) -> None:
    """Stopped in the middle of a COPY, a batch is active, not idle: neither of the
    server's timeouts ends it. `end_stalled` does, once it has waited long enough."""
    own = settings.model_copy(update={"instance_id": "faults-stalled"})
    service = make_engine(own)
    release = asyncio.Event()

    async def rows() -> AsyncIterator[tuple[int]]:
        yield (1,)
        await release.wait()  # the process stops here, its COPY half sent
        yield (2,)

    async with engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)"
                 " VALUES (:g, 'stalled', 0, 5)"),
            {"g": own.group_id},
        )  # fmt: skip
    locked = text(
        "SELECT next_offset FROM consumer_offsets WHERE group_id = :g AND topic = 'stalled'"
        " FOR UPDATE NOWAIT"
    ).bindparams(g=own.group_id)
    try:
        async with service.connect() as stalled:
            await stalled.execute(text("CREATE TEMP TABLE copied (n int)"))
            await stalled.execute(locked)  # the positions' fence
            driver = (await stalled.get_raw_connection()).driver_connection
            assert driver is not None
            copying = asyncio.create_task(driver.copy_records_to_table("copied", records=rows()))
            await asyncio.sleep(0.5)
            assert await end_stalled(engine, after_s=30) == 0, "ended before its time"
            assert await end_stalled(engine, after_s=0.2) == 1
            async with engine.begin() as other:  # the lock is free at once
                assert await other.scalar(locked) == 5
            release.set()
            with pytest.raises(asyncpg.ConnectionDoesNotExistError) as caught:
                await copying
            assert is_transient(caught.value), caught.value
            await stalled.invalidate()
    finally:
        release.set()
        await service.dispose()
