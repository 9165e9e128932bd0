"""The running service: consumer and/or relay, the health endpoints, and the gauges that
need a query; all stop together on SIGTERM or when one part fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.connections import kafka, postgres
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.db.schema import SchemaNotAtHead, current_revision, head_revision, require_head
from sync_service.db.stalls import watch_stalls
from sync_service.errors import UserError
from sync_service.kafka import require_topics
from sync_service.memory import trim_heap
from sync_service.observability.health import serve_http
from sync_service.observability.redact import masked_url
from sync_service.ops.stats import refresh_gauges
from sync_service.pipeline.consume import ChangeConsumer
from sync_service.pipeline.guard import DeadLetterGuard, guard_check
from sync_service.pipeline.write import BatchWriter
from sync_service.relay.publish import require_downstream_topics
from sync_service.retry import describe, wait_any

log = logging.getLogger(__name__)


class Part(Protocol):
    """A long-running part of the service."""

    async def run(self, stop: asyncio.Event) -> None: ...


PartFactory = Callable[[Settings, AsyncEngine], Part]


async def connect(settings: Settings) -> AsyncEngine:
    """An engine whose database answers and whose schema is at head, or a `UserError`."""
    engine = make_engine(settings)
    try:
        await require_head(engine, settings.database_url)
    except SchemaNotAtHead as error:
        await engine.dispose()
        raise UserError(str(error)) from None
    except (OperationalError, InterfaceError, DBAPIError, OSError) as error:
        await engine.dispose()
        raise postgres.unreachable(error, settings) from None
    return engine


async def serve(
    settings: Settings,
    *,
    consume: bool = True,
    relay: PartFactory | None = None,
    stop: asyncio.Event | None = None,
    on_started: Callable[[ChangeConsumer | None], Awaitable[None]] | None = None,
) -> None:
    """Run until `stop` is set (or SIGTERM/SIGINT), then shut down cleanly."""
    stop = stop or asyncio.Event()
    _install_signal_handlers(stop)
    kafka.watch(settings)
    engine = await connect(settings)
    try:
        # Before the banner: a broker that refuses or lacks a topic is one line, and the end.
        if consume:
            await require_topics(settings, [settings.users_topic, settings.orders_topic])
        if relay is not None:
            await require_downstream_topics(settings)
        sessions = make_sessionmaker(engine)
        consumer = (
            ChangeConsumer(
                settings,
                BatchWriter(
                    sessions,
                    settings.group_id,
                    settings.pending_load_limit,
                    DeadLetterGuard(settings.group_id, settings.dlq_window, settings.dlq_max_ratio),
                    publish_dead_letters=settings.dlq_topic is not None,
                ),
            )
            if consume
            else None
        )
        relay_part = relay(settings, engine) if relay is not None else None
        head = head_revision(settings.database_url)

        async def readiness() -> dict[str, str | None]:
            checks: dict[str, str | None] = {}
            try:
                at = await current_revision(engine)
                checks["database"] = None
                checks["schema"] = None if at == head else f"at {at}, needs {head}"
            except Exception as error:
                checks["database"] = describe(error)
            # The broker refusing a client (credentials, certificate) shows here while the
            # parts retry; an unreachable one shows as a consumer without partitions.
            checks["kafka"] = kafka.REFUSAL.cause
            if consumer is not None:
                checks["consumer"] = None if consumer.assigned else "no partitions assigned"
                checks["dead_letter_guard"] = guard_check(consumer.guarded.values())
            return checks

        runner = await serve_http(settings.http_port, readiness)
        log.info(
            "sync-service started",
            extra={
                "parts": [p for p, on in (("consume", consume), ("relay", relay)) if on],
                "kafka": settings.kafka_bootstrap,
                "database": masked_url(settings.database_url),
                "group": settings.group_id,
                "http_port": settings.http_port,
            },
        )
        parts: list[Coroutine[Any, Any, None]] = [
            _gauges(engine, stop),
            trim_heap(stop),
            watch_stalls(engine, settings.idle_in_transaction_timeout_ms, stop),
        ]
        if consumer is not None:
            parts.append(consumer.run(stop))
        if relay_part is not None:
            parts.append(relay_part.run(stop))
        if on_started is not None:
            await on_started(consumer)
        try:
            await _run_all(parts, stop)
        finally:
            await runner.cleanup()
    finally:
        await engine.dispose()


async def _run_all(parts: list[Coroutine[Any, Any, None]], stop: asyncio.Event) -> None:
    """Run the parts together; the first to fail stops the others, then its error is raised."""
    tasks = [asyncio.create_task(p) for p in parts]
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result


async def _gauges(engine: AsyncEngine, stop: asyncio.Event, every_s: float = 5.0) -> None:
    while not stop.is_set():
        try:
            await refresh_gauges(engine)
        except Exception as error:  # gauges are best effort; the pipeline reports failures
            log.debug("gauges not refreshed: %s", describe(error))
        await wait_any([stop], every_s)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
