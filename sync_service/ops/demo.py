"""`sync-service demo`: generated traffic through the whole pipeline on this machine, shown
live, and checked at the end against the state the generator says the target must hold.

Invariant: a run touches only what is its own (fresh topics and group, an id block and
emails no other run uses), so its checksum compares exactly its rows, whatever ran before.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from prometheus_client import Counter
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table
from sqlalchemy import BigInteger, func, select
from sqlalchemy import cast as sql_cast
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.connections import kafka
from sync_service.db.models import ConsumerOffset, DeadLetterRow, Order, OutboxEvent, User
from sync_service.db.models import PendingChange as Pending
from sync_service.errors import UserError
from sync_service.events.debezium import DebeziumEncoder
from sync_service.kafka import ensure_topics
from sync_service.observability import metrics
from sync_service.ops.traffic import ExpectedState, Traffic, table_checksum
from sync_service.retry import describe, wait_any
from sync_service.service import PartFactory, connect, serve

PARTITIONS = 12
BAD_RATE = 0.001
"""About one message in a thousand is broken, so that the dead-letter path shows."""
ID_BLOCK = 10**9
"""Ids of one run: a block of its own, far more than any run creates."""
REFRESH_S = 0.25
STALL_S = 60.0
"""Everything consumed, yet nothing moves for this long: stop and report what is left."""

Outcome = Literal["done", "interrupted", "stalled"]


@dataclass(frozen=True, slots=True)
class Figures:
    """Where the run stands; database counts cover this run's topics, group and ids."""

    produced: int = 0
    consumed: int = 0
    """Stored positions: records whose batch committed."""
    applied: int = 0
    stale: int = 0
    waiting: int = 0
    dead_letters: int = 0
    published: int = 0
    outbox_left: int = 0
    """This run's outbox rows the relay has not yet published and pruned."""
    users: int = 0
    orders: int = 0


@dataclass(frozen=True, slots=True)
class DemoSummary:
    run: str
    outcome: Outcome
    events: int
    figures: Figures
    seconds: float
    relay: bool
    checksum: str
    expected: ExpectedState | None
    """None when the run was interrupted before all the traffic was made."""

    @property
    def throughput(self) -> float:
        return self.figures.consumed / self.seconds if self.seconds > 0 else 0.0

    @property
    def problems(self) -> list[str]:
        """How the target differs from what the history demands (empty: it matches)."""
        f, x = self.figures, self.expected
        if x is None:
            return ["the traffic was not all produced"]
        checks = [
            (f.consumed == x.events, f"consumed {f.consumed} of {x.events} events"),
            (f.waiting == 0, f"{f.waiting} changes still wait"),
            (f.dead_letters == x.dead_letters,
             f"{f.dead_letters} dead letters, expected {x.dead_letters}"),
            (x.applied_at_least <= f.applied <= x.applied_at_most,
             f"{f.applied} changes applied, expected {x.applied_at_least}..{x.applied_at_most}"),
            (f.applied + f.stale + f.dead_letters == f.consumed,
             "applied + stale + dead letters do not add up to the events consumed"),
            (self.checksum == x.checksum(), "the tables' checksum differs from the expected"),
            (not self.relay or f.outbox_left == 0, f"{f.outbox_left} outbox rows unpublished"),
        ]  # fmt: skip
        return [problem for ok, problem in checks if not ok]


async def run_demo(
    settings: Settings,
    *,
    events: int,
    seed: int,
    console: Console | None = None,
    inbound_format: Literal["native", "debezium"] | None = None,
) -> DemoSummary:
    """Produce `events` generated changes, run the service on them until all are applied
    (or Ctrl-C), print a summary, and raise a `UserError` if the target is not right.
    With `inbound_format="debezium"` the changes are written as Debezium's PostgreSQL
    connector writes them, and the service reads them so."""
    console = console or Console()
    if inbound_format is not None:
        settings = settings.model_copy(update={"inbound_format": inbound_format})
    run = _Run.new(settings)
    engine = await connect(run.settings)
    try:
        topics = (*run.topics, settings.out_users_topic, settings.out_orders_topic)
        await ensure_topics(run.settings, dict.fromkeys(topics, PARTITIONS))
        traffic = Traffic(seed, id_base=run.id_base, bad_rate=BAD_RATE, partitions=PARTITIONS)
        summary = await _Session(run, engine, _relay()).drive(traffic, events, console)
    finally:
        await engine.dispose()
    console.print()
    console.print(_summary_table(summary))
    if summary.outcome != "interrupted" and summary.problems:
        raise UserError("demo failed: " + "; ".join(summary.problems))
    return summary


@dataclass(frozen=True, slots=True)
class _Run:
    name: str
    settings: Settings
    id_base: int

    @classmethod
    def new(cls, settings: Settings) -> _Run:
        name = secrets.token_hex(4)
        own = settings.model_copy(
            update={
                "users_topic": f"demo.{name}.users",
                "orders_topic": f"demo.{name}.orders",
                "group_id": f"demo-{name}",
                "http_port": 0,  # a `sync-service run` may hold the usual port
                "relay_prune_every_s": min(settings.relay_prune_every_s, 1.0),
            }
        )
        return cls(name, own, (int(name, 16) + 1) * ID_BLOCK)

    @property
    def topics(self) -> tuple[str, str]:
        return (self.settings.users_topic, self.settings.orders_topic)

    @property
    def ids(self) -> tuple[int, int]:
        return (self.id_base + 1, self.id_base + ID_BLOCK - 1)


def _relay() -> PartFactory | None:
    """The outbox relay, when this installation has it."""
    try:
        module = importlib.import_module("sync_service.relay.publish")
    except ModuleNotFoundError as error:
        if error.name not in ("sync_service.relay", "sync_service.relay.publish"):
            raise
        return None
    return cast(PartFactory, module.relay_part)


@dataclass(slots=True)
class _Production:
    """What the broker has acknowledged, and the end offset of each partition."""

    acked: int = 0
    ends: dict[tuple[str, int], int] = field(default_factory=dict)
    error: BaseException | None = None

    def record(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            self.error = self.error or future.exception()
            return
        sent = future.result()
        tp = (sent.topic, sent.partition)
        self.ends[tp] = max(self.ends.get(tp, 0), sent.offset + 1)
        self.acked += 1


async def _produce(run: _Run, traffic: Traffic, events: int, production: _Production) -> None:
    topics = {"user": run.settings.users_topic, "order": run.settings.orders_topic}
    producer = kafka.producer(
        run.settings,
        client_id=f"demo-{run.name}-producer",
        enable_idempotence=True,  # a retried send must not add a record the count lacks
        linger_ms=10,
        max_batch_size=256 * 1024,
    )
    encoder = DebeziumEncoder(prefix=f"demo.{run.name}")
    debezium = run.settings.inbound_format == "debezium"
    await kafka.start(producer, run.settings)
    try:
        for i, event in enumerate(traffic.events(events)):
            key, value = event.key, event.value
            if debezium:  # the same change, as the connector would have written it
                key, value = encoder.from_native(value) or (
                    encoder.key(event.entity, event.id),
                    value,
                )
            future = await producer.send(
                topics[event.entity], value, key=key, partition=event.partition
            )
            future.add_done_callback(production.record)
            if i % 1_000 == 999:
                await asyncio.sleep(0)  # the service and the display share this loop
        await producer.flush()
    finally:
        await producer.stop()
    if production.error is not None:
        raise UserError(f"producing the demo traffic failed: {describe(production.error)}")


def _total(counter: Counter) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


@dataclass(frozen=True, slots=True)
class _Counters:
    """The in-process service's counters; a run reports their growth from its start."""

    applied: float
    stale: float
    published: float

    @classmethod
    def now(cls) -> _Counters:
        return cls(_total(metrics.APPLIED), _total(metrics.STALE), _total(metrics.PUBLISHED))


class _Session:
    """One run in progress: the producer and the service as tasks, watched from here."""

    def __init__(self, run: _Run, engine: AsyncEngine, relay: PartFactory | None) -> None:
        self.run = run
        self.engine = engine
        self.relay = relay
        self.production = _Production()
        self.since = _Counters.now()
        self.stop = asyncio.Event()

    async def drive(self, traffic: Traffic, events: int, console: Console) -> DemoSummary:
        started = time.monotonic()
        producing = asyncio.create_task(_produce(self.run, traffic, events, self.production))
        service = asyncio.create_task(
            serve(self.run.settings, consume=True, relay=self.relay, stop=self.stop)
        )
        outcome: Outcome = "interrupted"
        seconds = 0.0
        try:
            with _logs_to(console), Live(console=console, refresh_per_second=8) as live:
                outcome = await self._watch(live, events, started, producing, service)
                seconds = time.monotonic() - started
        finally:
            self.stop.set()
            producing.cancel()  # a no-op once it is done; else the run was cut short
            await asyncio.gather(producing, service, return_exceptions=True)
        for task in (service, producing):
            if not task.cancelled() and task.exception() is not None:
                raise cast(BaseException, task.exception())
        figures = await self.figures()
        expected = None if producing.cancelled() else traffic.expected()
        checksum = await table_checksum(self.engine, self.run.ids)
        return DemoSummary(self.run.name, outcome, events, figures, seconds,
                           self.relay is not None, checksum, expected)  # fmt: skip

    async def _watch(
        self, live: Live, events: int, started: float,
        producing: asyncio.Task[None], service: asyncio.Task[None],
    ) -> Outcome:  # fmt: skip
        """Refresh the display until the run is complete (or stopped, failed, stalled)."""
        recent: deque[tuple[float, int]] = deque(maxlen=int(2 / REFRESH_S))
        figures = Figures()
        last_change = time.monotonic()
        relay = self.relay is not None
        while True:
            previous = figures
            with contextlib.suppress(SQLAlchemyError, OSError):  # the service reports outages
                figures = await self.figures()
            now = time.monotonic()
            recent.append((now, figures.consumed))
            live.update(_progress_table(self.run.name, figures, events, now - started, recent,
                                        relay))  # fmt: skip
            produced_all = (
                producing.done() and not producing.cancelled() and not producing.exception()
            )
            if (
                produced_all
                and figures.consumed == sum(self.production.ends.values())
                and figures.waiting == 0
                and (not relay or figures.outbox_left == 0)
            ):
                return "done"
            if self.stop.is_set() or service.done() or (producing.done() and not produced_all):
                return "interrupted"
            if figures != previous:
                last_change = now
            elif produced_all and now - last_change > STALL_S:
                return "stalled"
            await wait_any([self.stop], REFRESH_S)

    async def figures(self) -> Figures:
        run = self.run
        low, high = run.ids

        def count(model: Any, *where: Any) -> Any:
            return select(func.count()).select_from(model).where(*where).scalar_subquery()

        query = select(
            select(func.coalesce(func.sum(ConsumerOffset.next_offset), 0))
            .where(ConsumerOffset.group_id == run.settings.group_id)
            .scalar_subquery(),
            count(Pending, Pending.topic.in_(run.topics)),
            count(DeadLetterRow, DeadLetterRow.topic.in_(run.topics)),
            count(OutboxEvent, sql_cast(OutboxEvent.aggregate_id, BigInteger).between(low, high)),
            count(User, User.id.between(low, high)),
            count(Order, Order.id.between(low, high)),
        )
        async with self.engine.connect() as connection:
            consumed, waiting, dead, outbox, users, orders = (await connection.execute(query)).one()
        now, since = _Counters.now(), self.since
        return Figures(
            produced=self.production.acked,
            consumed=int(consumed),
            applied=int(now.applied - since.applied),
            stale=int(now.stale - since.stale),
            waiting=waiting,
            dead_letters=dead,
            published=int(now.published - since.published),
            outbox_left=outbox,
            users=users,
            orders=orders,
        )


@contextlib.contextmanager
def _logs_to(console: Console) -> Iterator[None]:
    """Print log lines above the live display rather than through it."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [RichHandler(console=console, show_path=False, markup=False)]
    try:
        yield
    finally:
        root.handlers[:] = saved


def _progress_table(
    run: str,
    f: Figures,
    events: int,
    elapsed: float,
    recent: deque[tuple[float, int]],
    relay: bool,
) -> Table:
    (t0, c0), (t1, c1) = recent[0], recent[-1]
    rate_now = (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
    table = Table(title=f"sync-service demo · run {run}", show_header=False, min_width=60)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("produced", f"{f.produced:,} / {events:,}")
    table.add_row("consumed (stored positions)", f"{f.consumed:,}")
    table.add_row("applied", f"{f.applied:,}")
    table.add_row("stale (duplicate or late)", f"{f.stale:,}")
    table.add_row("waiting", f"{f.waiting:,}")
    table.add_row("dead-lettered", f"{f.dead_letters:,}")
    if relay:  # the relay publishes the whole outbox, not only this run's rows
        table.add_row("published by the relay", f"{f.published:,} ({f.outbox_left:,} to go)")
    else:
        table.add_row("published by the relay", "relay not installed")
    table.add_row("rows", f"{f.users:,} users · {f.orders:,} orders")
    table.add_row("events/s", f"{rate_now:,.0f} now · {f.consumed / max(elapsed, 1e-9):,.0f} avg")
    table.add_row("elapsed", f"{elapsed:.1f} s")
    return table


def _summary_table(s: DemoSummary) -> Table:
    f, x = s.figures, s.expected
    table = Table(title=f"demo run {s.run}: {s.outcome}")
    table.add_column("")
    table.add_column("target", justify="right")
    table.add_column("expected", justify="right")
    rows = [
        ("events", f"{f.consumed:,}", x and f"{x.events:,}"),
        ("applied (outbox rows)", f"{f.applied:,}",
         x and f"{x.applied_at_least:,}..{x.applied_at_most:,}"),
        ("stale (duplicate or late)", f"{f.stale:,}",
         x and f"{x.duplicates:,}..{x.duplicates + x.late:,}"),
        ("dead letters", f"{f.dead_letters:,}", x and f"{x.dead_letters:,}"),
        ("waiting", f"{f.waiting:,}", "0"),
        ("users rows", f"{f.users:,}", x and f"{len(x.users):,}"),
        ("orders rows", f"{f.orders:,}", x and f"{len(x.orders):,}"),
        ("published by the relay", f"{f.published:,}" if s.relay else "relay not installed", ""),
        ("duration", f"{s.seconds:.1f} s", ""),
        ("throughput", f"{s.throughput:,.0f} events/s", ""),
    ]  # fmt: skip
    for label, got, want in rows:
        table.add_row(label, got, want or "-")
    if x is not None and s.checksum == x.checksum():
        table.add_row("checksum", "matches", x.checksum()[:13] + "…")
    else:
        table.add_row("checksum", s.checksum, x.checksum() if x else "-")
    return table
