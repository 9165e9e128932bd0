"""Set-based statements: one statement writes a whole batch's rows of a table.

Rows travel as one array per column and are unnested server-side, so a batch costs a
handful of round trips whatever its size. Upserts are version-guarded: a row is only
replaced by a strictly higher version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, bindparam, cast, func, select
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import Text, TypeEngine


def _unnest(table: Table, columns: Sequence[str], json_columns: Sequence[str] = ()) -> Any:
    """`SELECT * FROM unnest(:c1, :c2, ...)`, each bound as an array of the column type.
    JSON columns travel as text and are cast back, since asyncpg has no jsonb[] codec."""
    params = []
    for name in columns:
        col_type: TypeEngine[Any] = Text() if name in json_columns else table.c[name].type
        params.append(bindparam(name, type_=ARRAY(col_type)))
    source = func.unnest(*params).table_valued(*columns).render_derived()
    return select(
        *(cast(source.c[n], JSONB) if n in json_columns else source.c[n] for n in columns)
    )


def upsert_rows(table: Table, columns: Sequence[str]) -> Insert:
    """Insert or replace rows by primary key, only where the stored version is lower."""
    stmt = insert(table).from_select(list(columns), _unnest(table, columns))
    return stmt.on_conflict_do_update(
        index_elements=[c.name for c in table.primary_key.columns],
        set_={n: stmt.excluded[n] for n in columns if n != "id"},
        where=table.c.version < stmt.excluded.version,
    )


def insert_rows(table: Table, columns: Sequence[str], json_columns: Sequence[str] = ()) -> Insert:
    """Append rows (a duplicate by a unique constraint fails the statement)."""
    return insert(table).from_select(list(columns), _unnest(table, columns, json_columns))


def as_arrays(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> dict[str, list[Any]]:
    """Column-wise parameters for a statement built above."""
    return {name: [row[name] for row in rows] for name in columns}
