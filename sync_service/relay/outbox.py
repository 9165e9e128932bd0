"""Read the outbox in commit-safe order, turn rows into messages, prune what Kafka holds.

Only rows whose transaction id is below the snapshot's xmin are read, in (txid, id)
order: every older transaction has ended, so no row can ever appear behind the position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import BigInteger, Text, bindparam, cast, func, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from sync_service.db.models import OutboxEvent
from sync_service.events.dead_letter import DEAD_LETTER
from sync_service.events.dead_letter import to_message as to_dead_letter_message
from sync_service.relay.position import Position

OutboxRecord = tuple[int, int, str, bytes, bytes, bytes, bytes]
"""A fetched row (the driver's record, indexed like this tuple): txid, id, aggregate_type,
then exactly the bytes that are published: aggregate_id (the key), payload (the value),
event_type and event_id (the headers)."""
Message = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]
"""One Kafka record to send: topic, key, value, headers. A plain tuple: a chunk makes
thousands, and a class would cost more to build than the rest of the message. Only a
dead letter's key or value can be None."""

# The hot statement, sent on the driver's connection: its rows arrive as the driver's
# records, with no per-row step in between. PostgreSQL renders the payload as text and
# encodes every published field as UTF-8, so nothing is parsed or encoded here. xmin is
# an uncorrelated scalar subquery, computed once per statement: one snapshot decides
# both what is visible and what is safe.
_FETCH = f"""
SELECT txid, id, aggregate_type,
       convert_to(aggregate_id, 'UTF8'), convert_to(payload::text, 'UTF8'),
       convert_to(event_type, 'UTF8'), convert_to(event_id::text, 'UTF8')
FROM {OutboxEvent.__tablename__}
WHERE (txid, id) > ($1, $2)
  AND txid < (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint)
ORDER BY txid, id
LIMIT $3
"""
_POSITION = (bindparam("txid", type_=BigInteger), bindparam("id", type_=BigInteger))
_NEXT_TXID = select(cast(cast(func.pg_snapshot_xmax(func.pg_current_snapshot()), Text), BigInteger))
# The oldest rows up to the position, found in the order of the outbox's key (txid, id)
# and deleted by their place in the heap: a join on the key, `(txid, id) IN (...)`, was
# planned as a scan of the whole outbox. The places are read in the statement's own
# snapshot, so none can be reused before it deletes them. `<=` rather than NOT `>`: only
# a plain row comparison bounds the index scan, so a round with nothing to prune does not
# read the index of the whole backlog.
_PRUNE = text(
    f"""
DELETE FROM {OutboxEvent.__tablename__} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {OutboxEvent.__tablename__}
    WHERE (txid, id) <= (:txid, :id) ORDER BY txid, id LIMIT :limit))
"""
).bindparams(*_POSITION, bindparam("limit", type_=BigInteger))
_BACKLOG = select(
    func.count(),
    func.coalesce(func.extract("epoch", func.now() - func.min(OutboxEvent.created_at)), 0),
).where(tuple_(OutboxEvent.txid, OutboxEvent.id) > tuple_(*_POSITION))


def position_of(record: OutboxRecord) -> Position:
    return Position(record[0], record[1])


def to_messages(
    records: Sequence[OutboxRecord], topics: Mapping[str, str], dlq_topic: str | None = None
) -> list[Message]:
    """The downstream records of outbox rows (CONTRACT section 4), in order: keyed by the
    aggregate id, the payload as the value, the event type and id in headers. Dead
    letters go to `dlq_topic` as their original records (`events.dead_letter`)."""
    try:
        return [
            (topics[r[2]], r[3], r[4], [("event_type", r[5]), ("event_id", r[6])]) for r in records
        ]
    except KeyError:  # a chunk with a dead letter, or a row that cannot be routed
        return [_routed(r, topics, dlq_topic) for r in records]


def _routed(record: OutboxRecord, topics: Mapping[str, str], dlq_topic: str | None) -> Message:
    kind = record[2]
    if kind in topics:
        return (
            topics[kind],
            record[3],
            record[4],
            [("event_type", record[5]), ("event_id", record[6])],
        )
    if kind == DEAD_LETTER and dlq_topic is not None:
        return to_dead_letter_message(dlq_topic, record[4], record[6])
    # Never skipped: a row the relay cannot route stops it.
    hint = " (set SYNC_DLQ_TOPIC for the relay too)" if kind == DEAD_LETTER else ""
    raise ValueError(f"outbox row {record[1]}: unknown aggregate_type {kind!r}{hint}")


async def fetch_after(
    connection: AsyncConnection, position: Position, limit: int
) -> list[OutboxRecord]:
    """Up to `limit` rows after `position` that no running transaction can precede.

    `connection` is in autocommit (the lease's), so the statement is its own transaction
    whether it goes through SQLAlchemy or, as here, straight to the driver."""
    driver: Any = (await connection.get_raw_connection()).driver_connection
    records: list[OutboxRecord] = await driver.fetch(_FETCH, position.txid, position.id, limit)
    return records


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
