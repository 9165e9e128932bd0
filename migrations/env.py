"""Alembic environment: the models' metadata, and the URL from settings (or from the
caller's `sqlalchemy.url`, which tests and `sync-service db upgrade` set)."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from sync_service.config import Settings, get_settings
from sync_service.connections import postgres
from sync_service.db.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or _settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        # DDL waits at most this long for a lock instead of queueing behind a long
        # transaction (and making every query behind it queue too). Session-level: an
        # autocommit_block commits this transaction, and a LOCAL setting would end with it.
        context.execute("SET lock_timeout = '5s'")
        context.run_migrations()


def _settings() -> Settings:
    settings = config.attributes.get("settings")
    return settings if isinstance(settings, Settings) else get_settings()


async def run_migrations_online() -> None:
    engine = create_async_engine(
        _url(), poolclass=pool.NullPool, connect_args=postgres.connect_args(_settings())
    )
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(run_migrations_online())
