"""The target database of one run: made on the service's server, migrated to head, emptied
between phases, and dropped at the end.

Invariant: a run touches only databases it made itself (`sync_bench_<run>` and the ones
beside it), so that two runs, or anyone else, never share data.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sync_service.config import Settings
from sync_service.errors import UserError
from sync_service.ops.migrate import upgrade

BENCH_DATABASE = "sync_bench"
_TABLES = "users, orders, outbox, pending_changes, dead_letters, consumer_offsets"


async def create_database(server_url: str, name: str) -> str:
    """Create database `name` on `server_url`'s server if it is missing; return its URL."""
    await _admin(server_url, name, "CREATE DATABASE {}", unless_exists=True)
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(server_url: str, name: str) -> None:
    """Drop database `name` and end any connection to it."""
    await _admin(server_url, name, "DROP DATABASE IF EXISTS {} WITH (FORCE)")


async def _admin(server_url: str, name: str, statement: str, unless_exists: bool = False) -> None:
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            if unless_exists and await connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ):
                return
            quoted = admin.dialect.identifier_preparer.quote(name)
            await connection.execute(text(statement.format(quoted)))
    except OSError as error:
        raise UserError(
            f"cannot reach PostgreSQL at {make_url(server_url).render_as_string()}: {error}"
        ) from None
    finally:
        await admin.dispose()


@dataclass(frozen=True)
class BenchDatabase:
    """A database of one run's own on the service's server, migrated to head, so that the
    run may empty its tables without touching anyone's data, another run's included."""

    name: str
    url: str
    engine: AsyncEngine

    @classmethod
    async def prepare(cls, server_url: str, name: str) -> BenchDatabase:
        url = await create_database(server_url, name)
        await upgrade(Settings(database_url=url))
        return cls(name, url, create_async_engine(url, pool_size=2))

    async def reset(self) -> None:
        """Empty every table, then checkpoint, so that no phase pays for the last one's
        dirty pages."""
        async with self.engine.begin() as connection:
            await connection.execute(text(f"TRUNCATE {_TABLES} RESTART IDENTITY CASCADE"))
        async with self.engine.connect() as connection:
            await connection.execute(text("CHECKPOINT"))

    async def server(self) -> tuple[str, dict[str, str]]:
        """The server's version and the settings that bear on write throughput."""
        names = (
            "shared_buffers",
            "synchronous_commit",
            "fsync",
            "wal_level",
            "max_wal_size",
            "checkpoint_timeout",
            "work_mem",
            "max_connections",
        )
        async with self.engine.connect() as connection:
            version = str(await connection.scalar(text("SHOW server_version")))
            rows = await connection.execute(
                text(
                    "SELECT name, setting || coalesce(unit, '') FROM pg_settings"
                    " WHERE name = ANY(:names)"
                ),
                {"names": list(names)},
            )
            return version, {str(name): str(value) for name, value in rows}
