"""The async engine and session factory, configured from settings.

Sessions never expire objects on commit: the pipeline reads rows after committing and
must not trigger lazy loads, which an async session cannot do.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from sync_service.config import Settings
from sync_service.connections import postgres


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


APPLICATION_NAME = "sync-service"
"""How the service's connections name themselves in `pg_stat_activity` (followed by
`/<SYNC_INSTANCE_ID>` where one is set)."""


def make_engine(settings: Settings, *, application_name: str = APPLICATION_NAME) -> AsyncEngine:
    """An engine whose pool is sized and recycled as the settings say, and whose every
    connection (the relay's LISTEN one too) uses the TLS the settings say. Its connections
    name the replica (`sync-service/<SYNC_INSTANCE_ID>`) in `pg_stat_activity`."""
    if settings.instance_id:
        application_name = f"{application_name}/{settings.instance_id}"[:63]
    # Every statement is planned for its own arrays: a plan cached while a table was
    # still nearly empty (a generic plan, chosen after five executions) joins a batch's
    # keys by nested loops, which costs time quadratic in the batch once the table grows.
    server_settings = {"application_name": application_name, "plan_cache_mode": "force_custom_plan"}
    if settings.statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
    # A stalled replica's open batch ends within the idle timeout, freeing its position
    # locks and the relay's xmin; a wait on a lock ends within the lock timeout and is
    # retried (the fence's `FOR UPDATE` behind a stalled owner among them).
    if settings.idle_in_transaction_timeout_ms:
        server_settings["idle_in_transaction_session_timeout"] = str(
            settings.idle_in_transaction_timeout_ms
        )
    if settings.lock_timeout_ms:
        server_settings["lock_timeout"] = str(settings.lock_timeout_ms)
    return create_async_engine(
        settings.database_url,
        pool_size=settings.pool_size,
        pool_use_lifo=True,  # the batches keep to one warm server process
        max_overflow=settings.max_overflow,
        pool_pre_ping=settings.pool_pre_ping,
        pool_recycle=settings.pool_recycle,
        pool_timeout=settings.pool_timeout,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
        connect_args={
            "server_settings": server_settings,
            "timeout": 10,
            **postgres.connect_args(settings),
        },
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for one unit of work each: `async with factory() as s, s.begin(): ...`."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
