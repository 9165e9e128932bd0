"""Every contender but sync_service: the naive and bulk baselines (what tutorials teach), the
peer (Debezium's JDBC sink, through `bench.peer`) and the machine's limit (`bench.limit`).

Invariant: each reads the same events as sync_service and starts from empty tables; a
contender with no version guard is timed but never called correct.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import CheckConstraint, Column, Index, MetaData, Table, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bench.progress import say
from bench.report import Phase
from bench.service.database import create_database
from bench.service.names import Bench, Run
from bench.service.usage import Usage
from bench.workload import Topics, Workload, final_state
from sync_service.db.models import Base, Order, OutboxEvent, User
from sync_service.events.change import Entity
from sync_service.events.inbound import (
    ORDER_ENVELOPE,
    USER_ENVELOPE,
    OrderDelete,
    OrderUpsert,
    UserDelete,
    UserUpsert,
)
from sync_service.ops.traffic import ExpectedState, Traffic, canonical_row, table_checksum

_ADAPTERS: dict[Entity, TypeAdapter[Any]] = {"user": USER_ENVELOPE, "order": ORDER_ENVELOPE}
_MODELS: dict[Entity, type[User] | type[Order]] = {"user": User, "order": Order}
Envelope = UserUpsert | UserDelete | OrderUpsert | OrderDelete

# --- the baselines' tables -----------------------------------------------------------------

# Our columns, types, keys, checks and indexes, but neither the foreign key nor the live-email
# rule: a per-event or per-batch writer cannot wait for a change's prerequisites, so either
# rule would only make it fail (orders arrive before their users). A plain index on live
# emails stands in for the rule's, so that index upkeep costs the same.
_RELAXED = MetaData()


def _relaxed(model: type[Base]) -> Table:
    source: Table = model.__table__  # type: ignore[assignment]
    columns = [
        Column(c.name, c.type, primary_key=c.primary_key, autoincrement=False)
        for c in source.columns
    ]
    checks = [
        CheckConstraint(text(str(c.sqltext)), name=c.name)
        for c in source.constraints
        if isinstance(c, CheckConstraint)
    ]
    return Table(source.name, _RELAXED, *columns, *checks)


_USERS = _relaxed(User)
_ORDERS = _relaxed(Order)
Index("ix_users_live_email", _USERS.c.email, postgresql_where=_USERS.c.deleted_at.is_(None))
Index("ix_orders_user_id", _ORDERS.c.user_id)
_TABLES: dict[Entity, Table] = {"user": _USERS, "order": _ORDERS}


async def prepare_baseline_database(bench: Bench, suffix: str = "baseline") -> AsyncEngine:
    """A database of the run's own (`<run>_<suffix>`) with the relaxed tables, made afresh."""
    name = bench.database_beside(suffix)
    engine = create_async_engine(await create_database(bench.base.database_url, name))
    async with engine.begin() as connection:
        await connection.run_sync(_RELAXED.drop_all)
        await connection.run_sync(_RELAXED.create_all)
    return engine


async def _reset(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE users, orders"))
    async with engine.connect() as connection:
        await connection.execute(text("CHECKPOINT"))


async def state_mismatches(engine: AsyncEngine, expected: ExpectedState) -> int:
    """How many ids' rows differ from the expected final state (missing ones included)."""
    wrong = 0
    expected_rows: dict[Entity, tuple[str, ...]] = {
        "user": expected.users,
        "order": expected.orders,
    }
    for entity, lines in expected_rows.items():
        want = {int(line.split("|", 1)[0]): line for line in lines}
        async with engine.connect() as connection:
            rows = (await connection.execute(_TABLES[entity].select())).mappings()
            have = {row["id"]: canonical_row(entity, row) for row in rows}  # type: ignore[arg-type]
        wrong += sum(1 for i in want.keys() | have.keys() if want.get(i) != have.get(i))
    return wrong


def _consumer(run: Run, group: str, **options: Any) -> AIOKafkaConsumer:
    s = run.settings
    return AIOKafkaConsumer(
        s.users_topic,
        s.orders_topic,
        bootstrap_servers=s.kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        **options,
    )


def _validate(topics: Topics, topic: str, value: bytes | None) -> Envelope | None:
    """The tutorial's validation: the topic's model, or skip the message."""
    try:
        envelope: Envelope = _ADAPTERS[topics.entity(topic)].validate_json(value or b"")
    except ValidationError:
        return None
    if envelope["entity"] == "user" and envelope["op"] == "upsert":
        envelope["data"].setdefault("country", None)  # optional in the envelope
    return envelope


# --- naive: the ORM, one event at a time -----------------------------------------------------


def _instance(envelope: Envelope) -> User | Order:
    """The ORM object a tutorial merges: the whole row on an upsert; on a delete only the
    key, the version and `deleted_at` (merge leaves the unset columns alone)."""
    model = _MODELS[envelope["entity"]]
    if envelope["op"] == "delete":
        return model(
            id=envelope["data"]["id"],
            version=envelope["version"],
            deleted_at=envelope["occurred_at"],
        )
    return model(**envelope["data"], version=envelope["version"], deleted_at=None)


async def run_naive(
    run: Run, workload: Workload, engine: AsyncEngine, *, max_events: int, max_seconds: float
) -> Phase:
    """`async for message in consumer`: validate, `session.merge(...)`, `commit()`; on a
    sample (the first `max_events` events or `max_seconds`, whichever ends first)."""
    phase = Phase("naive")
    total = len(workload.events)
    await _reset(engine)
    consumer = _consumer(run, f"{run.prefix}.naive")  # auto-commit: the tutorial's default
    done = skipped = rejected = 0
    started = time.monotonic()
    await consumer.start()
    usage = Usage(os.getpid())
    try:
        async with AsyncSession(engine) as session:
            async for message in consumer:
                if done == 0:
                    started = time.monotonic()
                    usage.start()
                envelope = _validate(run.topics, message.topic, message.value)
                if envelope is None:
                    skipped += 1
                else:
                    await session.merge(_instance(envelope))
                    try:
                        await session.commit()
                    except IntegrityError:
                        await session.rollback()
                        rejected += 1
                done += 1
                if done >= min(max_events, total) or time.monotonic() - started >= max_seconds:
                    break
        phase.seconds = time.monotonic() - started
        spent = usage.stop() if done else {}
    finally:
        await consumer.stop()
    phase.events = done
    phase.notes.append(
        f"a sample of the first {done:,} events; no version guard, so its state is not compared"
    )
    phase.figures = {
        "skipped_invalid": skipped,
        "rejected_by_database": rejected,
        "usage": spent,
        "reads_kafka": True,
    }
    return phase


# --- bulk: one executemany upsert per batch ---------------------------------------------------


def _upsert(model: type[User] | type[Order], columns: Sequence[str]) -> Any:
    stmt = insert(model)
    return stmt.on_conflict_do_update(
        index_elements=["id"], set_={name: stmt.excluded[name] for name in columns}
    )


_DATA_COLUMNS = {
    entity: [c.name for c in _TABLES[entity].columns if c.name != "id"] for entity in _TABLES
}
_UPSERT = {entity: _upsert(_MODELS[entity], _DATA_COLUMNS[entity]) for entity in _TABLES}
_SOFT_DELETE = {entity: _upsert(_MODELS[entity], ["version", "deleted_at"]) for entity in _TABLES}


async def _write_bulk(
    sessions: async_sessionmaker[AsyncSession], topics: Topics, records: list[Any]
) -> int:
    """One transaction: an upsert and a soft-delete upsert per table, in arrival order
    within each; returns how many records were skipped as invalid."""
    upserts: dict[Entity, list[dict[str, Any]]] = {"user": [], "order": []}
    deletes: dict[Entity, list[dict[str, Any]]] = {"user": [], "order": []}
    skipped = 0
    for record in records:
        envelope = _validate(topics, record.topic, record.value)
        if envelope is None:
            skipped += 1
        elif envelope["op"] == "delete":
            deletes[envelope["entity"]].append(
                {
                    "id": envelope["data"]["id"],
                    "version": envelope["version"],
                    "deleted_at": envelope["occurred_at"],
                }
            )
        else:
            upserts[envelope["entity"]].append(
                {**envelope["data"], "version": envelope["version"], "deleted_at": None}
            )
    async with sessions() as session, session.begin():
        for entity in ("user", "order"):
            if upserts[entity]:
                await session.execute(_UPSERT[entity], upserts[entity])
            if deletes[entity]:
                await session.execute(_SOFT_DELETE[entity], deletes[entity])
    return skipped


async def run_bulk(run: Run, workload: Workload, engine: AsyncEngine, *, batch: int) -> Phase:
    """Batches of `batch` records from Kafka, each written by `session.execute(insert(...)
    .on_conflict_do_update(...), list_of_dicts)` and committed, then the Kafka offsets."""
    phase = Phase("bulk")
    await _reset(engine)
    total = len(workload.events)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    consumer = _consumer(run, f"{run.prefix}.bulk", enable_auto_commit=False)
    consumed = skipped = 0
    buffer: list[Any] = []
    started: float | None = None
    usage = Usage(os.getpid())
    await consumer.start()
    try:
        while consumed < total:
            fetched = await consumer.getmany(timeout_ms=100, max_records=batch - len(buffer))
            for records in fetched.values():
                buffer.extend(records)
            if started is None and buffer:
                started = time.monotonic()
                usage.start()
            if buffer and (len(buffer) >= batch or not fetched):
                skipped += await _write_bulk(sessions, run.topics, buffer)
                await consumer.commit()
                consumed += len(buffer)
                buffer = []
        assert started is not None
        phase.seconds = time.monotonic() - started
        spent = usage.stop()
    finally:
        await consumer.stop()
    phase.events = consumed
    wrong = await state_mismatches(engine, workload.expected)
    phase.notes.append(
        f"{wrong:,} rows differ from the expected final state (no version "
        "guard: late events overwrite newer rows)"
    )
    phase.figures = {
        "batch": batch,
        "skipped_invalid": skipped,
        "rows_differing": wrong,
        "usage": spent,
        "reads_kafka": True,
    }
    return phase


# --- the machine's limit --------------------------------------------------------------------


async def run_limit(bench: Bench, workload: Workload, topics: Topics) -> Phase:
    """The final rows and one outbox row per distinct change, loaded by `bench.limit.load`
    in one transaction; its rate counts every event of the workload."""
    from bench.limit import load

    phase = Phase("limit")
    final = await asyncio.to_thread(final_state, workload, topics)
    await bench.database.reset()
    say(
        f"limit: loading {len(final.users) + len(final.orders):,} rows and "
        f"{len(final.outbox):,} outbox rows in one transaction"
    )
    usage = Usage(os.getpid())
    usage.start()
    result = await load(
        bench.database.url,
        users=final.users,
        orders=final.orders,
        outbox=final.outbox,
        events=len(workload.events),
    )
    spent = usage.stop()
    engine = bench.database.engine
    async with engine.connect() as connection:
        outbox = int(await connection.scalar(select(func.count()).select_from(OutboxEvent)) or 0)
    if await table_checksum(engine) != workload.expected.checksum():
        phase.problems.append("the tables' checksum differs from the expected final state")
    if outbox != len(final.outbox):
        phase.problems.append(f"{outbox:,} outbox rows, expected {len(final.outbox):,}")
    phase.status = "wrong" if phase.problems else "ok"
    phase.events, phase.seconds = result.events, result.seconds
    phase.notes.append("checksum and outbox count as expected" if not phase.problems else "")
    phase.figures = {
        "users": result.users,
        "orders": result.orders,
        "outbox": result.outbox,
        "steps_seconds": {k: round(v, 3) for k, v in result.steps.items()},
        "usage": spent,
    }
    return phase


# --- the peer -------------------------------------------------------------------------------


async def run_peer(
    bench: Bench,
    workload: Workload,
    *,
    batch_size: int,
    variant: str,
    warmup_events: int,
    timeout_s: float,
) -> Phase:
    """Debezium's JDBC sink (Kafka Connect standalone) on the same valid events in its own
    format and topics, through `bench.peer`; timed from its first row to the final state."""
    phase = Phase("peer")
    try:
        from bench.peer import database
        from bench.peer.run_peer import load_topics, timed_drain
        from bench.peer.worker import ConnectWorker, Layout, PeerError, fetch
    except ImportError as error:
        phase.status, phase.problems = "failed", [f"bench.peer is not usable: {error}"]
        return phase
    from bench.report import REPO

    layout = Layout(REPO)
    prefix = bench.prefix("peer")
    try:
        await asyncio.to_thread(fetch, layout)
        say(f"peer: producing {len(workload.events):,} events in Debezium's format")
        timed = await load_topics(bench.bootstrap, workload.good_values(), prefix)
        warm_events = Traffic(workload.seed + 1, id_base=10**12).events(warmup_events)
        warm = await load_topics(bench.bootstrap, [e.value for e in warm_events], f"{prefix}.warm")
        bench.made_topics += [*timed.topics, *warm.topics]
        url = await database.prepare(bench.base.database_url, bench.database_beside("peer"))
        worker = ConnectWorker(layout, bootstrap=bench.bootstrap)
        startup = await asyncio.to_thread(worker.start)
        try:
            say("peer: warming the JVM up on other events, then the timed drain")
            await timed_drain(
                worker,
                url,
                warm.topics,
                warm.expected,
                events=warm.events,
                batch_size=batch_size,
                variant=variant,
                wait_s=timeout_s,
            )
            usage = Usage(os.getpid(), children=False)  # the JVM is counted as Kafka Connect
            usage.start()
            drained = await timed_drain(
                worker,
                url,
                timed.topics,
                timed.expected,
                events=timed.events,
                batch_size=batch_size,
                variant=variant,
                wait_s=timeout_s,
            )
            spent = usage.stop()
            peak_rss = worker.peak_rss_bytes()
        finally:
            await asyncio.to_thread(worker.stop)
    except (PeerError, OSError) as error:
        phase.status, phase.problems = "failed", [f"the peer failed: {error}"]
        return phase
    phase.events = timed.events
    phase.seconds = drained.seconds - drained.startup_seconds
    phase.notes.append("final state equal to the expected one (rows it deletes are gone)")
    phase.figures = {
        "batch_size": batch_size,
        "variant": variant,
        "events_per_s_including_task_start": round(drained.events_per_s, 1),
        "task_start_seconds": round(drained.startup_seconds, 2),
        "worker_start_seconds": round(startup, 2),
        "peak_rss_bytes": peak_rss,
        "value_bytes_mean": round(timed.value_bytes / timed.events),
        "usage": spent,
    }
    return phase
