"""Set-based statements: one statement writes a whole batch's rows of a table.

Rows travel as one array per column and are unnested server-side, or, where they are
only appended, by binary COPY; so a batch costs a handful of round trips whatever its
size. Upserts are version-guarded: a row is only replaced by a strictly higher version.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Table, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import Insert


def _unnest(table: Table, columns: Sequence[str]) -> Any:
    """`SELECT * FROM unnest(:c1, :c2, ...)`, each bound as an array of the column type."""
    params = [bindparam(name, type_=ARRAY(table.c[name].type)) for name in columns]
    source = func.unnest(*params).table_valued(*columns).render_derived()
    return select(*(source.c[n] for n in columns))


def upsert_rows(
    table: Table, columns: Sequence[str], *, before: ColumnElement[Any] | None = None
) -> Insert:
    """Insert or replace rows by primary key, only where the stored version is lower.
    `before` is evaluated once, before the first row is written (as an init plan)."""
    source = _unnest(table, columns)
    if before is not None:
        source = source.where(select(before).scalar_subquery().is_not(None))
    stmt = insert(table).from_select(list(columns), source)
    return stmt.on_conflict_do_update(
        index_elements=[c.name for c in table.primary_key.columns],
        set_={n: stmt.excluded[n] for n in columns if n != "id"},
        where=table.c.version < stmt.excluded.version,
    )


def as_arrays(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> dict[str, list[Any]]:
    """Column-wise parameters for a statement built above."""
    return {name: [row[name] for row in rows] for name in columns}


async def copy_rows(
    session: AsyncSession, table: Table, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
) -> None:
    """Append `rows` (tuples in `columns` order) to `table` by binary COPY, inside the
    session's transaction (which must have begun: a statement ran). Columns left out take
    their defaults. Cheaper than an INSERT for both sides: no per-element array checks in
    the driver, no executor in the server."""
    connection = await (await session.connection()).get_raw_connection()
    driver = connection.driver_connection
    if driver is None or not driver.is_in_transaction():
        raise RuntimeError("copy_rows needs a transaction that has begun")
    await driver.copy_records_to_table(
        table.name, records=rows, columns=list(columns), schema_name=table.schema
    )
