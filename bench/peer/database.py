"""The peer's target database and the check that it holds the expected final state.

The peer writes into a database of its own with our tables' columns and types; a live row
there must equal ours exactly, and a deleted entity must be gone (the sink deletes rows).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Column, Index, MetaData, Table, func, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from bench.peer.encode import Entity
from sync_service.db.models import Base, Order, User

PEER_DATABASE = "peer"

# Same columns and types as ours, the primary key and the index on orders.user_id, but
# neither the foreign key nor the live-email rule: the sink applies each topic in arrival
# order with no way to wait for a user, so those rules would only make it fail.
_METADATA = MetaData()
_MODELS: tuple[tuple[Entity, type[Base]], ...] = (("user", User), ("order", Order))
PEER_TABLES: dict[Entity, Table] = {
    entity: Table(
        model.__tablename__,
        _METADATA,
        *(
            Column(c.name, c.type, primary_key=c.primary_key, autoincrement=False)
            for c in model.__table__.columns
        ),
    )
    for entity, model in _MODELS
}
Index("ix_orders_user_id", PEER_TABLES["order"].c.user_id)

# The columns a peer row is compared on: all but `deleted_at`, which the peer never sets.
STATE_COLUMNS: dict[Entity, tuple[str, ...]] = {
    entity: tuple(c.name for c in table.columns if c.name != "deleted_at")
    for entity, table in PEER_TABLES.items()
}

Row = tuple[Any, ...]


@dataclass
class PeerState:
    """The rows the peer must end with: entity -> id -> row in `STATE_COLUMNS` order."""

    rows: dict[Entity, dict[int, Row]] = field(default_factory=lambda: {"user": {}, "order": {}})

    def totals(self, entity: Entity) -> tuple[int, int]:
        """(row count, sum of versions): what the cheap progress query compares."""
        rows = self.rows[entity]
        return len(rows), sum(row[-1] for row in rows.values())


def _row(entity: Entity, data: Mapping[str, Any], version: int) -> Row:
    values: list[Any] = []
    for name in STATE_COLUMNS[entity]:
        value: Any = data.get(name)
        if name == "version":
            value = version
        elif name in ("created_at", "updated_at"):
            value = datetime.fromisoformat(value)
        elif name == "total":
            value = Decimal(repr(value) if isinstance(value, float) else value)
        values.append(value)
    return tuple(values)


def expected_state(event_values: Iterable[bytes]) -> PeerState:
    """Each entity at its highest version; an entity whose highest version is a delete has
    no row. This is also what our service ends with, less its soft-deleted rows."""
    latest: dict[tuple[Entity, int], tuple[int, dict[str, Any]]] = {}
    for value in event_values:
        event = orjson.loads(value)
        key = (event["entity"], int(event["data"]["id"]))
        seen = latest.get(key)
        if seen is None or event["version"] > seen[0]:
            latest[key] = (event["version"], event)
    state = PeerState()
    for (entity, entity_id), (version, event) in latest.items():
        if event["op"] != "delete":
            state.rows[entity][entity_id] = _row(entity, event["data"], version)
    return state


def peer_url(database_url: str, database: str = PEER_DATABASE) -> URL:
    """The peer's database on the same server as `database_url` (an SQLAlchemy URL)."""
    return make_url(database_url).set(database=database)


def jdbc_url(url: URL) -> str:
    """What the JDBC sink connects with (the user and password go in their own settings)."""
    return f"jdbc:postgresql://{url.host or 'localhost'}:{url.port or 5432}/{url.database}"


async def prepare(database_url: str, database: str = PEER_DATABASE) -> URL:
    """Create the peer's database if it is missing, and its tables, empty."""
    target = peer_url(database_url, database)
    admin = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            exists = await connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": database}
            )
            if not exists:
                quoted = admin.dialect.identifier_preparer.quote(database)
                await connection.execute(text(f"CREATE DATABASE {quoted}"))
    finally:
        await admin.dispose()
    engine = create_async_engine(target)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_METADATA.drop_all)
            await connection.run_sync(_METADATA.create_all)
    finally:
        await engine.dispose()
    return target


async def truncate(url: URL) -> None:
    """Empty the peer's tables between runs."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            names = ", ".join(t.name for t in PEER_TABLES.values())
            await connection.execute(text(f"TRUNCATE {names}"))
    finally:
        await engine.dispose()


async def _totals(connection: AsyncConnection, entity: Entity) -> tuple[int, int]:
    table = PEER_TABLES[entity]
    query = select(func.count(), func.coalesce(func.sum(table.c.version), 0))
    count, versions = (await connection.execute(query)).one()
    return int(count), int(versions)


async def read_state(connection: AsyncConnection) -> PeerState:
    state = PeerState()
    for entity, table in PEER_TABLES.items():
        columns = [table.c[name] for name in STATE_COLUMNS[entity]]
        result = await connection.execute(select(*columns))
        state.rows[entity] = {row[0]: tuple(row) for row in result}
    return state


def differences(expected: PeerState, actual: PeerState, limit: int = 3) -> list[str]:
    """A few human-readable differences, empty when the states are equal."""
    found: list[str] = []
    for entity in ("user", "order"):
        want, have = expected.rows[entity], actual.rows[entity]
        for entity_id in sorted(want.keys() | have.keys()):
            if want.get(entity_id) != have.get(entity_id):
                found.append(
                    f"{entity} {entity_id}: want {want.get(entity_id)}, have {have.get(entity_id)}"
                )
                if len(found) >= limit:
                    return found
    return found


@dataclass(frozen=True)
class Reached:
    """`time.monotonic()` of the first poll that saw a row, and of the one that saw it all."""

    first_row: float
    final: float


async def wait_for_state(
    url: URL, expected: PeerState, *, wait_s: float, poll_s: float = 0.05
) -> Reached:
    """Block until the peer's tables hold exactly `expected`. Counts and version sums are
    polled, since they are cheap; the full comparison runs only when they match."""
    engine = create_async_engine(url)
    deadline = time.monotonic() + wait_s
    want = {entity: expected.totals(entity) for entity in PEER_TABLES}
    first_row: float | None = None
    try:
        async with engine.connect() as connection:
            while True:
                started = time.monotonic()
                have = {entity: await _totals(connection, entity) for entity in PEER_TABLES}
                await connection.rollback()  # a fresh snapshot for the next poll
                if first_row is None and any(count for count, _ in have.values()):
                    first_row = started
                if have == want:
                    actual = await read_state(connection)
                    await connection.rollback()
                    if not differences(expected, actual):
                        return Reached(first_row or started, started)
                if started > deadline:
                    actual = await read_state(connection)
                    detail = "; ".join(differences(expected, actual)) or f"totals {have} != {want}"
                    raise TimeoutError(
                        f"peer did not reach the final state in {wait_s:.0f}s: {detail}"
                    )
                await asyncio.sleep(poll_s)
    finally:
        await engine.dispose()
