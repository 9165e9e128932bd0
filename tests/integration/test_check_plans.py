"""The orders' upsert plans its foreign-key checks once (the connection otherwise plans
every query per execution), and the batch's NOTIFY restores per-execution planning for
what follows in the transaction."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.pipeline.write import _NOTIFY, _UPSERTS

pytestmark = pytest.mark.integration

NOW = datetime(2026, 1, 2, tzinfo=UTC)
USER = {
    "id": 1, "email": "a@example.com", "name": "A", "active": True, "country": "GB",
    "created_at": NOW, "updated_at": NOW, "version": 1, "deleted_at": None,
}  # fmt: skip
ORDER = {
    "id": 10, "user_id": 1, "total": Decimal("9.99"), "currency": "EUR", "status": "paid",
    "created_at": NOW, "updated_at": NOW, "version": 1, "deleted_at": None,
}  # fmt: skip


async def plan_mode(session: AsyncSession) -> str:
    return str(await session.scalar(text("SELECT current_setting('plan_cache_mode')")))


async def test_the_orders_upsert_plans_its_checks_once_and_the_notify_restores_custom_plans(
    settings: Settings,
) -> None:
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            assert await plan_mode(session) == "force_custom_plan"
            await session.execute(_UPSERTS["user"], {"rows": [USER], "expected": {}})
            assert await plan_mode(session) == "force_custom_plan"
            done = await session.execute(_UPSERTS["order"], {"rows": [ORDER], "expected": {}})
            assert done.rowcount == 1  # type: ignore[attr-defined]
            assert await plan_mode(session) == "force_generic_plan"
            await session.execute(_NOTIFY)
            assert await plan_mode(session) == "force_custom_plan"
    finally:
        await engine.dispose()
