"""Latency at a fixed offered rate: events sent at `rate` per second to a running service,
and for each one the time from its send to its row being visible and to its downstream event.

Invariant: every time is read from this process's monotonic clock, at the send and at the
first sight of the event's outbox row (polled) or downstream message (read_committed).
Events are known by their downstream id (the outbox's `event_id` column and the
downstream `event_id` header), so that watching parses no JSON on the measured machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.limit import asyncpg_dsn
from bench.progress import say
from bench.report import Phase, distribution
from bench.service.check import check_target, count_downstream
from bench.service.names import Bench
from bench.service.phase import selected_metrics, service_settings
from bench.service.process import ServiceProcess
from bench.service.usage import Usage
from bench.service.watch import RelayTail, end_offsets, watch
from bench.workload import Topics, Workload, event_ids
from sync_service.events.outbound import downstream_event_text
from sync_service.ops.traffic import Event

ROW_POLL_S = 0.005
"""How often the outbox is polled: a row's time is at most this (plus one query) late."""
FELL_BEHIND_S = 1.0
"""Done this long after the last send: the service did not keep up with the rate."""
WARMUP_SHARE = 0.1
WARMUP_MAX_S = 5.0
"""Events sent in the first tenth of the run (at most 5 s) are not counted: the service's
first batches pay for connection set-up, not for the rate."""


class RowWatcher:
    """Notes when each outbox row first becomes visible. Its `created_at` is the writing
    transaction's start, not its commit, so the row is polled for instead. One batch is
    written at a time, so the outbox's key `(txid, id)` grows in commit order and a poll
    past the last key seen misses none."""

    def __init__(self, database_url: str) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self.seen: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        # Plain asyncpg, one prepared statement in autocommit: the poll runs 200 times a
        # second on the machine under test, so it must cost next to nothing.
        # Planned for each `last`: a generic plan made while the outbox was empty scans
        # the whole table (with whatever the relay deleted but vacuum has not yet freed).
        connection = await asyncpg.connect(
            self._dsn, server_settings={"plan_cache_mode": "force_custom_plan"}
        )
        try:
            query = await connection.prepare(
                "SELECT txid, id, event_id::text FROM outbox WHERE (txid, id) > ($1, $2)"
                " ORDER BY txid, id LIMIT 20000"
            )
            last = (0, 0)
            while True:
                rows = await query.fetch(*last)
                now = time.monotonic()
                for txid, row_id, event_id in rows:
                    self.seen.setdefault(event_id, now)
                    last = (txid, row_id)
                await asyncio.sleep(ROW_POLL_S)
        finally:
            await connection.close()

    async def stop(self) -> None:
        await _cancel(self._task)


class DownstreamWatcher:
    """Notes when each downstream event reaches a read_committed consumer."""

    def __init__(self, bootstrap: str, topics: list[str], partitions: int) -> None:
        self._partitions = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=20,
        )
        self.seen: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            fetched = await self._consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for records in fetched.values():
                for record in records:
                    event_id = dict(record.headers)["event_id"].decode()
                    self.seen.setdefault(event_id, now)

    async def stop(self) -> None:
        await _cancel(self._task)
        await self._consumer.stop()


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def produce_paced(
    bootstrap: str,
    topics: Topics,
    events: Sequence[Event],
    ids: Sequence[str | None],
    rate: float,
) -> tuple[dict[str, float], float]:
    """Send `events` at `rate` per second, each when it is due, by a producer with Kafka
    4's default linger of 5 ms (an event's time starts at its send, so the linger counts
    against the service); returns each event id's first send time and the seconds the
    sending took."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)
    sent: dict[str, float] = {}
    await producer.start()
    try:
        started = time.monotonic()
        index = 0
        while index < len(events):
            due = min(len(events), int((time.monotonic() - started) * rate) + 1)
            while index < due:
                event, event_id = events[index], ids[index]
                now = time.monotonic()
                await producer.send(
                    topics.of(event.entity), event.value, key=event.key, partition=event.partition
                )
                if event_id is not None:
                    sent.setdefault(event_id, now)
                index += 1
            await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
        await producer.flush()
        seconds = time.monotonic() - started
    finally:
        await producer.stop()
    return sent, seconds


def latencies(sent: dict[str, float], seen: dict[str, float], since: float) -> list[float]:
    """Seconds from send to first sight, for events sent at or after `since` and seen."""
    return [
        at - sent[event_id]
        for event_id, at in seen.items()
        if event_id in sent and sent[event_id] >= since
    ]


async def run_latency(bench: Bench, *, rate: float, seconds: float, seed: int) -> Phase:
    """The service idle and caught up; then `rate` events/s for `seconds`; then checked."""
    phase = Phase("latency")
    run = bench.fresh("latency")
    workload = Workload.generate(int(rate * seconds), seed=seed)
    ids = [
        None if inbound is None else downstream_event_text(uuid.UUID(inbound))
        for inbound in event_ids(workload.events)
    ]
    await bench.database.reset()
    await bench.create_topics(run, workload.partitions)
    engine = bench.database.engine
    service = ServiceProcess(run, bench.logs / "latency.log")
    tail = RelayTail(run.settings)
    rows = RowWatcher(bench.database.url)
    downstream = DownstreamWatcher(bench.bootstrap, run.out_topics, workload.partitions)
    await tail.start()
    usage = Usage(service.start())
    try:
        await service.wait_ready()
        await rows.start()
        await downstream.start()
        say(f"latency: sending {len(workload.events):,} events at {rate:,.0f}/s")
        usage.start()
        sent, sending_s = await produce_paced(
            bench.bootstrap, run.topics, workload.events, ids, rate
        )
        total = sum(
            (await end_offsets(bench.bootstrap, [run.topics.users, run.topics.orders])).values()
        )
        timeline = await watch(service, engine, tail, total, "latency")
        await asyncio.sleep(0.5)  # the last downstream fetch lands
        metrics = await service.metrics() if timeline.problem is None else {}
        spent = usage.stop()
    except RuntimeError as error:
        phase.status, phase.problems = "failed", [str(error)]
        return phase
    finally:
        await rows.stop()
        await downstream.stop()
        exit_code = service.stop()
        await tail.stop()
    if timeline.problem is not None:
        phase.status, phase.problems = "failed", [timeline.problem]
        return phase
    published = await count_downstream(bench.bootstrap, run.out_topics)
    phase.problems = await check_target(
        engine, workload.expected, published, metrics.get("sync_changes_applied_total")
    )
    if exit_code != 0:
        phase.problems.append(f"the service exited with {exit_code} on SIGTERM: see {service.logs}")
    phase.status = "wrong" if phase.problems else "ok"
    first_send = min(sent.values())
    since = first_send + min(WARMUP_MAX_S, WARMUP_SHARE * seconds)
    to_row = distribution(latencies(sent, rows.seen, since))
    to_downstream = distribution(latencies(sent, downstream.seen, since))
    phase.events, phase.seconds = len(workload.events), sending_s
    behind = (timeline.done or 0.0) - max(sent.values())
    if behind > FELL_BEHIND_S:
        phase.notes.append(
            f"the service fell behind the offered rate (caught up {behind:.1f} s after the "
            "last send): these are queueing times"
        )
    if not phase.problems:
        phase.notes.append(
            f"{len(rows.seen):,} rows and {len(downstream.seen):,} downstream "
            "events timed; final state as expected"
        )
    phase.figures = {
        "offered_rate": rate,
        "offered_seconds": seconds,
        "achieved_rate": round(len(workload.events) / sending_s, 1),
        "caught_up_after_last_send_seconds": round(behind, 2),
        "service_settings": service_settings(run.settings),
        "service_metrics": selected_metrics(metrics),
        "warmup_seconds": round(since - first_send, 2),
        "to_row": to_row,
        "to_downstream": to_downstream,
        "row_poll_seconds": ROW_POLL_S,
        "usage": spent,
    }
    return phase
