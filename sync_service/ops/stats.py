"""Figures that need a query: waiting changes and the outbox backlog, for the gauges and
for `sync-service offsets`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.db.models import DeadLetterRow, OutboxEvent, PendingChange
from sync_service.observability import metrics


@dataclass(frozen=True, slots=True)
class Horizon:
    """The oldest open transaction that has a transaction id: the snapshot's xmin, below
    which alone the relay reads outbox rows (any database of the server counts)."""

    pid: int
    application: str
    state: str
    age_s: float


@dataclass(frozen=True, slots=True)
class Backlogs:
    pending: int
    pending_oldest: datetime | None
    dead_letters: int
    outbox: int
    outbox_oldest: datetime | None
    now: datetime
    outbox_held: int = 0
    """Outbox rows committed after the horizon began: the relay may not publish them yet."""
    horizon: Horizon | None = None

    def age(self, then: datetime | None) -> float:
        return (self.now - then).total_seconds() if then is not None else 0.0


async def backlogs(engine: AsyncEngine) -> Backlogs:
    async with engine.connect() as connection:
        pending, pending_oldest = (
            await connection.execute(select(func.count(), func.min(PendingChange.first_seen_at)))
        ).one()
        dead = (
            await connection.execute(
                select(func.count()).where(DeadLetterRow.redriven_at.is_(None))
            )
        ).scalar_one()
        outbox, outbox_oldest = (
            await connection.execute(select(func.count(), func.min(OutboxEvent.created_at)))
        ).one()
        now = (await connection.execute(select(func.now()))).scalar_one()
        held = (await connection.execute(_HELD)).scalar_one()
        oldest = (await connection.execute(_HORIZON)).first()
    horizon = (
        Horizon(int(oldest[0]), oldest[1] or "", oldest[2] or "", float(oldest[3]))
        if oldest
        else None
    )
    return Backlogs(pending, pending_oldest, dead, outbox, outbox_oldest, now, held, horizon)


_HELD = select(func.count()).where(
    OutboxEvent.txid >= text("pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
)
# Only a transaction with an id holds the xmin back; seeing other roles' transactions
# takes pg_read_all_stats (or pg_monitor).
_HORIZON = text(
    "SELECT pid, application_name, state, extract(epoch FROM clock_timestamp() - xact_start)"
    " FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND xact_start IS NOT NULL"
    " ORDER BY age(backend_xid) DESC LIMIT 1"
)


async def refresh_gauges(engine: AsyncEngine) -> Backlogs:
    """The waiting-change gauges (the relay, which knows its position, sets the outbox's)."""
    figures = await backlogs(engine)
    metrics.PENDING.set(figures.pending)
    metrics.PENDING_AGE.set(figures.age(figures.pending_oldest))
    metrics.OUTBOX_HELD.set(figures.outbox_held)
    metrics.HORIZON_AGE.set(figures.horizon.age_s if figures.horizon else 0.0)
    return figures
