"""The relay part: one replica leads and publishes the outbox, chunk by chunk, each chunk in
one Kafka transaction together with the position after it.

Nothing is skipped (rows are read in commit-safe order) and nothing repeats for a
read_committed consumer (the position commits or aborts with the events it covers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from operator import itemgetter
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import ProducerFenced
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sync_service.config import Settings
from sync_service.connections import kafka
from sync_service.errors import UserError
from sync_service.kafka import require_topics
from sync_service.observability import metrics
from sync_service.observability.outages import KAFKA, POSTGRESQL, step
from sync_service.pipeline.write import OUTBOX_CHANNEL
from sync_service.relay.lease import Lease, lock_key
from sync_service.relay.outbox import (
    OutboxRecord,
    backlog,
    fetch_after,
    next_txid,
    position_of,
    prune_through,
    to_messages,
)
from sync_service.relay.position import (
    Position,
    encode_position,
    ensure_position_topic,
    read_position,
)
from sync_service.relay.producer import make_producer, publish, stop_producer
from sync_service.retry import Backoff, retrying, wait_any

log = logging.getLogger(__name__)

STANDBY_RETRY_S = 1.0
"""How often a standby tries the lease: a dead leader is replaced within about this."""
PUBLISH_TIMEOUT_S = 30.0
"""A chunk not committed by then (broker gone) is given up, with its producer."""
PRUNE_CHUNK = 5_000
"""Rows deleted per statement: a round of pruning deletes in chunks until none is left."""


def relay_part(settings: Settings, engine: AsyncEngine) -> OutboxRelay:
    """The relay as a part of the service (`sync-service run` / `relay`)."""
    return OutboxRelay(settings, engine)


async def require_downstream_topics(settings: Settings) -> None:
    """A `UserError` naming any topic the relay publishes to that does not exist (or why
    Kafka cannot be asked)."""
    await require_topics(
        settings,
        [
            settings.out_users_topic,
            settings.out_orders_topic,
            *([settings.dlq_topic] if settings.dlq_topic else []),
        ],
        hint="create the downstream topics first, or check SYNC_OUT_*_TOPIC / SYNC_DLQ_TOPIC",
    )


class OutboxRelay:
    """Publishes the outbox until `stop` is set; any number of replicas may run."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self._settings = settings
        self._engine = engine
        self._key = lock_key(settings.relay_transactional_id)
        self._topics = {"user": settings.out_users_topic, "order": settings.out_orders_topic}
        self._backoff = Backoff(settings.retry_initial_ms / 1000, settings.retry_max_ms / 1000)
        self._standing_by = False
        self._published = Position(0, 0)
        """Committed to Kafka: what the outbox may lose (set by the pump, read by pruning)."""

    async def run(self, stop: asyncio.Event) -> None:
        settings = self._settings
        await require_downstream_topics(settings)
        await ensure_position_topic(settings)
        try:
            while not stop.is_set():
                await retrying("relay", lambda: self._term(stop), self._backoff, stop=stop)
        except asyncio.CancelledError:
            if not stop.is_set():
                raise

    async def _term(self, stop: asyncio.Event) -> None:
        """Stand by for one lease attempt, or lead until stopped or fenced."""
        with step(POSTGRESQL, "taking the relay lease"):
            lease = await Lease.acquire(self._engine, self._key)
        if lease is None:
            if not self._standing_by:
                log.info("relay standing by: another replica publishes")
            self._standing_by = True
            await wait_any([stop], STANDBY_RETRY_S)
            return
        self._standing_by = False
        metrics.RELAY_ACTIVE.set(1)
        try:
            await self._lead(lease, stop)
        except ProducerFenced:
            log.warning("another relay replica took over (producer fenced); standing by")
        finally:
            metrics.RELAY_ACTIVE.set(0)
            await lease.release()

    async def _lead(self, lease: Lease, stop: asyncio.Event) -> None:
        producer = make_producer(self._settings)
        try:
            # Start first: it fences any other holder of the transactional id and ends
            # its open transaction, so the position read next is final.
            with step(KAFKA, "starting the transactional producer"):
                await kafka.start(producer, self._settings)
            with step(KAFKA, "reading the relay position"):
                position = await read_position(self._settings)
            with step(POSTGRESQL, "checking the relay position"):
                await _check_horizon(lease.connection, position)
            log.info("relay active", extra={"txid": position.txid, "id": position.id})
            wake = asyncio.Event()
            with step(POSTGRESQL, "listening for outbox commits"):
                await lease.listen(OUTBOX_CHANNEL, wake)
            self._published = position
            await _first_of(
                self._pump(lease.connection, producer, position, wake, stop),
                self._housekeep(stop),
            )
        finally:
            await stop_producer(producer)

    async def _pump(
        self,
        connection: AsyncConnection,
        producer: AIOKafkaProducer,
        position: Position,
        wake: asyncio.Event,
        stop: asyncio.Event,
    ) -> None:
        chunk = self._settings.relay_chunk
        while not stop.is_set():
            wake.clear()  # before reading: a commit notified during the read wakes the wait
            with step(POSTGRESQL, "reading the outbox"):
                rows = await fetch_after(connection, position, chunk)
            if rows:
                position = self._published = await self._publish(producer, rows)
            if len(rows) < chunk:
                await wait_any([wake, stop], self._settings.relay_poll_ms / 1000)

    async def _publish(self, producer: AIOKafkaProducer, rows: Sequence[OutboxRecord]) -> Position:
        """Commit `rows` and the position after them to Kafka; return that position."""
        started = time.perf_counter()
        after = position_of(rows[-1])
        messages = to_messages(rows, self._topics, self._settings.dlq_topic)
        published = Counter(map(itemgetter(0), messages))
        settings = self._settings
        messages.append(
            (
                settings.relay_position_topic,
                settings.relay_transactional_id.encode(),
                encode_position(after),
                [],
            )
        )
        with step(KAFKA, f"publishing {len(rows)} outbox rows"):
            await asyncio.wait_for(publish(producer, messages), PUBLISH_TIMEOUT_S)
        seconds = time.perf_counter() - started
        metrics.PUBLISH_SECONDS.observe(seconds)
        for topic, count in published.items():
            metrics.PUBLISHED.labels(topic).inc(count)
        self._backoff.reset()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "chunk published",
                extra={
                    "rows": len(rows), "txid": after.txid, "id": after.id,
                    "topics": dict(published), "publish_ms": round(seconds * 1000, 1),
                },
            )  # fmt: skip
        return after

    async def _housekeep(self, stop: asyncio.Event) -> None:
        """Every `relay_prune_every_s`, delete what Kafka holds and refresh the backlog
        gauges: beside the pump, on a connection of its own, so that a round of deletes
        (~20 ms per 5,000 rows) never holds publishing up."""
        while not stop.is_set():
            with step(POSTGRESQL, "pruning the outbox"):
                async with self._engine.connect() as connection:
                    await connection.execution_options(isolation_level="AUTOCOMMIT")
                    while (
                        await prune_through(connection, self._published, PRUNE_CHUNK) == PRUNE_CHUNK
                    ):
                        pass
                    count, age = await backlog(connection, self._published)
            metrics.OUTBOX_BACKLOG.set(count)
            metrics.OUTBOX_OLDEST_AGE.set(age)
            await wait_any([stop], self._settings.relay_prune_every_s)


async def _first_of(*work: Coroutine[Any, Any, None]) -> None:
    """Run `work` together until one part returns or fails (its error is raised); then
    cancel the rest."""
    tasks = [asyncio.ensure_future(part) for part in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _check_horizon(connection: AsyncConnection, position: Position) -> None:
    """Refuse a position from another database: every row written here would sort before
    it and never be published."""
    horizon = await next_txid(connection)
    if position.txid >= horizon:
        raise UserError(
            f"the relay position (txid {position.txid}) is ahead of this database's"
            f" transactions (next txid {horizon}): was it restored into another cluster?"
            " Point SYNC_RELAY_TRANSACTIONAL_ID at a fresh id (unpruned outbox rows are then"
            " published again)"
        )
