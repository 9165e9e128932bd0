"""The service's connections carry a lock timeout and an idle-in-transaction timeout, and
what each ends is a transient failure (retried), never a dead letter or a crash."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
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
