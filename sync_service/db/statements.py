"""Set-based statements: one statement writes a whole batch's rows of a table.

Upserted rows travel as one JSON document (an array of objects), which the server turns
into typed rows, and appended rows by binary COPY; so a batch costs a handful of round
trips whatever its size. A stored row is replaced only where its version is still the one
its writer read (compare-and-set), and a new row only inserted where its key is free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, timedelta, tzinfo
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    Table,
    Text,
    bindparam,
    cast,
    column,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlalchemy.types import TypeEngine


def array_rows(
    *columns: tuple[str, str, type[TypeEngine[Any]]], name: str | None = None
) -> TableValuedAlias:
    """`unnest(:param1, :param2, ...) AS name(column1, column2, ...)`, from `(column,
    parameter, element type)` triples: one row per index of array parameters of one
    length. A batch's keys as a table to join, one parameter per column whatever their
    number (a row-value `IN` list of ~10k literal tuples exceeds PostgreSQL's stack depth)."""
    arrays = (bindparam(param, type_=ARRAY(type_)) for _, param, type_ in columns)
    named = (column_name for column_name, _, _ in columns)
    return func.unnest(*arrays).table_valued(*named).render_derived(name=name)


def _records(table: Table, columns: Sequence[str]) -> Any:
    """`SELECT ... FROM json_to_recordset(:rows) AS r(c1 type1, ...)`: the rows of one JSON
    array of objects, each field read by its column type's own input function (a key
    left out is NULL, any other is ignored).

    One JSON document instead of an array per column: orjson writes a batch in one pass
    in C, where the driver's array encoder checks every element against the abstract
    collection types in Python and reads each time's zone. In a drain the consumer spends
    about 8% less CPU an event and PostgreSQL, parsing, about 8% more; the drain runs
    about 5% faster (bench/README.md)."""
    typed = [column(name, table.c[name].type) for name in columns]
    source = func.json_to_recordset(bindparam("rows", type_=JSON)).table_valued(*typed)
    source = source.render_derived(with_types=True)
    return select(*(source.c[n] for n in columns))


def upsert_rows(
    table: Table, columns: Sequence[str], *, before: ColumnElement[Any] | None = None
) -> Insert:
    """Insert each row whose key is free, and replace each stored row only where its
    version is still the one its writer read (compare-and-set); a row changed, or taken,
    since the read is left as it is and not counted.

    Two parameters: `rows`, the rows as dicts, and `expected`, a JSON object of the
    versions read, by key (as text); a row absent from it was read as new. Both are
    JSON-encoded by the engine's serializer, and `expected` is parsed once per statement.
    The stored row is found by the insert's own probe of the key, whatever the table's
    size or statistics (a join of the rows to the table, as `UPDATE ... FROM` or `MERGE`
    would need, is one the planner orders itself: it hashed a million-row table for 5,000
    rows). `before` is evaluated once, before the first row is written (as an init plan)."""
    source = _records(table, columns)
    if before is not None:
        source = source.where(select(before).scalar_subquery().is_not(None))
    [key] = table.primary_key.columns
    read = bindparam("expected", type_=JSONB)[cast(key, Text)].astext
    stmt = insert(table).from_select(list(columns), source)
    return stmt.on_conflict_do_update(
        index_elements=[key.name],
        set_={n: stmt.excluded[n] for n in columns if n != key.name},
        where=table.c.version == cast(read, BigInteger),
    )


_READABLE_OFFSET = timedelta(hours=16)


def readable_times(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Make the times in `columns` of `rows` readable by `upsert_rows`, in place.
    PostgreSQL reads a time's text only with a UTC offset under 16 hours, where RFC 3339
    allows up to 23:59 (no zone has one): such a time becomes the same instant in UTC.
    Each zone is checked once (the validator shares one object per offset), so a row
    costs a few tenths of a microsecond."""
    readable: set[tzinfo] = set()
    for row in rows:
        for name in columns:
            moment = row[name]
            if moment is None or moment.tzinfo in readable:
                continue
            if abs(moment.utcoffset()) < _READABLE_OFFSET:
                readable.add(moment.tzinfo)
            else:
                row[name] = moment.astimezone(UTC)


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
