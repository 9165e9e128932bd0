"""Read the outbox in commit-safe order, turn rows into messages, prune what Kafka holds.

Only rows whose transaction id is below the snapshot's xmin are read, in (txid, id)
order: every older transaction has ended, so no row can ever appear behind the position.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import BigInteger, Text, bindparam, cast, delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from sync_service.db.models import OutboxEvent
from sync_service.relay.position import Position

_AFTER = tuple_(OutboxEvent.txid, OutboxEvent.id) > tuple_(
    bindparam("txid", type_=BigInteger), bindparam("id", type_=BigInteger)
)
# A scalar subquery, so that xmin is computed once per statement: one snapshot decides
# both what is visible and what is safe.
_SAFE_BELOW = select(
    cast(cast(func.pg_snapshot_xmin(func.pg_current_snapshot()), Text), BigInteger)
).scalar_subquery()
_NEXT_TXID = select(cast(cast(func.pg_snapshot_xmax(func.pg_current_snapshot()), Text), BigInteger))
_FETCH = (
    select(
        OutboxEvent.txid,
        OutboxEvent.id,
        OutboxEvent.aggregate_type,
        OutboxEvent.aggregate_id,
        OutboxEvent.event_type,
        cast(OutboxEvent.event_id, Text),  # only ever sent as text
        cast(OutboxEvent.payload, Text),  # published as it is: no parse and re-encode
    )
    .where(_AFTER, OutboxEvent.txid < _SAFE_BELOW)
    .order_by(OutboxEvent.txid, OutboxEvent.id)
    .limit(bindparam("limit"))
)
_PRUNE = delete(OutboxEvent).where(
    OutboxEvent.id.in_(
        select(OutboxEvent.id).where(~_AFTER).limit(bindparam("limit")).scalar_subquery()
    )
)
_BACKLOG = select(
    func.count(),
    func.coalesce(func.extract("epoch", func.now() - func.min(OutboxEvent.created_at)), 0),
).where(_AFTER)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    txid: int
    id: int
    aggregate_type: str
    aggregate_id: str
    event_type: str
    event_id: str
    payload: str
    """The outbound event's JSON, as PostgreSQL renders the stored jsonb."""

    @property
    def position(self) -> Position:
        return Position(self.txid, self.id)


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka record to send."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def to_message(row: OutboxRow, topics: Mapping[str, str]) -> Message:
    """The downstream record of an outbox row (CONTRACT section 4): keyed by the aggregate
    id, the payload as its value, the event type and id in headers."""
    topic = topics.get(row.aggregate_type)
    if topic is None:  # never skipped: a row the relay cannot route stops it
        raise ValueError(f"outbox row {row.id}: unknown aggregate_type {row.aggregate_type!r}")
    return Message(
        topic=topic,
        key=row.aggregate_id.encode(),
        value=row.payload.encode(),
        headers=[("event_type", row.event_type.encode()), ("event_id", row.event_id.encode())],
    )


async def fetch_after(
    connection: AsyncConnection, position: Position, limit: int
) -> list[OutboxRow]:
    """Up to `limit` rows after `position` that no running transaction can precede."""
    result = await connection.execute(
        _FETCH, {"txid": position.txid, "id": position.id, "limit": limit}
    )
    return [OutboxRow(*row) for row in result]


async def next_txid(connection: AsyncConnection) -> int:
    """The id the database's next transaction will get: every stored txid is below it."""
    return int((await connection.execute(_NEXT_TXID)).scalar_one())


async def prune_through(connection: AsyncConnection, position: Position, limit: int) -> int:
    """Delete up to `limit` rows at or before `position` (already committed to Kafka)."""
    result = await connection.execute(
        _PRUNE, {"txid": position.txid, "id": position.id, "limit": limit}
    )
    return int(result.rowcount)


async def backlog(connection: AsyncConnection, position: Position) -> tuple[int, float]:
    """How many rows wait after `position`, and the age in seconds of the oldest."""
    count, age = (
        await connection.execute(_BACKLOG, {"txid": position.txid, "id": position.id})
    ).one()
    return int(count), float(age)
