"""Where the schema stands: Alembic's head against the database's `alembic_version`.

The service refuses to run against a schema that is not at head, so that code and tables
always agree.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings


def alembic_config(database_url: str, settings: Settings | None = None) -> Config:
    """The project's Alembic config: the repo's `alembic.ini`, or the copy in the wheel.
    `settings` (else the process's) give migrations/env.py the connection's TLS."""
    packaged = Path(str(resources.files("sync_service"))) / "_migrations" / "alembic.ini"
    in_repo = Path(__file__).resolve().parents[2] / "alembic.ini"
    ini = in_repo if in_repo.exists() else packaged
    config = Config(str(ini))
    if ini == packaged:
        config.set_main_option("script_location", str(packaged.parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    if settings is not None:
        config.attributes["settings"] = settings
    return config


def head_revision(database_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    async with engine.connect() as connection:
        try:
            row = await connection.execute(text("SELECT version_num FROM alembic_version"))
        except ProgrammingError:  # no alembic_version table: nothing was migrated
            return None
        return row.scalar_one_or_none()


class SchemaNotAtHead(Exception):
    """The database was migrated to another revision than this code expects."""


async def require_head(engine: AsyncEngine, database_url: str) -> None:
    current = await current_revision(engine)
    head = head_revision(database_url)
    if current != head:
        raise SchemaNotAtHead(
            f"database schema is at {current or 'nothing'}, this version needs {head}: "
            "run `sync-service db upgrade`"
        )
