"""`python -m bench.questions`: the README's three open questions (pool exhaustion in bursts,
selectinload against joinedload, migrations under traffic), measured on this machine.

Invariant: every figure in bench/QUESTIONS.md is in the JSON this writes, from one run in a
scratch database of its own (`questions_<random>`), which the run drops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import platform
import random
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final, Literal

import asyncpg
import orjson
from alembic.runtime.migration import MigrationContext
from sqlalchemy import ForeignKey, Text, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    lazyload,
    mapped_column,
    relationship,
    selectinload,
)
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.base import ExecutableOption

from bench.report import git_version, percentile
from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.errors import UserError
from sync_service.retry import Backoff, describe, is_transient, retrying

REPO: Final = Path(__file__).resolve().parents[1]
RESULTS: Final = REPO / "bench" / "results" / "questions.json"
QUICK_RESULTS: Final = REPO / "bench" / "results" / "questions-quick.json"
"""Apart from the full run's, which bench/QUESTIONS.md quotes."""
QUESTIONS: Final = ("pool", "loading", "migrations")
SELECT_ONE: Final = select(1)


def say(message: str) -> None:
    """Progress for the person watching; the tables go to stdout."""
    print(message, file=sys.stderr, flush=True)


# --- what a run measures -------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Customers with `orders` orders of `lines` lines each; the text columns' widths set
    how much a join repeats per child row."""

    name: str
    orders: int
    lines: int
    profile_bytes: int
    note_bytes: int


SHAPES: Final = (
    Shape("2x2", 2, 2, 100, 50),
    Shape("10x10", 10, 10, 100, 50),
    Shape("50x20", 50, 20, 100, 50),
    Shape("50x20 wide", 50, 20, 2_000, 500),
)

Mode = Literal["alone", "queued", "lock_timeout", "lock_timeout_retry"]
MODES: Final[tuple[Mode, ...]] = ("alone", "queued", "lock_timeout", "lock_timeout_retry")


@dataclass(frozen=True)
class Plan:
    """How much each question measures; `--quick` keeps the shape of every experiment
    (the hold is 3/4 of the pool timeout in both) at a fraction of the time."""

    burst_sizes: tuple[int, ...] = (5, 10, 20, 50, 100)
    hold_s: float = 1.5
    pool_timeout_s: float = 2.0
    checkouts: int = 500
    shapes: tuple[Shape, ...] = SHAPES
    parents: tuple[int, ...] = (1, 10, 30)
    repeats: int = 3
    repeat_budget_s: float = 0.5
    ledger_rows: int = 500_000
    reader_hold_s: float = 3.0
    lock_timeout_s: float = 2.0
    lead_s: float = 0.5
    modes: tuple[Mode, ...] = MODES


FULL: Final = Plan()
QUICK: Final = Plan(
    burst_sizes=(5, 20, 100),
    hold_s=0.3,
    pool_timeout_s=0.4,
    checkouts=200,
    shapes=(SHAPES[1], SHAPES[3]),
    parents=(1, 10),
    repeats=3,
    repeat_budget_s=0.2,
    ledger_rows=50_000,
    reader_hold_s=1.0,
    lock_timeout_s=0.4,
    lead_s=0.25,
    modes=("alone", "queued", "lock_timeout"),
)


# --- figures -------------------------------------------------------------------------------


def ms(seconds: float, digits: int = 1) -> float:
    return round(seconds * 1000, digits)


def first_line(error: BaseException) -> str:
    """The error's class and message without SQLAlchemy's trailing link to its docs."""
    message = str(error).split(" (Background on this error", 1)[0].strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"[:200]


def overlapping(
    spans: Sequence[tuple[float, float]], start: float, end: float
) -> list[tuple[float, float]]:
    """The spans (start, end) that share any instant with [start, end]."""
    return [(a, b) for a, b in spans if a <= end and b >= start]


def latency_summary(spans: Sequence[tuple[float, float]]) -> dict[str, Any]:
    durations = [b - a for a, b in spans]
    if not durations:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "count": len(durations),
        "p50_ms": ms(percentile(durations, 50)),
        "p99_ms": ms(percentile(durations, 99)),
        "max_ms": ms(max(durations)),
    }


# --- the wire: rows, bytes and round trips as PostgreSQL sends them ------------------------


@dataclass
class Wire:
    """What crossed a counting proxy: bytes each way, the server's DataRow messages (rows)
    and its ReadyForQuery messages (one per completed request: round trips)."""

    bytes_to_server: int = 0
    bytes_to_client: int = 0
    rows: int = 0
    round_trips: int = 0

    def since(self, before: Wire) -> Wire:
        return Wire(
            self.bytes_to_server - before.bytes_to_server,
            self.bytes_to_client - before.bytes_to_client,
            self.rows - before.rows,
            self.round_trips - before.round_trips,
        )


class BackendMessages:
    """Splits the server's stream into protocol messages (a type byte, then an int32 length
    that counts itself), wherever TCP cut it. The connection must not use TLS, so that the
    server's first byte already starts a message."""

    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        at = 0
        while len(self._buffer) - at >= 5:
            length = int.from_bytes(self._buffer[at + 1 : at + 5], "big")
            if len(self._buffer) - at < 1 + length:
                break
            kind = self._buffer[at]
            if kind == ord("D"):
                self._wire.rows += 1
            elif kind == ord("Z"):
                self._wire.round_trips += 1
            at += 1 + length
        del self._buffer[:at]


class WireProxy:
    """A TCP proxy on 127.0.0.1 in front of the server, counting into `wire`. It adds a hop,
    so it is used to count, never to time."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self.wire = Wire()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        server_in, server_out = await asyncio.open_connection(*self._upstream)
        messages = BackendMessages(self.wire)

        async def to_server() -> None:
            while chunk := await client_in.read(65_536):
                self.wire.bytes_to_server += len(chunk)
                server_out.write(chunk)
                await server_out.drain()

        async def to_client() -> None:
            while chunk := await server_in.read(65_536):
                self.wire.bytes_to_client += len(chunk)
                messages.feed(chunk)
                client_out.write(chunk)
                await client_out.drain()

        async def pump(
            direction: Callable[[], Awaitable[None]], sink: asyncio.StreamWriter
        ) -> None:
            with contextlib.suppress(OSError):
                await direction()
            sink.close()  # one side hung up: so does the other

        await asyncio.gather(pump(to_server, server_out), pump(to_client, client_out))


@contextlib.asynccontextmanager
async def counting(url: str) -> AsyncIterator[tuple[str, WireProxy]]:
    """A URL that reaches the database through a counting proxy, without TLS."""
    parsed = make_url(url)
    proxy = WireProxy(parsed.host or "localhost", parsed.port or 5432)
    port = await proxy.start()
    try:
        yield parsed.set(host="127.0.0.1", port=port).render_as_string(hide_password=False), proxy
    finally:
        await proxy.stop()


NO_TLS: Final = {"ssl": False}


class Statements:
    """Counts the statements an engine sends (before_cursor_execute)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.count = 0
        event.listen(engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1


# --- where it ran --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, cores and memory as /proc states them."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cores = {line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("cpu cores")}
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    memory_kib = int(meminfo["MemTotal"].split()[0])
    return {
        "cpu_model": models[0] if models else platform.processor() or "unknown",
        "logical_cpus": len(models) or os.cpu_count(),
        "cores_per_socket": int(cores.pop()) if len(cores) == 1 else None,
        "memory_gib": round(memory_kib / 1024**2, 1),
        "kernel": platform.release(),
    }


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


async def versions(url: str) -> dict[str, Any]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            server = await connection.scalar(text("SHOW server_version"))
    finally:
        await engine.dispose()
    found: dict[str, Any] = {"python": platform.python_version(), "postgresql": server}
    for package in ("sqlalchemy", "asyncpg", "alembic"):
        found[package] = metadata.version(package)
    found["git"] = git_version()
    return found


@contextlib.asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    """A new database on `server_url`'s server, dropped (with its connections) on exit."""
    name = f"questions_{secrets.token_hex(4)}"
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    quoted = admin.dialect.identifier_preparer.quote(name)
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f"CREATE DATABASE {quoted}"))
    except OSError as error:
        await admin.dispose()
        shown = make_url(server_url).render_as_string()
        raise UserError(f"cannot reach PostgreSQL at {shown}: {error}") from None
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            async with admin.connect() as connection:
                await connection.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        except (OSError, sa_exc.DBAPIError) as error:  # the run's own error matters more
            say(f"could not drop database {name} ({describe(error)}): drop it by hand")
        await admin.dispose()


# --- 1. the pool under bursts --------------------------------------------------------------

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


async def _select_one_times(url: str, count: int) -> list[float]:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    times = []
    try:
        for _ in range(count + 1):
            started = time.perf_counter()
            await connection.fetchval("SELECT 1")
            times.append(time.perf_counter() - started)
    finally:
        await connection.close()
    return times[1:]


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
    rtt = await _select_one_times(url, plan.checkouts)
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


# --- 2. selectinload against joinedload ----------------------------------------------------


class LoadBase(DeclarativeBase):
    """This question's own tables, apart from the service's."""


class Customer(LoadBase):
    __tablename__ = "q_customer"
    id: Mapped[int] = mapped_column(primary_key=True)
    shape: Mapped[str] = mapped_column(Text, index=True)
    name: Mapped[str] = mapped_column(Text)
    profile: Mapped[str] = mapped_column(Text)
    # lazy="raise": an access that was not loaded up front fails loudly instead of
    # attempting IO the async session cannot do implicitly.
    orders: Mapped[list[Order]] = relationship(lazy="raise", order_by="Order.id")


class Order(LoadBase):
    __tablename__ = "q_order"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("q_customer.id"), index=True)
    status: Mapped[str] = mapped_column(Text)
    note: Mapped[str] = mapped_column(Text)
    lines: Mapped[list[Line]] = relationship(lazy="raise", order_by="Line.id")


class Line(LoadBase):
    __tablename__ = "q_line"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("q_order.id"), index=True)
    sku: Mapped[str] = mapped_column(Text)
    quantity: Mapped[int]
    cents: Mapped[int]


MAX_REPEATS: Final = 40
STRATEGIES: Final[dict[str, ExecutableOption]] = {
    "selectin.selectin": selectinload(Customer.orders).selectinload(Order.lines),
    "joined.joined": joinedload(Customer.orders).joinedload(Order.lines),
    "selectin.joined": selectinload(Customer.orders).joinedload(Order.lines),
    "joined.selectin": joinedload(Customer.orders).selectinload(Order.lines),
}


async def _populate(engine: AsyncEngine, plan: Plan) -> None:
    """Each shape's customers, orders and lines, generated by the server in one transaction."""
    customers = max(plan.parents)
    async with engine.begin() as connection:
        await connection.run_sync(LoadBase.metadata.create_all)
        for shape in plan.shapes:
            values = {
                "shape": shape.name,
                "customers": customers,
                "orders": shape.orders,
                "lines": shape.lines,
                "profile": shape.profile_bytes,
                "note": shape.note_bytes,
            }
            await connection.execute(
                text(
                    "INSERT INTO q_customer (shape, name, profile)"
                    " SELECT :shape, 'customer ' || g, repeat('p', :profile)"
                    " FROM generate_series(1, :customers) g"
                ),
                values,
            )
            await connection.execute(
                text(
                    "INSERT INTO q_order (customer_id, status, note)"
                    " SELECT c.id, 'paid', repeat('n', :note)"
                    " FROM q_customer c, generate_series(1, :orders) WHERE c.shape = :shape"
                ),
                values,
            )
            await connection.execute(
                text(
                    "INSERT INTO q_line (order_id, sku, quantity, cents)"
                    " SELECT o.id, 'sku-' || g, g, g * 100 FROM q_order o"
                    " JOIN q_customer c ON c.id = o.customer_id, generate_series(1, :lines) g"
                    " WHERE c.shape = :shape"
                ),
                values,
            )
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.execute(text("VACUUM ANALYZE"))


async def _load(
    factory: async_sessionmaker[AsyncSession], shape: Shape, parents: int, strategy: str
) -> int:
    """Load `parents` customers with their orders and lines; the number of lines loaded."""
    statement = (
        select(Customer)
        .where(Customer.shape == shape.name)
        .order_by(Customer.id)
        .limit(parents)
        .options(STRATEGIES[strategy])
    )
    async with factory() as session:
        customers = (await session.execute(statement)).unique().scalars().all()
        return sum(len(order.lines) for customer in customers for order in customer.orders)


async def _timed(
    url: str, plan: Plan, shape: Shape, parents: int, paused: bool
) -> dict[str, list[float]]:
    """Each strategy's load times, interleaved so that drift hits all alike. Rounds go on
    until every strategy had `repeat_budget_s` (at most MAX_REPEATS rounds): small loads
    get many, since their differences are smaller than the noise. With `paused`, the
    cyclic garbage collector does not run during the rounds: what is left is the
    strategy's own cost."""
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    expected = parents * shape.orders * shape.lines
    times: dict[str, list[float]] = {strategy: [] for strategy in STRATEGIES}
    try:
        for strategy in STRATEGIES:  # warm: connection, prepared statements, compiled cache
            loaded = await _load(factory, shape, parents, strategy)
            if loaded != expected:
                raise RuntimeError(f"{strategy} loaded {loaded} lines, not {expected}")
        gc.collect()
        if paused:
            gc.disable()
        rounds = 0
        while rounds < MAX_REPEATS and (
            rounds < plan.repeats or min(map(sum, times.values())) < plan.repeat_budget_s
        ):
            for strategy in STRATEGIES:
                started = time.perf_counter()
                await _load(factory, shape, parents, strategy)
                times[strategy].append(time.perf_counter() - started)
            rounds += 1
    finally:
        gc.enable()
        await engine.dispose()
    return times


async def _counted(url: str, shape: Shape, parents: int) -> dict[str, tuple[int, Wire]]:
    found: dict[str, tuple[int, Wire]] = {}
    async with counting(url) as (proxied, proxy):
        engine = create_async_engine(proxied, pool_size=1, max_overflow=0, connect_args=NO_TLS)
        statements = Statements(engine)
        factory = async_sessionmaker(engine, expire_on_commit=False)
        try:
            for strategy in STRATEGIES:
                await _load(factory, shape, parents, strategy)  # prepared statements cached
                before, count = replace(proxy.wire), statements.count
                await _load(factory, shape, parents, strategy)
                found[strategy] = (statements.count - count, proxy.wire.since(before))
        finally:
            await engine.dispose()
    return found


async def _lazy_access_errors(engine: AsyncEngine) -> dict[str, str]:
    """What touching a relationship that was not loaded does in an async session."""
    found: dict[str, str] = {}
    factory = async_sessionmaker(engine, expire_on_commit=False)
    for name, options in (("lazy='raise'", ()), ("lazyload()", (lazyload(Customer.orders),))):
        async with factory() as session:
            statement = select(Customer).order_by(Customer.id).limit(1).options(*options)
            customer = (await session.execute(statement)).scalar_one()
            try:
                len(customer.orders)
            except (sa_exc.InvalidRequestError, sa_exc.MissingGreenlet) as error:
                found[name] = first_line(error)
            else:
                found[name] = "loaded without error"
    return found


def _compare(
    shape: Shape,
    parents: int,
    medians: dict[bool, dict[str, float]],
    counted: dict[str, tuple[int, Wire]],
) -> dict[str, Any]:
    """The fastest strategy, and selectin.selectin against joined.joined with the collector
    paused: the round trips the join saves, and the round-trip time above which those
    savings would outweigh what the join costs here (all else equal)."""
    joined, selectin = medians[True]["joined.joined"], medians[True]["selectin.selectin"]
    saved = counted["selectin.selectin"][1].round_trips - counted["joined.joined"][1].round_trips
    return {
        "shape": shape.name,
        "parents": parents,
        "fastest": min(medians[False], key=lambda s: medians[False][s]),
        "fastest_gc_paused": min(medians[True], key=lambda s: medians[True][s]),
        "joined_minus_selectin_ms_gc_paused": ms(joined - selectin, 2),
        "round_trips_saved_by_join": saved,
        "break_even_round_trip_ms": ms((joined - selectin) / saved, 2)
        if joined > selectin
        else None,
    }


async def question_loading(url: str, plan: Plan) -> dict[str, Any]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        say("loading: generating customers, orders and lines")
        await _populate(engine, plan)
        lazy = await _lazy_access_errors(engine)
    finally:
        await engine.dispose()
    runs, fastest = [], []
    for shape in plan.shapes:
        for parents in plan.parents:
            say(f"loading: {parents} customer(s) of {shape.name}")
            times = {
                paused: await _timed(url, plan, shape, parents, paused) for paused in (False, True)
            }
            medians = {
                paused: {s: statistics.median(t) for s, t in found.items()}
                for paused, found in times.items()
            }
            counted = await _counted(url, shape, parents)
            for strategy, (statements, wire) in counted.items():
                on, off = medians[False][strategy], medians[True][strategy]
                runs.append(
                    {
                        "shape": shape.name,
                        "parents": parents,
                        "strategy": strategy,
                        "median_ms": ms(on, 2),
                        "repeats": len(times[False][strategy]),
                        "median_ms_gc_paused": ms(off, 2),
                        "repeats_gc_paused": len(times[True][strategy]),
                        "gc_share": round(max(0.0, 1 - off / on), 2),
                        "statements": statements,
                        "round_trips": wire.round_trips,
                        "rows": wire.rows,
                        "kib_from_server": round(wire.bytes_to_client / 1024, 1),
                        "objects_loaded": parents * (1 + shape.orders * (1 + shape.lines)),
                    }
                )
            fastest.append(_compare(shape, parents, medians, counted))
    return {
        "shapes": [vars(shape) for shape in plan.shapes],
        "round_trip_p50_ms": ms(percentile(await _select_one_times(url, 200), 50), 3),
        "runs": runs,
        "fastest": fastest,
        "lazy_access": lazy,
    }


# --- 3. migrations under traffic -----------------------------------------------------------


@dataclass(frozen=True)
class Ddl:
    """One schema change; `{name}` is the column or index it adds or alters."""

    label: str
    statement: str
    creates_index: bool = False
    concurrently: bool = False


DDLS: Final = (
    Ddl("ADD COLUMN int NULL", "ALTER TABLE q_ledger ADD COLUMN {name} int NULL"),
    Ddl(
        "ADD COLUMN int DEFAULT 0", "ALTER TABLE q_ledger ADD COLUMN {name} int NOT NULL DEFAULT 0"
    ),
    Ddl(
        "ADD COLUMN DEFAULT random()",
        "ALTER TABLE q_ledger ADD COLUMN {name} double precision DEFAULT random()",
    ),
    Ddl("CREATE INDEX", "CREATE INDEX {name} ON q_ledger (account)", creates_index=True),
    Ddl(
        "CREATE INDEX CONCURRENTLY",
        "CREATE INDEX CONCURRENTLY {name} ON q_ledger (account)",
        creates_index=True,
        concurrently=True,
    ),
    Ddl("ALTER COLUMN TYPE bigint", "ALTER TABLE q_ledger ALTER COLUMN {name} TYPE bigint"),
)
WRITERS: Final = 2
SET_LOCK_TIMEOUT: Final = "SELECT set_config('lock_timeout', :value, :local)"
"""`SET [LOCAL] lock_timeout`, with the value bound."""
WRITER_PAUSE_S: Final = 0.005


async def _create_ledger(url: str, plan: Plan) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            # Autovacuum would take locks of its own in the middle of a measurement.
            await connection.execute(
                text(
                    "CREATE TABLE q_ledger (id bigserial PRIMARY KEY, account int NOT NULL,"
                    " amount int NOT NULL, note text NOT NULL,"
                    + ", ".join(f" n_{mode} int NOT NULL DEFAULT 0" for mode in MODES)
                    + ") WITH (autovacuum_enabled = false)"
                )
            )
            await connection.execute(
                text(
                    "INSERT INTO q_ledger (account, amount, note)"
                    " SELECT g % 1000, g, 'entry ' || g FROM generate_series(1, :rows) g"
                ),
                {"rows": plan.ledger_rows},
            )
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(text("VACUUM ANALYZE q_ledger"))
    finally:
        await engine.dispose()


async def _writer(
    engine: AsyncEngine, rows: int, spans: list[tuple[float, float]], stop: asyncio.Event
) -> None:
    """Small transactions back to back, like the service's batches: insert, update, commit."""
    while not stop.is_set():
        started = time.monotonic()
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO q_ledger (account, amount, note)"
                    " SELECT g, g, 'batch' FROM generate_series(1, 5) g"
                )
            )
            await connection.execute(
                text("UPDATE q_ledger SET amount = amount + 1 WHERE id = :id"),
                {"id": random.randint(1, rows)},
            )
        spans.append((started, time.monotonic()))
        await asyncio.sleep(WRITER_PAUSE_S)


async def _long_reader(url: str, hold_s: float, holding: asyncio.Event) -> float:
    """A report: one transaction that reads the table and stays open for `hold_s`, keeping
    its ACCESS SHARE lock; returns when it committed (monotonic)."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("SELECT count(*) FROM q_ledger"))
            holding.set()
            await asyncio.sleep(hold_s)
        return time.monotonic()
    finally:
        await engine.dispose()


async def _attempt(url: str, ddl: Ddl, name: str, lock_timeout_s: float | None) -> str:
    """One try of `ddl`: "ok", "lock_timeout", or the error. Transactional DDL runs the way
    migrations/env.py runs it (SET LOCAL in the migration's transaction); CONCURRENTLY
    cannot run in a transaction, so it runs in autocommit, as in an autocommit_block."""
    engine = create_async_engine(url, poolclass=NullPool)
    timeout = {"value": f"{int(lock_timeout_s * 1000)}ms"} if lock_timeout_s else None
    try:
        if ddl.concurrently:
            async with engine.connect() as connection:
                await connection.execution_options(isolation_level="AUTOCOMMIT")
                if timeout:
                    await connection.execute(text(SET_LOCK_TIMEOUT), {**timeout, "local": False})
                await connection.execute(text(ddl.statement.format(name=name)))
        else:
            async with engine.begin() as connection:
                if timeout:
                    await connection.execute(text(SET_LOCK_TIMEOUT), {**timeout, "local": True})
                await connection.execute(text(ddl.statement.format(name=name)))
    except sa_exc.DBAPIError as error:
        cause = error.orig.__cause__ if error.orig is not None else None
        if isinstance(cause, asyncpg.LockNotAvailableError):
            return "lock_timeout"
        return describe(error)
    finally:
        await engine.dispose()
    return "ok"


async def _index_state(engine: AsyncEngine, name: str) -> str:
    async with engine.connect() as connection:
        valid = await connection.scalar(
            text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
            {"name": name},
        )
    return "absent" if valid is None else ("valid" if valid else "invalid")


async def _drop_index(engine: AsyncEngine, name: str) -> None:
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))


@dataclass
class Migration:
    """How a change went: `ended` is when its last attempt ended (monotonic);
    `failed_index_left` what a failed CONCURRENTLY build left behind, and `cleanup_s` how
    long dropping it took."""

    outcome: str = ""
    attempts: int = 0
    ended: float = 0.0
    failed_index_left: str | None = None
    cleanup_s: float | None = None


async def _migrate(
    url: str, engine: AsyncEngine, ddl: Ddl, name: str, mode: Mode, plan: Plan
) -> Migration:
    lock_timeout = None if mode in ("alone", "queued") else plan.lock_timeout_s
    backoff = Backoff(plan.lock_timeout_s / 4, plan.lock_timeout_s)
    done = Migration()
    while True:
        done.attempts += 1
        done.outcome = await _attempt(url, ddl, name, lock_timeout)
        done.ended = time.monotonic()
        if done.outcome != "ok" and ddl.concurrently:
            done.failed_index_left = await _index_state(engine, name)
            if done.failed_index_left == "invalid":  # unusable, yet updated by every write
                await _drop_index(engine, name)
                done.cleanup_s = round(time.monotonic() - done.ended, 2)
        if done.outcome != "lock_timeout" or mode != "lock_timeout_retry":
            return done
        await asyncio.sleep(backoff.next_delay())  # writers get through in between


async def run_change(url: str, plan: Plan, index: int, ddl: Ddl, mode: Mode) -> dict[str, Any]:
    """Writers running; in every mode but "alone" a long reader holding ACCESS SHARE; then
    the change. The writers' latency is taken over the change's window."""
    name = f"n_{mode}" if "TYPE" in ddl.label else f"q{index}_{mode}"
    engine = create_async_engine(url, pool_size=WRITERS + 1, max_overflow=0)
    spans: list[tuple[float, float]] = []
    stop, holding = asyncio.Event(), asyncio.Event()
    writers = [
        asyncio.create_task(_writer(engine, plan.ledger_rows, spans, stop)) for _ in range(WRITERS)
    ]
    reader: asyncio.Task[float] | None = None
    try:
        began = time.monotonic()
        await asyncio.sleep(plan.lead_s)
        if mode != "alone":
            reader = asyncio.create_task(_long_reader(url, plan.reader_hold_s, holding))
            await holding.wait()
            await asyncio.sleep(plan.lead_s)
        start = time.monotonic()
        done = await _migrate(url, engine, ddl, name, mode, plan)
        reader_end = await reader if reader is not None else None
        await asyncio.sleep(plan.lead_s)
    finally:
        stop.set()
        await asyncio.gather(*writers)
        if ddl.creates_index:
            await _drop_index(engine, name)  # every index change starts from the same table
        await engine.dispose()
    before = [span for span in spans if span[1] < start]
    return {
        "change": ddl.label,
        "mode": mode,
        "outcome": done.outcome,
        "attempts": done.attempts,
        "failed_index_left": done.failed_index_left,
        "cleanup_s": done.cleanup_s,
        "ddl_s": round(done.ended - start, 2),
        "reader_ended_after_ddl_start_s": (
            round(reader_end - start, 2) if reader_end is not None else None
        ),
        "writer_before": latency_summary(before),
        "commits_per_s_before": round(len(before) / (start - began), 1),
        "writer_during": latency_summary(overlapping(spans, start, done.ended)),
        "commits_during": sum(1 for span in spans if start <= span[1] <= done.ended),
    }


ENV_PY_SETTINGS: Final = ("SET LOCAL lock_timeout = '5s'", "SET lock_timeout = '5s'")
"""migrations/env.py's statement, and its session-level form."""


def _lock_timeout_seen(connection: Connection, statement: str) -> dict[str, str]:
    """`SHOW lock_timeout` in a migration's transaction after `statement`, inside an
    Alembic autocommit_block (which commits that transaction first), and after it."""
    context = MigrationContext.configure(connection)

    def show() -> str:
        return str(connection.exec_driver_sql("SHOW lock_timeout").scalar())

    with context.begin_transaction():
        context.execute(statement)
        seen = {"statement": statement, "in_transaction": show()}
        with context.autocommit_block():
            seen["inside_autocommit_block"] = show()
        seen["after_autocommit_block"] = show()
    return seen


async def autocommit_block_settings(url: str) -> list[dict[str, str]]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        found = []
        for statement in ENV_PY_SETTINGS:
            async with engine.connect() as connection:
                found.append(await connection.run_sync(_lock_timeout_seen, statement))
        return found
    finally:
        await engine.dispose()


async def question_migrations(url: str, plan: Plan) -> dict[str, Any]:
    say(f"migrations: a ledger of {plan.ledger_rows:,} rows")
    await _create_ledger(url, plan)
    runs = []
    for index, ddl in enumerate(DDLS):
        for mode in plan.modes:
            say(f"migrations: {ddl.label}, {mode}")
            runs.append(await run_change(url, plan, index, ddl, mode))
    return {
        "ledger_rows": plan.ledger_rows,
        "writers": WRITERS,
        "writer_transaction": "INSERT 5 rows + UPDATE 1 row by id, then commit; 5 ms pause",
        "reader_hold_s": plan.reader_hold_s,
        "lock_timeout_s": plan.lock_timeout_s,
        "modes": {
            "alone": "no other transaction open; no lock_timeout",
            "queued": "a reader transaction holds ACCESS SHARE; no lock_timeout",
            "lock_timeout": f"the same reader; SET LOCAL lock_timeout = {plan.lock_timeout_s} s",
            "lock_timeout_retry": "the same, retried with backoff until it succeeds",
        },
        "runs": runs,
        "lock_timeout_and_autocommit_block": await autocommit_block_settings(url),
    }


# --- the tables ----------------------------------------------------------------------------

Columns = Sequence[tuple[str, str]]
"""(header, key) pairs; a key "a.b" reads row["a"]["b"]."""

BURST_COLUMNS: Final[Columns] = (
    ("pattern", "pattern"),
    ("tasks", "tasks"),
    ("completed", "completed"),
    ("TimeoutError", "timeout_errors"),
    ("wait p50 ms", "wait_p50_ms"),
    ("wait p99 ms", "wait_p99_ms"),
    ("total s", "total_s"),
    ("peak connections", "peak_connections"),
)
PING_COLUMNS: Final[Columns] = (
    ("pool_pre_ping", "setting"),
    ("checkout p50 ms", "checkout_p50_ms"),
    ("checkout p99 ms", "checkout_p99_ms"),
    ("round trips per checkout", "round_trips_per_checkout"),
)
LOAD_COLUMNS: Final[Columns] = (
    ("shape", "shape"),
    ("customers", "parents"),
    ("strategy", "strategy"),
    ("median ms", "median_ms"),
    ("median ms, GC paused", "median_ms_gc_paused"),
    ("statements", "statements"),
    ("round trips", "round_trips"),
    ("rows", "rows"),
    ("KiB from server", "kib_from_server"),
)
COMPARE_COLUMNS: Final[Columns] = (
    ("shape", "shape"),
    ("customers", "parents"),
    ("fastest", "fastest"),
    ("fastest, GC paused", "fastest_gc_paused"),
    ("joined.joined minus selectin.selectin ms, GC paused", "joined_minus_selectin_ms_gc_paused"),
    ("round trips saved by the join", "round_trips_saved_by_join"),
    ("break-even round trip ms", "break_even_round_trip_ms"),
)
CHANGE_COLUMNS: Final[Columns] = (
    ("change", "change"),
    ("mode", "mode"),
    ("outcome", "outcome"),
    ("attempts", "attempts"),
    ("DDL s", "ddl_s"),
    ("writer max ms", "writer_during.max_ms"),
    ("writer p99 ms", "writer_during.p99_ms"),
    ("commits during DDL", "commits_during"),
    ("commits/s before", "commits_per_s_before"),
    ("writer p50 ms before", "writer_before.p50_ms"),
)


SETTING_COLUMNS: Final[Columns] = (
    ("statement in the migration's transaction", "statement"),
    ("lock_timeout there", "in_transaction"),
    ("inside autocommit_block", "inside_autocommit_block"),
    ("after autocommit_block", "after_autocommit_block"),
)


def _cell(row: dict[str, Any], key: str) -> str:
    value: Any = row
    for part in key.split("."):
        value = value[part]
    return "-" if value is None else str(value)


def table(rows: Sequence[dict[str, Any]], columns: Columns) -> str:
    """A Markdown table of `rows`, one column per (header, key)."""
    lines = [[header for header, _ in columns], ["---"] * len(columns)]
    lines += [[_cell(row, key) for _, key in columns] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def tables(record: dict[str, Any]) -> str:
    """The figures of a run as the Markdown tables of QUESTIONS.md."""
    questions, out = record["questions"], []
    if pool := questions.get("pool"):
        out.append(table(pool["bursts"], BURST_COLUMNS))
        ping = pool["pre_ping"]
        pings = [{"setting": key, **ping[key]} for key in ("without_pre_ping", "with_pre_ping")]
        out.append(table(pings, PING_COLUMNS))
    if loading := questions.get("loading"):
        out.append(table(loading["runs"], LOAD_COLUMNS))
        out.append(table(loading["fastest"], COMPARE_COLUMNS))
    if migrations := questions.get("migrations"):
        out.append(table(migrations["runs"], CHANGE_COLUMNS))
        out.append(table(migrations["lock_timeout_and_autocommit_block"], SETTING_COLUMNS))
    return "\n\n".join(out)


# --- the command ---------------------------------------------------------------------------

RUNNERS: Final[dict[str, Callable[[str, Plan], Awaitable[dict[str, Any]]]]] = {
    "pool": question_pool,
    "loading": question_loading,
    "migrations": question_migrations,
}


def _only(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = set(names) - set(QUESTIONS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(QUESTIONS)}")
    return names


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.questions", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs: under a minute")
    parser.add_argument(
        "--only", type=_only, default=QUESTIONS, help="comma-separated: pool,loading,migrations"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="the server to make the scratch database on (default: SYNC_DATABASE_URL)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the JSON file to write (default: bench/results/questions.json, or"
        " questions-quick.json with --quick)",
    )
    return parser.parse_args(argv)


async def run(arguments: argparse.Namespace, command: str) -> dict[str, Any]:
    plan = QUICK if arguments.quick else FULL
    server = arguments.database_url or Settings().database_url
    started = datetime.now(UTC)
    load_before = load_average()
    async with scratch_database(server) as url:
        found: dict[str, Any] = {
            "command": command,
            "started": started.isoformat(timespec="seconds"),
            "quick": arguments.quick,
            "plan": asdict(plan),
            "machine": machine(),
            "versions": await versions(url),
            "questions": {},
        }
        for name in arguments.only:
            began = time.monotonic()
            found["questions"][name] = await RUNNERS[name](url, plan)
            found["questions"][name]["seconds"] = round(time.monotonic() - began, 1)
    found["machine"]["load_average_before"] = load_before
    found["machine"]["load_average_after"] = load_average()
    found["seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    return found


def main(argv: Sequence[str] | None = None) -> None:
    arguments = _arguments(sys.argv[1:] if argv is None else argv)
    command = "python -m bench.questions" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    # The service's retry loop logs every pool timeout it retries: thousands of lines here.
    logging.getLogger("sync_service.retry").setLevel(logging.ERROR)
    try:
        record = asyncio.run(run(arguments, command))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        if not is_transient(error):  # a defect: its traceback is what helps
            raise
        print(f"error: lost PostgreSQL during the run ({describe(error)})", file=sys.stderr)
        raise SystemExit(1) from None
    output = arguments.output or (QUICK_RESULTS if arguments.quick else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2) + b"\n")
    print(tables(record))
    say(f"wrote {output} in {record['seconds']} s")


if __name__ == "__main__":
    main()
