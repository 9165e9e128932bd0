"""The soak's load and its clocks: events sent at a steady rate as they are generated (a
30-minute history is millions of events, too many to hold), and the time from each send to
its batch's commit (the stored position passing its offset) and to its downstream event.

Invariant: every time is this process's monotonic clock; an event's commit is when the
consumer group's stored position (read from PostgreSQL) is first seen past its offset,
which covers rows, stale changes and dead letters alike.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.soak.summary import Window
from bench.workload import Topics
from sync_service.events.outbound import downstream_event_text
from sync_service.ops.traffic import Event

Partition = tuple[str, int]
FORGET_S = 300.0
"""A send not seen downstream after this long is forgotten (a stale change or a duplicate
publishes nothing); the count forgotten is reported."""


class CommitClock:
    """Per partition, the offsets sent and when, in offset order; a stored position past
    an offset times that event's commit."""

    def __init__(self, window: Window) -> None:
        self._sent: dict[Partition, deque[tuple[int, float]]] = {}
        self._window = window

    def sent(self, partition: Partition, offset: int, at: float) -> None:
        queue = self._sent.setdefault(partition, deque())
        if queue and offset < queue[-1][0]:  # acks arrive in order per partition, but be safe
            queue.append((offset, at))
            self._sent[partition] = deque(sorted(queue))
        else:
            queue.append((offset, at))

    def committed(self, positions: Mapping[Partition, int], now: float) -> int:
        """Time every sent offset below its partition's stored `next_offset`; how many."""
        timed = 0
        for partition, next_offset in positions.items():
            queue = self._sent.get(partition)
            while queue and queue[0][0] < next_offset:
                _, at = queue.popleft()
                self._window.add(now, now - at)
                timed += 1
        return timed

    def waiting(self) -> int:
        return sum(len(q) for q in self._sent.values())


class DownstreamClock:
    """Sends by downstream event id; a first sighting downstream times it."""

    def __init__(self, window: Window) -> None:
        self._sent: dict[str, float] = {}
        self._window = window
        self.forgotten = 0

    def sent(self, event_id: str, at: float) -> None:
        self._sent.setdefault(event_id, at)  # a duplicate's time is its first send's

    def seen(self, sightings: Mapping[str, float]) -> None:
        for event_id, at in sightings.items():
            sent = self._sent.pop(event_id, None)
            if sent is not None:
                self._window.add(at, at - sent)

    def forget(self, before: float) -> None:
        """Drop sends older than `before` (dicts keep insertion order: oldest first)."""
        while self._sent:
            event_id, at = next(iter(self._sent.items()))
            if at >= before:
                return
            del self._sent[event_id]
            self.forgotten += 1


TICK_S = 0.025
"""Events due within one tick go out together, one record batch per partition: a send per
event costs the soak's own process more CPU than the loaded machine can spare. An event's
time starts when it was due (at most one tick before its batch left), so the wait counts
against the service, as a producer's linger would."""


@dataclass
class Sending:
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0


async def produce_steadily(
    bootstrap: str,
    topics: Topics,
    events: Iterator[Event],
    total: int,
    rate: float,
    commits: CommitClock,
    downstream: DownstreamClock,
    burst: int = 0,
) -> Sending:
    """Send `total` events from `events` (which must then be exhausted): the first `burst`
    at once, the rest at `rate` per second, noting each one's time against its offset and
    its downstream id."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1)
    sending = Sending()

    def acked(partition: Partition, times: list[float]) -> Callable[[asyncio.Future[Any]], None]:
        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled() or future.exception() is not None:
                sending.failed += len(times)
                return
            base = future.result().offset
            for i, at in enumerate(times):
                commits.sent(partition, base + i, at)

        return done

    await producer.start()
    try:
        started = time.monotonic()
        index = 0
        while index < total:
            now = time.monotonic()
            due = min(total, burst + int((now - started) * rate) + 1)
            open_batches: dict[Partition, tuple[Any, list[float]]] = {}
            while index < due:
                event = next(events)
                where = (topics.of(event.entity), event.partition)
                at = max(started + max(0, index - burst) / rate, now - TICK_S)
                batch, times = open_batches.get(where) or (producer.create_batch(), [])
                if batch.append(key=event.key, value=event.value, timestamp=None) is None:
                    await _send(producer, where, batch, acked(where, times))
                    batch, times = producer.create_batch(), []
                    batch.append(key=event.key, value=event.value, timestamp=None)
                times.append(at)
                open_batches[where] = (batch, times)
                if not event.bad:
                    inbound = uuid.UUID(orjson.loads(event.value)["event_id"])
                    downstream.sent(downstream_event_text(inbound), at)
                index += 1
            for where, (batch, times) in open_batches.items():
                await _send(producer, where, batch, acked(where, times))
            sending.sent = index
            await asyncio.sleep(max(0.0, now + TICK_S - time.monotonic()))
        if next(events, None) is not None:
            raise RuntimeError("the history held more events than were to be sent")
        await producer.flush()
        sending.seconds = time.monotonic() - started
    finally:
        await producer.stop()
    return sending


async def _send(
    producer: AIOKafkaProducer,
    where: Partition,
    batch: Any,
    done: Callable[[asyncio.Future[Any]], None],
) -> None:
    future = await producer.send_batch(batch, where[0], partition=where[1])
    future.add_done_callback(done)


async def stored_positions(engine: AsyncEngine, group_id: str) -> dict[Partition, int]:
    """The group's stored `next_offset` of every partition."""
    query = text('SELECT topic, "partition", next_offset FROM consumer_offsets WHERE group_id = :g')
    async with engine.connect() as connection:
        rows = await connection.execute(query, {"g": group_id})
        return {(str(t), int(p)): int(n) for t, p, n in rows}
