"""The machine's limit: the final rows and outbox rows loaded by PostgreSQL itself.

One transaction: COPY into temporary staging tables, one version-guarded INSERT ... SELECT
... ON CONFLICT per table, one COPY into `outbox`. No pipeline writing the same rows beats it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import asyncpg
from sqlalchemy import Column, MetaData, Table, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import make_url
from sqlalchemy.schema import CreateTable

from sync_service.db.models import Order, OutboxEvent, User

Record = Sequence[Any]
"""One row as a tuple in the table's column order (`COLUMNS`), with the Python types
asyncpg's binary COPY takes: int, str, bool, Decimal, aware datetime, UUID, None; the
outbox `payload` as JSON text."""

_TARGETS: Final[dict[str, Table]] = {
    "users": cast(Table, User.__table__),
    "orders": cast(Table, Order.__table__),
}
COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    name: tuple(c.name for c in table.columns) for name, table in _TARGETS.items()
}
OUTBOX_COLUMNS: Final = (
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "event_id",
    "version",
    "payload",
)
"""The outbox columns a writer sets; `id`, `txid` and `created_at` take their defaults."""


def _stage(name: str) -> Table:
    """A temporary copy of a target table's columns, dropped at commit."""
    return Table(
        f"stage_{name}",
        MetaData(),
        *(Column(c.name, c.type) for c in _TARGETS[name].columns),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DROP",
    )


_DIALECT: Final = postgresql.dialect()  # type: ignore[no-untyped-call]


def _sql(statement: Any) -> str:
    return str(statement.compile(dialect=_DIALECT))


def _upsert(name: str, stage: Table) -> str:
    """Insert every staged row, replacing a stored one only by a higher version."""
    target = _TARGETS[name]
    columns = COLUMNS[name]
    stmt = insert(target).from_select(list(columns), select(*(stage.c[n] for n in columns)))
    stmt = stmt.on_conflict_do_update(
        index_elements=["id"],
        set_={n: stmt.excluded[n] for n in columns if n != "id"},
        where=target.c.version < stmt.excluded.version,
    )
    return _sql(stmt)


_STAGES: Final = {name: _stage(name) for name in _TARGETS}
_CREATE_STAGE: Final = {name: _sql(CreateTable(stage)) for name, stage in _STAGES.items()}
_UPSERT: Final = {name: _upsert(name, stage) for name, stage in _STAGES.items()}


@dataclass(frozen=True)
class LimitResult:
    """What one load did and how long its transaction took (BEGIN to COMMIT)."""

    events: int
    users: int
    orders: int
    outbox: int
    seconds: float
    steps: dict[str, float]
    """Seconds per step (`copy users`, `upsert users`, ..., `copy outbox`, `commit`)."""

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


def asyncpg_dsn(database_url: str) -> str:
    """asyncpg's DSN for an SQLAlchemy URL such as `postgresql+asyncpg://...`."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def load(
    database_url: str,
    *,
    users: Iterable[Record],
    orders: Iterable[Record],
    outbox: Iterable[Record],
    events: int,
) -> LimitResult:
    """Load the final state in one transaction and time it; `events` is how many inbound
    events this state stands for (the rate is events per second, like every other figure).

    The inputs are turned into lists before the clock starts, so that generating them is
    not counted; encoding them for COPY is, as it is part of getting them into the server.
    """
    rows = {"users": list(users), "orders": list(orders)}
    outbox_rows = list(outbox)
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        applied: dict[str, int] = {}
        steps: dict[str, float] = {}
        started = clock = time.perf_counter()

        def step(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            steps[name] = now - clock
            clock = now

        async with connection.transaction():
            for name in ("users", "orders"):  # users first: orders refer to them
                await connection.execute(_CREATE_STAGE[name])
                await connection.copy_records_to_table(
                    _STAGES[name].name, records=rows[name], columns=COLUMNS[name]
                )
                step(f"copy {name}")
                status = await connection.execute(_UPSERT[name])
                applied[name] = int(status.split()[-1])  # "INSERT 0 <rows>"
                step(f"upsert {name}")
            await connection.copy_records_to_table(
                OutboxEvent.__tablename__, records=outbox_rows, columns=OUTBOX_COLUMNS
            )
            step("copy outbox")
        step("commit")
        seconds = time.perf_counter() - started
    finally:
        await connection.close()
    return LimitResult(
        events, applied["users"], applied["orders"], len(outbox_rows), seconds, steps
    )
