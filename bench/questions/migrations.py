"""Question 3: migrations under traffic. Schema changes on a large table while writers
commit small transactions and a long reader holds its lock, with and without a
lock_timeout, and what a failed CREATE INDEX CONCURRENTLY leaves behind."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from alembic.runtime.migration import MigrationContext
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from bench.progress import say
from bench.questions.figures import latency_summary, overlapping
from bench.questions.plan import MODES, Mode, Plan
from sync_service.retry import Backoff, describe


@dataclass(frozen=True)
class Ddl:
    """One schema change; `{name}` is the column or index it adds or alters."""

    label: str
    statement: str
    creates_index: bool = False
    concurrently: bool = False


DDLS: Final = (
    Ddl("ADD COLUMN int NULL", "ALTER TABLE q_ledger ADD COLUMN {name} int NULL"),
    Ddl(
        "ADD COLUMN int DEFAULT 0", "ALTER TABLE q_ledger ADD COLUMN {name} int NOT NULL DEFAULT 0"
    ),
    Ddl(
        "ADD COLUMN DEFAULT random()",
        "ALTER TABLE q_ledger ADD COLUMN {name} double precision DEFAULT random()",
    ),
    Ddl("CREATE INDEX", "CREATE INDEX {name} ON q_ledger (account)", creates_index=True),
    Ddl(
        "CREATE INDEX CONCURRENTLY",
        "CREATE INDEX CONCURRENTLY {name} ON q_ledger (account)",
        creates_index=True,
        concurrently=True,
    ),
    Ddl("ALTER COLUMN TYPE bigint", "ALTER TABLE q_ledger ALTER COLUMN {name} TYPE bigint"),
)
WRITERS: Final = 2
SET_LOCK_TIMEOUT: Final = "SELECT set_config('lock_timeout', :value, :local)"
"""`SET [LOCAL] lock_timeout`, with the value bound."""
WRITER_PAUSE_S: Final = 0.005


async def _create_ledger(url: str, plan: Plan) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            # Autovacuum would take locks of its own in the middle of a measurement.
            await connection.execute(
                text(
                    "CREATE TABLE q_ledger (id bigserial PRIMARY KEY, account int NOT NULL,"
                    " amount int NOT NULL, note text NOT NULL,"
                    + ", ".join(f" n_{mode} int NOT NULL DEFAULT 0" for mode in MODES)
                    + ") WITH (autovacuum_enabled = false)"
                )
            )
            await connection.execute(
                text(
                    "INSERT INTO q_ledger (account, amount, note)"
                    " SELECT g % 1000, g, 'entry ' || g FROM generate_series(1, :rows) g"
                ),
                {"rows": plan.ledger_rows},
            )
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(text("VACUUM ANALYZE q_ledger"))
    finally:
        await engine.dispose()


async def _writer(
    engine: AsyncEngine, rows: int, spans: list[tuple[float, float]], stop: asyncio.Event
) -> None:
    """Small transactions back to back, like the service's batches: insert, update, commit."""
    while not stop.is_set():
        started = time.monotonic()
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO q_ledger (account, amount, note)"
                    " SELECT g, g, 'batch' FROM generate_series(1, 5) g"
                )
            )
            await connection.execute(
                text("UPDATE q_ledger SET amount = amount + 1 WHERE id = :id"),
                {"id": random.randint(1, rows)},
            )
        spans.append((started, time.monotonic()))
        await asyncio.sleep(WRITER_PAUSE_S)


async def _long_reader(url: str, hold_s: float, holding: asyncio.Event) -> float:
    """A report: one transaction that reads the table and stays open for `hold_s`, keeping
    its ACCESS SHARE lock; returns when it committed (monotonic)."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("SELECT count(*) FROM q_ledger"))
            holding.set()
            await asyncio.sleep(hold_s)
        return time.monotonic()
    finally:
        await engine.dispose()


async def _attempt(url: str, ddl: Ddl, name: str, lock_timeout_s: float | None) -> str:
    """One try of `ddl`: "ok", "lock_timeout", or the error. Transactional DDL runs the way
    migrations/env.py runs it (SET LOCAL in the migration's transaction); CONCURRENTLY
    cannot run in a transaction, so it runs in autocommit, as in an autocommit_block."""
    engine = create_async_engine(url, poolclass=NullPool)
    timeout = {"value": f"{int(lock_timeout_s * 1000)}ms"} if lock_timeout_s else None
    try:
        if ddl.concurrently:
            async with engine.connect() as connection:
                await connection.execution_options(isolation_level="AUTOCOMMIT")
                if timeout:
                    await connection.execute(text(SET_LOCK_TIMEOUT), {**timeout, "local": False})
                await connection.execute(text(ddl.statement.format(name=name)))
        else:
            async with engine.begin() as connection:
                if timeout:
                    await connection.execute(text(SET_LOCK_TIMEOUT), {**timeout, "local": True})
                await connection.execute(text(ddl.statement.format(name=name)))
    except sa_exc.DBAPIError as error:
        cause = error.orig.__cause__ if error.orig is not None else None
        if isinstance(cause, asyncpg.LockNotAvailableError):
            return "lock_timeout"
        return describe(error)
    finally:
        await engine.dispose()
    return "ok"


async def _index_state(engine: AsyncEngine, name: str) -> str:
    async with engine.connect() as connection:
        valid = await connection.scalar(
            text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
            {"name": name},
        )
    return "absent" if valid is None else ("valid" if valid else "invalid")


async def _drop_index(engine: AsyncEngine, name: str) -> None:
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))


@dataclass
class Migration:
    """How a change went: `ended` is when its last attempt ended (monotonic);
    `failed_index_left` what a failed CONCURRENTLY build left behind, and `cleanup_s` how
    long dropping it took."""

    outcome: str = ""
    attempts: int = 0
    ended: float = 0.0
    failed_index_left: str | None = None
    cleanup_s: float | None = None


async def _migrate(
    url: str, engine: AsyncEngine, ddl: Ddl, name: str, mode: Mode, plan: Plan
) -> Migration:
    lock_timeout = None if mode in ("alone", "queued") else plan.lock_timeout_s
    backoff = Backoff(plan.lock_timeout_s / 4, plan.lock_timeout_s)
    done = Migration()
    while True:
        done.attempts += 1
        done.outcome = await _attempt(url, ddl, name, lock_timeout)
        done.ended = time.monotonic()
        if done.outcome != "ok" and ddl.concurrently:
            done.failed_index_left = await _index_state(engine, name)
            if done.failed_index_left == "invalid":  # unusable, yet updated by every write
                await _drop_index(engine, name)
                done.cleanup_s = round(time.monotonic() - done.ended, 2)
        if done.outcome != "lock_timeout" or mode != "lock_timeout_retry":
            return done
        await asyncio.sleep(backoff.next_delay())  # writers get through in between


async def run_change(url: str, plan: Plan, index: int, ddl: Ddl, mode: Mode) -> dict[str, Any]:
    """Writers running; in every mode but "alone" a long reader holding ACCESS SHARE; then
    the change. The writers' latency is taken over the change's window."""
    name = f"n_{mode}" if "TYPE" in ddl.label else f"q{index}_{mode}"
    engine = create_async_engine(url, pool_size=WRITERS + 1, max_overflow=0)
    spans: list[tuple[float, float]] = []
    stop, holding = asyncio.Event(), asyncio.Event()
    writers = [
        asyncio.create_task(_writer(engine, plan.ledger_rows, spans, stop)) for _ in range(WRITERS)
    ]
    reader: asyncio.Task[float] | None = None
    try:
        began = time.monotonic()
        await asyncio.sleep(plan.lead_s)
        if mode != "alone":
            reader = asyncio.create_task(_long_reader(url, plan.reader_hold_s, holding))
            await holding.wait()
            await asyncio.sleep(plan.lead_s)
        start = time.monotonic()
        done = await _migrate(url, engine, ddl, name, mode, plan)
        reader_end = await reader if reader is not None else None
        await asyncio.sleep(plan.lead_s)
    finally:
        stop.set()
        await asyncio.gather(*writers)
        if ddl.creates_index:
            await _drop_index(engine, name)  # every index change starts from the same table
        await engine.dispose()
    before = [span for span in spans if span[1] < start]
    return {
        "change": ddl.label,
        "mode": mode,
        "outcome": done.outcome,
        "attempts": done.attempts,
        "failed_index_left": done.failed_index_left,
        "cleanup_s": done.cleanup_s,
        "ddl_s": round(done.ended - start, 2),
        "reader_ended_after_ddl_start_s": (
            round(reader_end - start, 2) if reader_end is not None else None
        ),
        "writer_before": latency_summary(before),
        "commits_per_s_before": round(len(before) / (start - began), 1),
        "writer_during": latency_summary(overlapping(spans, start, done.ended)),
        "commits_during": sum(1 for span in spans if start <= span[1] <= done.ended),
    }


ENV_PY_SETTINGS: Final = ("SET LOCAL lock_timeout = '5s'", "SET lock_timeout = '5s'")
"""migrations/env.py's statement, and its session-level form."""


def _lock_timeout_seen(connection: Connection, statement: str) -> dict[str, str]:
    """`SHOW lock_timeout` in a migration's transaction after `statement`, inside an
    Alembic autocommit_block (which commits that transaction first), and after it."""
    context = MigrationContext.configure(connection)

    def show() -> str:
        return str(connection.exec_driver_sql("SHOW lock_timeout").scalar())

    with context.begin_transaction():
        context.execute(statement)
        seen = {"statement": statement, "in_transaction": show()}
        with context.autocommit_block():
            seen["inside_autocommit_block"] = show()
        seen["after_autocommit_block"] = show()
    return seen


async def autocommit_block_settings(url: str) -> list[dict[str, str]]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        found = []
        for statement in ENV_PY_SETTINGS:
            async with engine.connect() as connection:
                found.append(await connection.run_sync(_lock_timeout_seen, statement))
        return found
    finally:
        await engine.dispose()


async def question_migrations(url: str, plan: Plan) -> dict[str, Any]:
    say(f"migrations: a ledger of {plan.ledger_rows:,} rows")
    await _create_ledger(url, plan)
    runs = []
    for index, ddl in enumerate(DDLS):
        for mode in plan.modes:
            say(f"migrations: {ddl.label}, {mode}")
            runs.append(await run_change(url, plan, index, ddl, mode))
    return {
        "ledger_rows": plan.ledger_rows,
        "writers": WRITERS,
        "writer_transaction": "INSERT 5 rows + UPDATE 1 row by id, then commit; 5 ms pause",
        "reader_hold_s": plan.reader_hold_s,
        "lock_timeout_s": plan.lock_timeout_s,
        "modes": {
            "alone": "no other transaction open; no lock_timeout",
            "queued": "a reader transaction holds ACCESS SHARE; no lock_timeout",
            "lock_timeout": f"the same reader; SET LOCAL lock_timeout = {plan.lock_timeout_s} s",
            "lock_timeout_retry": "the same, retried with backoff until it succeeds",
        },
        "runs": runs,
        "lock_timeout_and_autocommit_block": await autocommit_block_settings(url),
    }
