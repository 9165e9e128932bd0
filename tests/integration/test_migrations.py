"""The migrations build exactly the schema the models declare, and undo it completely.

Each test migrates scratch databases of its own on the real PostgreSQL server; the
service refuses to start on any schema that is not at Alembic's head.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Index, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from sync_service.config import Settings
from sync_service.db.models import Base
from sync_service.db.schema import alembic_config, head_revision
from sync_service.errors import UserError
from sync_service.service import connect
from tests.conftest import Endpoints

pytestmark = pytest.mark.integration

ScratchDatabase = Callable[[], Awaitable[str]]

# Everything PostgreSQL knows about a table's shape, in a form that can be compared.
CATALOG = """
SELECT 'column', table_name, column_name,
       concat_ws(' ', data_type, character_maximum_length, numeric_precision,
                 numeric_scale, is_nullable, column_default, is_identity)
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'constraint', conrelid::regclass::text, conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index', tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'storage', relname, '', array_to_string(reloptions, ',')
FROM pg_class WHERE relnamespace = 'public'::regnamespace AND reloptions IS NOT NULL
"""
RELATIONS = """
SELECT relname FROM pg_class
WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S')
"""


@pytest.fixture
async def scratch_database(endpoints: Endpoints) -> AsyncIterator[ScratchDatabase]:
    """Creates empty databases on the test server; drops them all at the end."""
    server = make_url(endpoints.database_url)
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    names: list[str] = []

    async def create() -> str:
        name = f"sync_mig_{uuid.uuid4().hex[:10]}"
        async with admin.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return server.set(database=name).render_as_string(hide_password=False)

    yield create
    async with admin.connect() as connection:
        for name in names:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await admin.dispose()


async def _alembic(verb: str, url: str, revision: str) -> None:
    # env.py runs its own event loop, so Alembic gets a thread of its own.
    await asyncio.to_thread(getattr(command, verb), alembic_config(url), revision)


async def _query(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            result = await connection.execute(text(sql), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        await engine.dispose()


async def _diff(url: str) -> list[Any]:
    """Alembic autogenerate's differences between the models and the database."""

    def compare(connection: Connection) -> list[Any]:
        opts = {"compare_type": True, "compare_server_default": True}
        context = MigrationContext.configure(connection, opts=opts)
        return list(compare_metadata(context, Base.metadata))

    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(compare)
    finally:
        await engine.dispose()


def _named(diff: list[Any]) -> set[tuple[str, str]]:
    found = set()
    for change in diff:
        kind, subject = change[0], change[-1]
        if isinstance(subject, Column):
            found.add((kind, f"{change[2]}.{subject.name}"))
        elif isinstance(subject, Index):
            found.add((kind, str(subject.name)))
    return found


async def _relations(url: str) -> set[str]:
    return {name for (name,) in await _query(url, RELATIONS)}


async def test_upgrade_builds_exactly_what_the_models_declare(
    scratch_database: ScratchDatabase,
) -> None:
    migrated, created = await scratch_database(), await scratch_database()
    await _alembic("upgrade", migrated, "head")

    assert await _diff(migrated) == []

    # Alembic compares neither CHECK nor EXCLUDE constraints, so compare the catalogs
    # of a migrated database and one built from the models directly.
    engine = create_async_engine(created, poolclass=NullPool)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    await engine.dispose()
    from_migrations = {
        row for row in await _query(migrated, CATALOG) if row[1] != "alembic_version"
    }
    assert from_migrations == set(await _query(created, CATALOG))
    assert ("constraint", "users", "ex_users_live_email") in {row[:3] for row in from_migrations}
    assert ("storage", "orders", "", "fillfactor=85") in from_migrations


async def test_the_comparison_sees_a_schema_that_drifted(
    scratch_database: ScratchDatabase,
) -> None:
    url = await scratch_database()
    await _alembic("upgrade", url, "head")
    await _query(url, "DROP INDEX ix_orders_user_id")
    await _query(url, "ALTER TABLE users ADD COLUMN nickname text")

    assert _named(await _diff(url)) == {
        ("add_index", "ix_orders_user_id"),
        ("remove_column", "users.nickname"),
    }


async def test_downgrade_to_base_removes_everything_and_upgrade_rebuilds_it(
    scratch_database: ScratchDatabase,
) -> None:
    url = await scratch_database()
    head = head_revision(url)
    await _alembic("upgrade", url, "head")
    built = await _relations(url)
    assert {*Base.metadata.tables, "alembic_version"} <= built

    await _alembic("downgrade", url, "base")
    assert await _relations(url) == {"alembic_version"}
    assert await _query(url, "SELECT version_num FROM alembic_version") == []

    await _alembic("upgrade", url, "head")
    assert await _query(url, "SELECT version_num FROM alembic_version") == [(head,)]
    assert await _relations(url) == built
    assert await _diff(url) == []


async def _cli(*args: str, database_url: str) -> tuple[int, str, str]:
    executable = Path(sys.executable).with_name("sync-service")
    assert executable.exists(), f"{executable} missing: install the package (pip install -e .)"
    process = await asyncio.create_subprocess_exec(
        str(executable),
        *args,
        env={**os.environ, "SYNC_DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_db_upgrade_migrates_an_empty_database_once(
    scratch_database: ScratchDatabase,
) -> None:
    url = await scratch_database()
    head = head_revision(url)

    first = await _cli("db", "upgrade", database_url=url)
    assert first[:2] == (0, f"schema upgraded from nothing to {head}\n"), first[2]
    second = await _cli("db", "upgrade", database_url=url)
    assert second[:2] == (0, f"schema already at {head}\n"), second[2]
    assert await _diff(url) == []


@pytest.mark.parametrize(
    ("revision", "described"),
    [(None, "at nothing"), ("9999", "at 9999")],
    ids=["empty database", "database ahead of the code"],
)
async def test_the_service_refuses_a_schema_not_at_head(
    scratch_database: ScratchDatabase, revision: str | None, described: str
) -> None:
    url = await scratch_database()
    if revision is not None:
        await _alembic("upgrade", url, "head")
        await _query(url, "UPDATE alembic_version SET version_num = :v", v=revision)

    with pytest.raises(UserError) as refused:
        await connect(Settings(database_url=url))
    assert f"database schema is {described}," in str(refused.value)
    assert "run `sync-service db upgrade`" in str(refused.value)


async def test_the_service_starts_on_a_schema_at_head(scratch_database: ScratchDatabase) -> None:
    url = await scratch_database()
    await _alembic("upgrade", url, "head")
    engine = await connect(Settings(database_url=url))
    await engine.dispose()
