"""Drive the real service in-process against the real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.connections import kafka
from sync_service.kafka import ensure_topics
from sync_service.service import PartFactory, serve
from tests.factories import encode, key_of

Message = tuple[bytes | None, bytes | None]  # key, value


def as_environment(settings: Settings) -> dict[str, str]:
    """`settings` as the SYNC_* variables that would give them (unset ones left out)."""
    return {
        f"SYNC_{name.upper()}": value.get_secret_value()
        if isinstance(value, SecretStr)
        else str(value)
        for name, value in settings.model_dump().items()
        if value is not None
    }


async def create_topics(settings: Settings, partitions: int = 3) -> None:
    await ensure_topics(
        settings,
        {settings.users_topic: partitions, settings.orders_topic: partitions},
    )


async def produce(
    settings: Settings, topic: str, messages: Iterable[dict[str, Any] | Message]
) -> None:
    """Send envelopes (keyed by their id) or raw (key, value) pairs, in order, and wait."""
    producer = kafka.producer(settings, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for message in messages:
            key: bytes | None
            value: bytes | None
            if isinstance(message, dict):
                key, value = key_of(message), encode(message)
            else:
                key, value = message
            futures.append(await producer.send(topic, value=value, key=key))
        await producer.flush()
        for future in futures:
            await future
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, consume: bool = True, relay: PartFactory | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    """The service running in this process until the block ends (then stopped cleanly)."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, consume=consume, relay=relay, stop=stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, within: float = 60.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> Sequence[Any]:
    async with engine.connect() as connection:
        return (await connection.execute(text(sql), params)).all()


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(text(sql), params)).scalar()


async def count(engine: AsyncEngine, sql: str, **params: Any) -> int:
    """A `SELECT count(*) ...` (or any single integer) as an int."""
    return int(await scalar(engine, sql, **params))


async def positions_reached(engine: AsyncEngine, settings: Settings, total: int) -> bool:
    """True once the stored positions of the test's group add up to `total` records."""
    stored = await scalar(
        engine,
        "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = :g",
        g=settings.group_id,
    )
    return int(stored) >= total
