"""Figures that need a query: waiting changes and the outbox backlog, for the gauges and
for `sync-service offsets`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.db.models import DeadLetterRow, OutboxEvent, PendingChange
from sync_service.observability import metrics


@dataclass(frozen=True, slots=True)
class Backlogs:
    pending: int
    pending_oldest: datetime | None
    dead_letters: int
    outbox: int
    outbox_oldest: datetime | None
    now: datetime

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
    return Backlogs(pending, pending_oldest, dead, outbox, outbox_oldest, now)


async def refresh_gauges(engine: AsyncEngine) -> Backlogs:
    """The waiting-change gauges (the relay, which knows its position, sets the outbox's)."""
    figures = await backlogs(engine)
    metrics.PENDING.set(figures.pending)
    metrics.PENDING_AGE.set(figures.age(figures.pending_oldest))
    return figures
