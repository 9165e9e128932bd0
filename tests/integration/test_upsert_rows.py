"""A batch's rows reach their tables exactly as planned: the upsert's one JSON document
(`db.statements`) keeps every value, the extremes of each column's type included (a
time's offset too large for PostgreSQL's reader among them); a stored row is replaced
only where its version is still the one its writer read, and a new row is inserted only
where its key is free."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text

from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.events.change import Change, Entity
from sync_service.pipeline.batch import BatchBuilder
from sync_service.pipeline.decode import Limits, decode
from sync_service.pipeline.plan import COLUMNS
from sync_service.pipeline.write import _UPSERTS, BatchWriter
from tests.factories import encode, user_event

BIGGEST = 2**63 - 1
DAY = datetime(2026, 1, 2, tzinfo=UTC)
INDIA = timezone(timedelta(hours=5, minutes=30))
NEWFOUNDLAND = timezone(-timedelta(hours=3, minutes=30))
USERS: list[dict[str, Any]] = [
    {
        "id": BIGGEST, "email": "o'neil+\"q\"@例え.jp", "active": False, "country": None,
        "name": 'quote " backslash \\ newline \n tab \t emoji 🦆 U+2028 \u2028 rtl مرحبا',
        "created_at": datetime(1, 1, 1, tzinfo=UTC),
        "updated_at": datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        "version": BIGGEST, "deleted_at": None,
    },
    {
        "id": 1, "email": "a@example.com", "name": "n" * 255, "active": True, "country": "GB",
        "created_at": datetime(2026, 1, 2, 3, 4, 5, 1, tzinfo=INDIA),
        "updated_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=NEWFOUNDLAND),
        "version": 0, "deleted_at": datetime(2026, 6, 1, 0, 0, 0, 500_000, tzinfo=UTC),
    },
]  # fmt: skip
ORDERS: list[dict[str, Any]] = [
    {
        "id": BIGGEST, "user_id": BIGGEST, "total": Decimal("999999999999.99"), "currency": "EUR",
        "status": "refunded", "created_at": DAY, "updated_at": DAY, "version": 3,
        "deleted_at": None,
    },
    {
        "id": 1, "user_id": 1, "total": Decimal("0.00"), "currency": "JPY", "status": "pending",
        "created_at": DAY, "updated_at": DAY, "version": 1, "deleted_at": None,
    },
]  # fmt: skip


async def _stored(settings: Settings, table: str, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    engine = make_engine(settings)
    try:
        async with engine.connect() as connection:
            found = await connection.execute(
                text(f"SELECT {', '.join(columns)} FROM {table} ORDER BY id DESC")
            )
            return [dict(zip(columns, row, strict=True)) for row in found]
    finally:
        await engine.dispose()


async def _upsert(
    settings: Settings,
    users: list[dict[str, Any]],
    orders: list[dict[str, Any]],
    expected: dict[str, int] | None = None,
) -> int:
    """Upsert the rows, with the versions read by id (`expected`); how many were written."""
    engine = make_engine(settings)
    written = 0
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            by_entity: dict[Entity, list[dict[str, Any]]] = {"user": users, "order": orders}
            for entity, rows in by_entity.items():
                if rows:
                    done = await session.execute(
                        _UPSERTS[entity], {"rows": rows, "expected": expected or {}}
                    )
                    written += int(done.rowcount)  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
    return written


async def test_every_value_is_stored_as_it_was_planned(settings: Settings) -> None:
    assert await _upsert(settings, USERS, ORDERS) == 4
    assert await _stored(settings, "users", COLUMNS["user"]) == USERS
    assert await _stored(settings, "orders", COLUMNS["order"]) == ORDERS


async def test_a_stored_row_is_replaced_only_where_its_version_is_still_the_one_read(
    settings: Settings,
) -> None:
    await _upsert(settings, USERS, ORDERS)
    moved_on = {**ORDERS[0], "version": 4, "status": "paid"}  # read at 2, stored at 3
    as_read = {**ORDERS[1], "version": 2, "total": Decimal("12.50")}
    expected = {str(BIGGEST): 2, "1": 1}
    assert await _upsert(settings, [], [moved_on, as_read], expected) == 1
    assert await _stored(settings, "orders", COLUMNS["order"]) == [ORDERS[0], as_read]


async def test_a_new_row_is_inserted_only_where_its_key_is_free(settings: Settings) -> None:
    await _upsert(settings, USERS, ORDERS)
    taken = {**ORDERS[1], "version": 5, "status": "paid"}  # read as new, stored at 1
    fresh = {**ORDERS[1], "id": 2}
    assert await _upsert(settings, [], [taken, fresh]) == 1
    assert await _stored(settings, "orders", COLUMNS["order"]) == [ORDERS[0], fresh, ORDERS[1]]


async def test_a_time_whose_offset_postgresql_cannot_read_is_stored_as_the_same_instant(
    settings: Settings,
) -> None:
    # RFC 3339 allows offsets up to 23:59; PostgreSQL reads a time's text only under 16:00.
    far = user_event(7, 1, created_at="2026-01-02T03:04:05+20:00")
    far["data"]["updated_at"] = "2026-01-02T03:04:05.5-23:59"
    change = decode(entity="user", topic="t", partition=0, offset=0, key=b"7",
                    value=encode(far), limits=Limits.of(settings))  # fmt: skip
    assert isinstance(change, Change)
    builder = BatchBuilder(max_events=10, max_wait_s=1)
    builder.add(change, now=0)
    engine = make_engine(settings)
    try:
        writer = BatchWriter(make_sessionmaker(engine), "g", pending_load_limit=10)
        await writer.write(builder.take(), {("t", 0): None})
        async with engine.connect() as connection:
            found = await connection.execute(text("SELECT payload::text FROM outbox"))
            payload = orjson.loads(found.scalar_one())
    finally:
        await engine.dispose()
    [stored] = await _stored(settings, "users", ("created_at", "updated_at"))
    assert stored == {
        "created_at": datetime(2026, 1, 1, 7, 4, 5, tzinfo=UTC),
        "updated_at": datetime(2026, 1, 3, 3, 3, 5, 500_000, tzinfo=UTC),
    }
    assert payload["data"]["created_at"] == "2026-01-01T07:04:05+00:00"  # as stored
