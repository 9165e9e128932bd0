"""Fault scenarios: the service's processes are started, stopped, killed and paused from
outside while a stream flows (see scenario.py for the checks every scenario ends with)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.faults.scenario import log_outbox


@pytest.fixture
async def logged(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """The test's engine, with every committed outbox row recorded until the test ends."""
    await log_outbox(engine)
    try:
        yield engine
    finally:
        await log_outbox(engine, on=False)
