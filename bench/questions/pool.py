"""Question 1: the connection pool under bursts. Tasks hold a connection for a slow call
inside, after or outside their transaction; how long they wait, how many time out, and
what pool_pre_ping costs per checkout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bench.progress import say
from bench.questions._db import SELECT_ONE, select_one_times
from bench.questions.figures import first_line, ms
from bench.questions.plan import Plan
from bench.questions.wire import NO_TLS, counting
from bench.report import percentile
from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.retry import Backoff, retrying

Pattern = Literal["held", "committed", "released", "held_retried"]
PATTERNS: Final[dict[Pattern, str]] = {
    "held": "slow await inside the session's transaction",
    "committed": "commit, then the slow await (session still open)",
    "released": "slow await after the session closed",
    "held_retried": "inside the transaction, pool timeouts retried as the service does",
}
POOL_SIZE: Final = 5
MAX_OVERFLOW: Final = 5


@dataclass
class Burst:
    waits: list[float] = field(default_factory=list)
    completed: int = 0
    timeouts: int = 0
    timeout_message: str | None = None


class PoolWatch:
    """The most connections checked out of one pool at once."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.out = self.peak = 0
        event.listen(engine.sync_engine, "checkout", self._checkout)
        event.listen(engine.sync_engine, "checkin", self._checkin)

    def _checkout(self, *_: Any) -> None:
        self.out += 1
        self.peak = max(self.peak, self.out)

    def _checkin(self, *_: Any) -> None:
        self.out -= 1


async def _query(session: AsyncSession, burst: Burst) -> None:
    started = time.perf_counter()
    await session.connection()  # the checkout: waits here while the pool is empty
    burst.waits.append(time.perf_counter() - started)
    await session.execute(SELECT_ONE)


def _work(
    pattern: Pattern,
    factory: async_sessionmaker[AsyncSession],
    hold_s: float,
    burst: Burst,
    settings: Settings,
) -> Callable[[], Awaitable[None]]:
    async def held() -> None:
        async with factory() as session:
            await _query(session, burst)
            await asyncio.sleep(hold_s)  # the slow call, while the transaction pins a connection

    async def committed() -> None:
        async with factory() as session:
            await _query(session, burst)
            await session.commit()  # the transaction ends and its connection goes back
            await asyncio.sleep(hold_s)

    async def released() -> None:
        async with factory() as session:
            await _query(session, burst)
        await asyncio.sleep(hold_s)

    async def counted_held() -> None:
        try:
            await held()
        except sa_exc.TimeoutError:
            burst.timeouts += 1
            raise

    async def held_retried() -> None:
        backoff = Backoff(settings.retry_initial_ms / 1000, settings.retry_max_ms / 1000)
        await retrying("burst", counted_held, backoff)

    return {
        "held": held,
        "committed": committed,
        "released": released,
        "held_retried": held_retried,
    }[pattern]


async def _one(work: Callable[[], Awaitable[None]], burst: Burst) -> None:
    try:
        await work()
    except sa_exc.TimeoutError as error:
        burst.timeouts += 1
        burst.timeout_message = burst.timeout_message or first_line(error)
    else:
        burst.completed += 1


async def _warm(engine: AsyncEngine) -> None:
    """Open the pool's persistent connections, so that waits are queueing, not connecting."""

    async def one() -> None:
        async with engine.connect() as connection:
            await connection.execute(SELECT_ONE)
            await asyncio.sleep(0.05)

    await asyncio.gather(*(one() for _ in range(POOL_SIZE)))


async def run_burst(url: str, plan: Plan, pattern: Pattern, size: int) -> dict[str, Any]:
    """`size` tasks at once on the service's own engine (make_engine), pool 5 + 5."""
    settings = Settings(
        database_url=url,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_timeout=plan.pool_timeout_s,
        pool_pre_ping=True,
    )
    engine = make_engine(settings, application_name="questions-burst")
    factory = make_sessionmaker(engine)
    burst = Burst()
    try:
        await _warm(engine)
        watch = PoolWatch(engine)
        work = _work(pattern, factory, plan.hold_s, burst, settings)
        started = time.perf_counter()
        await asyncio.gather(*(_one(work, burst) for _ in range(size)))
        total = time.perf_counter() - started
    finally:
        await engine.dispose()
    return {
        "pattern": pattern,
        "tasks": size,
        "completed": burst.completed,
        "timeout_errors": burst.timeouts,
        "wait_p50_ms": ms(percentile(burst.waits, 50)) if burst.waits else None,
        "wait_p99_ms": ms(percentile(burst.waits, 99)) if burst.waits else None,
        "total_s": round(total, 2),
        "peak_connections": watch.peak,
        "timeout_message": burst.timeout_message,
    }


async def _checkout_times(url: str, pre_ping: bool, count: int) -> list[float]:
    engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=pre_ping)
    times = []
    try:
        for _ in range(count + 1):
            connection = engine.connect()
            started = time.perf_counter()
            await connection.start()
            times.append(time.perf_counter() - started)
            await connection.close()
    finally:
        await engine.dispose()
    return times[1:]  # the first one connected


async def _checkout_round_trips(url: str, pre_ping: bool, count: int) -> float:
    async with counting(url) as (proxied, proxy):
        engine = create_async_engine(
            proxied, pool_size=1, max_overflow=0, pool_pre_ping=pre_ping, connect_args=NO_TLS
        )
        try:
            async with engine.connect():
                pass  # connected: what follows is checkouts only
            before = replace(proxy.wire)
            for _ in range(count):
                async with engine.connect():
                    pass
            return proxy.wire.since(before).round_trips / count
        finally:
            await engine.dispose()


async def pre_ping_cost(url: str, plan: Plan) -> dict[str, Any]:
    """Checkout latency with and without pool_pre_ping, the round trips each costs (counted
    on the wire), and one plain SELECT 1 round trip for scale."""
    found: dict[str, Any] = {"checkouts": plan.checkouts}
    for pre_ping in (False, True):
        times = await _checkout_times(url, pre_ping, plan.checkouts)
        key = "with_pre_ping" if pre_ping else "without_pre_ping"
        found[key] = {
            "checkout_p50_ms": ms(percentile(times, 50), 3),
            "checkout_p99_ms": ms(percentile(times, 99), 3),
            "round_trips_per_checkout": await _checkout_round_trips(url, pre_ping, 50),
        }
    rtt = await select_one_times(url, plan.checkouts)
    found["select_1_round_trip_p50_ms"] = ms(percentile(rtt, 50), 3)
    return found


async def question_pool(url: str, plan: Plan) -> dict[str, Any]:
    runs = []
    for pattern in PATTERNS:
        for size in plan.burst_sizes:
            say(f"pool: {size} tasks, {pattern}")
            runs.append(await run_burst(url, plan, pattern, size))
    settings = Settings(database_url=url)
    return {
        "pool_size": POOL_SIZE,
        "max_overflow": MAX_OVERFLOW,
        "pool_timeout_s": plan.pool_timeout_s,
        "hold_s": plan.hold_s,
        "retry_backoff_s": [settings.retry_initial_ms / 1000, settings.retry_max_ms / 1000],
        "patterns": PATTERNS,
        "bursts": runs,
        "pre_ping": await pre_ping_cost(url, plan),
    }
