"""The pipeline end to end: events on Kafka become rows, dead letters and positions."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from tests.factories import order_event, user_event
from tests.integration.harness import (
    create_topics,
    positions_reached,
    produce,
    rows,
    running,
    wait_until,
)


async def test_an_order_before_its_user_applies_once_the_user_arrives(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings)
    await produce(
        settings, settings.orders_topic, [order_event(1, 7, 1), order_event(1, 7, 2, status="paid")]
    )
    async with running(settings):
        await wait_until(lambda: positions_reached(engine, settings, 2), what="orders consumed")
        assert await rows(engine, "SELECT id FROM orders") == []
        await produce(settings, settings.users_topic, [user_event(7, 1)])

        async def applied() -> bool:
            return bool(await rows(engine, "SELECT 1 FROM orders WHERE version = 2"))

        await wait_until(applied, what="the waiting order to apply")
    assert await rows(engine, "SELECT id, user_id, status, version FROM orders") == [
        (1, 7, "paid", 2)
    ]
    assert await rows(engine, "SELECT count(*) FROM pending_changes") == [(0,)]
    assert await rows(
        engine, "SELECT event_type, version FROM outbox WHERE aggregate_type = 'order' ORDER BY id"
    ) == [("order.upserted", 1), ("order.upserted", 2)]
