"""The writer at sizes that break naive SQL: ten thousand waiting changes settled at once."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.events.change import Change, Entity
from sync_service.pipeline.batch import Batch
from sync_service.pipeline.decode import Limits, decode
from sync_service.pipeline.write import BatchWriter
from tests.factories import encode, key_of, order_event, user_event
from tests.integration.harness import count

LIMITS = Limits(
    max_bytes=1 << 20, max_depth=8, dead_letter_value_bytes=1024, dead_letter_key_bytes=1024
)


def _batch(topic: str, events: list[dict[str, object]], first_offset: int) -> Batch:
    batch = Batch()
    entity: Entity = "user" if topic == "users" else "order"
    for offset, event in enumerate(events, start=first_offset):
        change = decode(
            entity=entity,
            topic=topic,
            partition=0,
            offset=offset,
            key=key_of(event),
            value=encode(event),
            limits=LIMITS,
        )
        assert isinstance(change, Change)
        batch.changes.append(change)
    batch.next_offsets[(topic, 0)] = first_offset + len(events)
    return batch


async def test_ten_thousand_waiting_orders_apply_in_one_batch(
    settings: Settings, engine: AsyncEngine
) -> None:
    orders = [order_event(i, 1 + i % 100, 1) for i in range(1, 12_001)]
    users = [user_event(u, 1) for u in range(1, 101)]
    service_engine = make_engine(settings)
    writer = BatchWriter(make_sessionmaker(service_engine), "scale", pending_load_limit=20_000)
    try:
        await writer.write(_batch("orders", orders, 0), {("orders", 0): None, ("users", 0): None})
        assert await count(engine, "SELECT count(*) FROM pending_changes") == 12_000
        result = await writer.write(
            _batch("users", users, 0), {("orders", 0): 12_000, ("users", 0): None}
        )
    finally:
        await service_engine.dispose()
    assert result.resolved == 12_000
    assert await count(engine, "SELECT count(*) FROM pending_changes") == 0
    assert await count(engine, "SELECT count(*) FROM orders") == 12_000
    assert await count(engine, "SELECT count(*) FROM outbox") == 12_100
