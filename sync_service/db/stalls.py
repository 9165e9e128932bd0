"""Ending the transactions of stalled processes that PostgreSQL cannot end itself.

`idle_in_transaction_session_timeout` ends the transaction of a process that stopped
between two statements. A process stopped *inside* a statement is not idle: a COPY
waiting for the rest of its rows, or a result the server cannot finish sending, keeps
the statement active, and neither that timeout nor `statement_timeout` ends it
(PostgreSQL acts on a cancel only once the client answers again). Until the process
wakes, its row locks on the positions hold back whichever replica now owns its
partitions, and its open transaction holds back the relay's horizon.

So every serving process looks, once a second, for the service's own backends that
have waited on their client inside a transaction holding an id for longer than the
idle timeout, and ends them, as the server ends an idle one. A live process never keeps
the server waiting that long inside a statement: its COPY rows are sent in one go and
its results read at once. Ending a backend needs the same role as the service's (or
`pg_signal_backend`); without it, this logs once and does nothing more.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.db.engine import APPLICATION_NAME
from sync_service.observability import metrics
from sync_service.retry import describe, is_transient, wait_any

log = logging.getLogger(__name__)

_END_STALLED = text(
    "SELECT pid, application_name,"
    " extract(epoch FROM clock_timestamp() - state_change)::float8,"
    " pg_terminate_backend(pid)"
    " FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND (application_name = :name OR application_name LIKE :prefix)"
    " AND state = 'active' AND wait_event_type = 'Client' AND backend_xid IS NOT NULL"
    " AND state_change < clock_timestamp() - make_interval(secs => :after_s)"
)


async def end_stalled(engine: AsyncEngine, after_s: float) -> int:
    """End every backend of the service in this database that has waited on its client
    inside a statement of a writing transaction for more than `after_s`; returns how
    many were ended."""
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                _END_STALLED,
                {"name": APPLICATION_NAME, "prefix": f"{APPLICATION_NAME}/%", "after_s": after_s},
            )
        ).all()
    count = 0
    for pid, application, waited_s, ended in rows:
        if ended:
            count += 1
            metrics.STALLED_ENDED.inc()
            log.warning(
                "ended the transaction of a stalled process: it has not answered PostgreSQL"
                " inside a statement for %.1f s", waited_s,
                extra={"pid": pid, "application_name": application},
            )  # fmt: skip
    return count


async def watch_stalls(
    engine: AsyncEngine, after_ms: int, stop: asyncio.Event, every_s: float = 1.0
) -> None:
    """`end_stalled` every `every_s` until `stop` (never, when `after_ms` is 0: the idle
    timeout is off, so is this)."""
    while after_ms and not stop.is_set():
        try:
            await end_stalled(engine, after_ms / 1000)
        except Exception as error:
            if not is_transient(error):
                log.warning("stalled transactions will not be ended: %s", describe(error))
                break
            log.debug("stalled transactions not checked: %s", describe(error))
        await wait_any([stop], every_s)
    await stop.wait()
