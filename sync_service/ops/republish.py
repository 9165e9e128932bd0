"""`sync-service republish`: re-send the current state of rows downstream, as snapshot
events (`user.snapshot`, `order.snapshot`) in the outbox, which the relay publishes exactly
once like any other row.

Interleaving with live changes: the relay publishes in transaction-id order, and a batch's
id is taken before it writes. So each chunk first takes its own id, then waits until every
older transaction has ended (their changes are then committed and visible), then reads its
rows under a share lock: a batch that writes one of them later waits for this chunk and,
being younger, is published after the snapshot. A younger batch that wrote one of them
first (the lock waited for it) would be published after a snapshot that already holds its
state, so the chunk starts again with a new, younger id. Downstream, per row, versions
never go back and the last event holds the row's newest state. Chunks commit one by one,
each with the audit row's outcome, so the audit row always says how much was re-sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Table,
    Text,
    cast,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sync_service.config import Settings
from sync_service.db.models import Order, OutboxEvent, User
from sync_service.errors import UserError
from sync_service.events.change import Entity
from sync_service.events.outbound import snapshot_event_id, snapshot_value
from sync_service.ops import audit
from sync_service.pipeline.plan import COLUMNS
from sync_service.pipeline.write import OUTBOX_CHANNEL
from sync_service.retry import describe, is_transient
from sync_service.service import connect

OLDER_WAIT_S = 60.0
"""How long a chunk waits for the transactions older than itself before giving up."""
ATTEMPTS = 50
"""How often a chunk may start again because a younger batch wrote one of its rows first."""
_TABLES: dict[Entity, Table] = {"user": User.__table__, "order": Order.__table__}  # type: ignore[dict-item]
_TXID = select(cast(cast(func.pg_current_xact_id(), Text), BigInteger))
_XMIN = select(cast(cast(func.pg_snapshot_xmin(func.pg_current_snapshot()), Text), BigInteger))
_NOTIFY = text("SELECT pg_notify(:channel, '')").bindparams(channel=OUTBOX_CHANNEL)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which rows: `ids`, every row (`all_`), or those changed at or after `since`."""

    entity: Entity
    ids: Sequence[int] | None = None
    all_: bool = False
    since: datetime | None = None

    def check(self) -> None:
        given = sum((self.ids is not None and len(self.ids) > 0, self.all_, self.since is not None))
        if given != 1:
            raise UserError("give exactly one of --id N (one or more), --all and --since TS")

    def arguments(self, chunk: int) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "ids": sorted(set(self.ids)) if self.ids else None,
            "all": self.all_,
            "since": self.since.isoformat() if self.since else None,
            "chunk": chunk,
        }


async def republish(settings: Settings, selection: Selection, chunk: int = 1_000) -> str:
    """Write one snapshot outbox row per selected row, `chunk` rows per transaction;
    returns one line that says how many were re-sent."""
    selection.check()
    table = _TABLES[selection.entity]
    engine = await connect(settings)
    arguments = selection.arguments(chunk)
    done = _Done(selection.entity)
    try:
        if selection.ids:
            await _require_known(engine, table, selection)
        after = 0
        while True:
            try:
                rows = await _send_chunk(engine, settings, selection, arguments, after, chunk, done)
            except Exception as error:  # after the start: say so, with what did commit
                outcome = f"failed after {done.summary()}: {describe(error)}"
                await audit.record_failure(
                    engine, settings, "republish", arguments, outcome, done.action_id
                )
                raise
            if len(rows) < chunk:
                break
            after = int(rows[-1]["id"])
        return done.summary() + "; the relay publishes them"
    finally:
        await engine.dispose()


@dataclass(slots=True)
class _Done:
    """What the committed chunks of one re-send did."""

    entity: Entity = "user"
    action_id: int | None = None
    sent: int = 0
    deleted: int = 0
    chunks: int = 0

    def summary(self) -> str:
        entity, sent, chunks = self.entity, self.sent, self.chunks
        line = f"re-sent {sent} {entity}{'' if sent == 1 else 's'} as {entity}.snapshot"
        if self.deleted:
            line += f" ({self.deleted} of them deleted)"
        return line + f" in {chunks} chunk{'' if chunks == 1 else 's'}"


async def _send_chunk(
    engine: AsyncEngine,
    settings: Settings,
    selection: Selection,
    arguments: dict[str, Any],
    after: int,
    chunk: int,
    done: _Done,
) -> list[dict[str, Any]]:
    """One chunk in one transaction (started again while a younger batch wrote one of its
    rows first, or a deadlock chose it); returns its rows."""
    for _ in range(ATTEMPTS):
        try:
            rows = await _attempt_chunk(engine, settings, selection, arguments, after, chunk, done)
        except Exception as error:
            # A deadlock with a batch that locks the same rows in another order (one of
            # the two is rolled back), or the database blinked: the chunk starts again.
            if not is_transient(error):
                raise
            await asyncio.sleep(0.05)
            continue
        if rows is not None:
            return rows
    raise UserError(
        f"rows kept changing under the re-send ({ATTEMPTS} attempts at one chunk): "
        "try again with a smaller --chunk"
    )


async def _attempt_chunk(
    engine: AsyncEngine,
    settings: Settings,
    selection: Selection,
    arguments: dict[str, Any],
    after: int,
    chunk: int,
    done: _Done,
) -> list[dict[str, Any]] | None:
    """One attempt at a chunk; None when a younger batch wrote one of its rows first."""
    table = _TABLES[selection.entity]
    async with engine.connect() as connection, connection.begin() as transaction:
        found = await _read_chunk(connection, table, selection, after, chunk)
        if found is None:
            await transaction.rollback()
            return None
        rows, now = found
        if not rows and done.action_id is not None:
            return rows  # the last chunk was full and nothing followed it
        if done.action_id is None:
            action_id = await audit.record(connection, settings, "republish", arguments, "started")
        else:
            action_id = done.action_id
        await _write_snapshots(connection, selection.entity, rows, now, action_id)
        committed = _Done(
            selection.entity,
            action_id,
            done.sent + len(rows),
            done.deleted + sum(1 for row in rows if row["deleted_at"] is not None),
            done.chunks + 1,
        )
        await audit.amend(connection, action_id, committed.summary())
    # Committed: only now does `done` say so (a failed attempt leaves it as it was).
    done.action_id, done.sent, done.deleted, done.chunks = (
        action_id, committed.sent, committed.deleted, committed.chunks,
    )  # fmt: skip
    return rows


async def _require_known(engine: AsyncEngine, table: Table, selection: Selection) -> None:
    """Refuse ids with no row at all (a deleted row has one, and is re-sent as deleted)."""
    wanted = sorted(set(selection.ids or ()))
    async with engine.connect() as connection:
        found = set((await connection.execute(
            select(table.c.id).where(table.c.id.in_(wanted))
        )).scalars())  # fmt: skip
    unknown = [i for i in wanted if i not in found]
    if unknown:
        raise UserError(
            f"no {selection.entity} with id {', '.join(map(str, unknown))} in the target: "
            "nothing was re-sent"
        )


async def _read_chunk(
    connection: AsyncConnection, table: Table, selection: Selection, after: int, chunk: int
) -> tuple[list[dict[str, Any]], datetime] | None:
    """The next `chunk` selected rows after id `after`, read once every older transaction
    has ended and share-locked until this one ends; None when a younger transaction wrote
    one of them first (see the module's docstring)."""
    txid = int((await connection.execute(_TXID)).scalar_one())
    deadline = time.monotonic() + OLDER_WAIT_S
    while int((await connection.execute(_XMIN)).scalar_one()) < txid:
        if time.monotonic() > deadline:
            raise UserError(
                f"a transaction older than this re-send is still open after {OLDER_WAIT_S:.0f}s"
                " (see pg_stat_activity, xact_start): end it, or try again later"
            )
        await asyncio.sleep(0.02)
    query = (
        select(*(table.c[name] for name in COLUMNS[selection.entity]), _younger(table))
        .where(table.c.id > after)
        .order_by(table.c.id)
        .limit(chunk)
        .with_for_update(read=True)
    )
    if selection.ids:
        query = query.where(table.c.id.in_(sorted(set(selection.ids))))
    elif selection.since is not None:
        since = selection.since
        since = since.replace(tzinfo=UTC) if since.tzinfo is None else since
        query = query.where(or_(table.c.updated_at >= since, table.c.deleted_at >= since))
    rows = [dict(row) for row in (await connection.execute(query)).mappings()]
    if any(row.pop("younger") for row in rows):
        return None
    now = (await connection.execute(select(func.now()))).scalar_one()
    return rows, now


def _younger(table: Table) -> ColumnElement[bool]:
    """Whether the row's version was written by a transaction younger than this one (its
    xmin is more recent: a smaller age; a frozen xmin's age is the largest)."""
    return literal_column(
        f"age({table.name}.xmin) < age(pg_current_xact_id()::xid)", Boolean
    ).label("younger")


async def _write_snapshots(
    connection: AsyncConnection,
    entity: Entity,
    rows: list[dict[str, Any]],
    now: datetime,
    action_id: int,
) -> None:
    if not rows:
        return
    values = []
    for row in rows:
        event_id = snapshot_event_id(action_id, entity, row["id"], row["version"])
        values.append(
            {
                "aggregate_type": entity,
                "aggregate_id": str(row["id"]),
                "event_type": f"{entity}.snapshot",
                "event_id": event_id,
                "version": row["version"],
                "payload": snapshot_value(entity, row, event_id, now),
            }
        )
    await connection.execute(insert(OutboxEvent), values)
    await connection.execute(_NOTIFY)
