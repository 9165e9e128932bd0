"""The pool hands out the connection returned last: a consumer's batches keep to one
server process while the gauges' short checkouts come and go."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker

pytestmark = pytest.mark.integration


async def test_a_checkout_takes_the_connection_returned_last(settings: Settings) -> None:
    engine = make_engine(settings)
    backend = text("SELECT pg_backend_pid()")
    try:
        sessions = make_sessionmaker(engine)
        async with sessions() as batch, sessions() as gauge:
            batch_pid = await batch.scalar(backend)
            gauge_pid = await gauge.scalar(backend)
            await gauge.close()  # the gauge's connection is returned first, the batch's last
        assert batch_pid != gauge_pid
        for _ in range(3):
            async with sessions() as session:
                assert await session.scalar(backend) == batch_pid
    finally:
        await engine.dispose()
