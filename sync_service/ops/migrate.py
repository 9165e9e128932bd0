"""`sync-service db upgrade`: Alembic's upgrade, with one-line errors."""

from __future__ import annotations

import asyncio

from alembic import command
from alembic.util.exc import CommandError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from sync_service.config import Settings
from sync_service.connections import postgres
from sync_service.db.engine import make_engine
from sync_service.db.schema import alembic_config, current_revision
from sync_service.errors import UserError


async def upgrade(settings: Settings, revision: str = "head") -> str:
    """Migrate to `revision`; returns a line saying where the schema went."""
    engine = make_engine(settings)
    try:
        before = await current_revision(engine)
        config = alembic_config(settings.database_url, settings)
        try:
            await asyncio.to_thread(command.upgrade, config, revision)
        except CommandError as error:
            raise UserError(f"cannot upgrade to {revision!r}: {error}") from None
        after = await current_revision(engine)
    except (OperationalError, InterfaceError, DBAPIError, OSError) as error:
        raise postgres.unreachable(error, settings) from None
    finally:
        await engine.dispose()
    if before == after:
        return f"schema already at {after}"
    return f"schema upgraded from {before or 'nothing'} to {after}"
