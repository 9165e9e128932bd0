"""The machine's-limit loader writes exactly the final rows and outbox rows it is given."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncEngine

from bench.limit import load
from tests.integration.harness import rows

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
T1 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def _user(user_id: int, version: int, email: str) -> tuple[object, ...]:
    return (user_id, email, f"User {user_id}", True, "GB", T0, T1, version, None)


async def test_loads_rows_and_outbox_in_one_transaction(
    database_url: str, engine: AsyncEngine
) -> None:
    users = [_user(1, 3, "a@example.com"), (2, None, None, None, None, None, None, 5, T1)]
    orders = [(10, 1, Decimal("123456789012.34"), "EUR", "paid", T0, T1, 4, None)]
    event_ids = [uuid.uuid4() for _ in range(3)]
    outbox = [
        ("user", "1", "user.upserted", event_ids[0], 3, '{"id": 1}'),
        ("user", "2", "user.deleted", event_ids[1], 5, '{"id": 2}'),
        ("order", "10", "order.upserted", event_ids[2], 4, '{"id": 10}'),
    ]

    result = await load(database_url, users=users, orders=orders, outbox=outbox, events=9)

    assert (result.events, result.users, result.orders, result.outbox) == (9, 2, 1, 3)
    assert await rows(engine, "SELECT * FROM users ORDER BY id") == users
    assert await rows(engine, "SELECT * FROM orders") == orders
    stored = await rows(
        engine,
        "SELECT aggregate_type, aggregate_id, event_type, event_id, version, payload"
        " FROM outbox ORDER BY id",
    )
    assert stored == [(*row[:5], {"id": int(row[1])}) for row in outbox]
    assert await rows(engine, "SELECT count(DISTINCT txid) FROM outbox") == [(1,)]


async def test_a_lower_version_does_not_replace_a_stored_row(
    database_url: str, engine: AsyncEngine
) -> None:
    await load(database_url, users=[_user(1, 7, "new@example.com")], orders=[], outbox=[], events=1)

    result = await load(
        database_url, users=[_user(1, 6, "old@example.com")], orders=[], outbox=[], events=1
    )

    assert result.users == 0
    assert await rows(engine, "SELECT email, version FROM users") == [("new@example.com", 7)]
