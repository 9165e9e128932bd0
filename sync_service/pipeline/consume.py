"""The consumer: Kafka records in, committed batches out.

Positions live in PostgreSQL; on assignment the consumer seeks to them, and after each
committed batch it also commits them to Kafka (best effort, never holding up the next
batch) so that standard lag tools see the truth. Fetched records are buffered per
partition and taken oldest first across partitions (`align`); one batch is written at a
time while the next one fills, and a partition whose buffer holds its share of a batch
pauses (backpressure) until it drains. On revoke and on stop, the batch in flight
finishes (or, past the grace period, is rolled back whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from sync_service.config import Settings
from sync_service.events.change import Entity
from sync_service.observability import metrics
from sync_service.pipeline.align import Aligner
from sync_service.pipeline.batch import Batch, BatchBuilder
from sync_service.pipeline.decode import Limits, decode
from sync_service.pipeline.write import BatchWriter, Fenced, WriteResult
from sync_service.retry import Backoff, describe, retrying

log = logging.getLogger(__name__)

TP = tuple[str, int]
FETCH_BYTES_PER_PARTITION = 256 * 1024
FETCH_MIN_BYTES, FETCH_MAX_WAIT_MS = 64 * 1024, 10
"""The broker answers a fetch once it has 64 KiB or 10 ms have passed: live traffic
then costs a fetch per ~10 ms instead of one per few records (a fifth of the consumer's
CPU at 5,000 events/s, measured), for at most 10 ms more latency."""
ALIGN_MAX_HOLD_S = 0.2
"""How long newer records may wait for a partition with a backlog to deliver older ones;
a partition within its share of a batch of its end holds nothing back."""
DECODE_SLICE = 200
"""Records decoded per step at most: between slices the batch in flight gets the loop,
so PostgreSQL never waits for a whole batch's decoding before its next statement."""


class ChangeConsumer:
    """Consumes the change topics into the target database until `stop` is set."""

    def __init__(
        self,
        settings: Settings,
        writer: BatchWriter,
        *,
        clock: Callable[[], float] = time.monotonic,
        stop_grace_s: float = 15.0,
    ) -> None:
        self._settings = settings
        self._writer = writer
        self._clock = clock
        self._grace = stop_grace_s
        self._entities: dict[str, Entity] = {
            settings.users_topic: "user",
            settings.orders_topic: "order",
        }
        self._limits = Limits(
            settings.max_message_bytes, settings.max_json_depth, settings.dead_letter_value_bytes
        )
        self._builder = BatchBuilder(settings.batch_max_events, settings.batch_max_wait_ms / 1000)
        self._expected: dict[TP, int | None] = {}
        """Owned partitions and the position this consumer believes is stored for each."""
        self._inflight: asyncio.Task[None] | None = None
        self._rebalancing = False
        self._pending_due = 0.0
        """When to next retry the oldest waiting changes (a sweep), whatever arrives."""
        self._paused: set[TP] = set()
        self._unmirrored: dict[TP, int] = {}
        self._mirroring: asyncio.Task[None] | None = None
        self._sliced = False
        """The last step decoded a whole slice: more is at hand, so do not wait to fetch."""
        self._aligner: Aligner[ConsumerRecord[bytes, bytes]] = Aligner(ALIGN_MAX_HOLD_S)
        self._consumer: AIOKafkaConsumer | None = None
        self._backoff = Backoff(settings.retry_initial_ms / 1000, settings.retry_max_ms / 1000)

    @property
    def assigned(self) -> bool:
        """True once this consumer owns at least one partition."""
        return bool(self._expected)

    async def run(self, stop: asyncio.Event) -> None:
        settings = self._settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.group_id,
            client_id=f"{settings.group_id}-{settings.instance_id or 'consumer'}",
            # A static member (an instance id) that stops does not leave the group: back
            # within the session timeout, it gets its partitions again and nobody else
            # rebalances. A dynamic one leaves on stop, and its partitions move at once.
            group_instance_id=settings.instance_id or None,
            session_timeout_ms=settings.group_session_timeout_ms,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            # Small per-partition fetches keep the buffers near their share of a batch
            # (a larger record still arrives whole: the broker always returns the first).
            max_partition_fetch_bytes=FETCH_BYTES_PER_PARTITION,
            fetch_min_bytes=FETCH_MIN_BYTES,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self._consumer = consumer
        await retrying("kafka connect", consumer.start, self._backoff, stop=stop)
        consumer.subscribe(list(self._entities), listener=_Listener(self))
        try:
            while not stop.is_set():
                await self._step(consumer)
        finally:
            await self._shutdown(consumer)

    async def _step(self, consumer: AIOKafkaConsumer) -> None:
        self._apply_backpressure(consumer)
        fetched = await consumer.getmany(
            timeout_ms=0 if self._sliced else self._settings.batch_max_wait_ms,
            max_records=self._settings.poll_max_records,
        )
        now = self._clock()
        for tp, records in fetched.items():
            if (tp.topic, tp.partition) not in self._expected:
                continue  # revoked while the fetch was under way
            self._aligner.add((tp.topic, tp.partition), records)
            metrics.CONSUMED.labels(tp.topic).inc(len(records))
        room = self._settings.batch_max_events - len(self._builder)
        self._sliced = False
        if room > 0 and len(self._aligner):
            behind = [
                tp
                for tp in self._expected
                if not self._aligner.buffered(tp) and await _behind(consumer, tp, self._share)
            ]
            released = self._aligner.release(min(room, DECODE_SLICE), behind, now)
            self._sliced = len(released) == DECODE_SLICE
            for (topic, partition), record in released:
                self._builder.add(
                    decode(
                        entity=self._entities[topic],
                        topic=topic,
                        partition=partition,
                        offset=record.offset,
                        key=record.key,
                        value=record.value,
                        limits=self._limits,
                    ),
                    now,
                )
        if self._inflight is not None and self._inflight.done():
            task, self._inflight = self._inflight, None
            task.result()  # a defect (not a transient failure) stops the service here
        if self._inflight is None and not self._rebalancing and self._expected:
            sweep = now >= self._pending_due
            if self._builder.due(now) or sweep:
                batch = self._builder.take() if self._builder.due(now) else Batch()
                batch.sweep = sweep
                self._start(batch)
        await asyncio.sleep(0)  # let the batch in flight take its turn

    @property
    def _share(self) -> int:
        """Each owned partition's share of a batch, in records."""
        return max(1, self._settings.batch_max_events // max(1, len(self._expected)))

    def _apply_backpressure(self, consumer: AIOKafkaConsumer) -> None:
        """Pause a partition whose buffer holds its share of a batch; resume it once that
        is half gone. So at most three batches are held (one written, one built, one
        buffered), and every partition's oldest records are at hand."""
        share = self._share
        pause, resume = [], []
        for tp in self._expected:
            size = self._aligner.buffered(tp)
            if tp not in self._paused and size >= share:
                pause.append(tp)
            elif tp in self._paused and size < share // 2:
                resume.append(tp)
        if pause:
            consumer.pause(*(TopicPartition(*tp) for tp in pause))
            self._paused.update(pause)
        if resume:
            consumer.resume(*(TopicPartition(*tp) for tp in resume))
            self._paused.difference_update(resume)
        metrics.PAUSED.set(int(bool(self._paused)))

    def _start(self, batch: Batch) -> None:
        if batch.sweep:
            self._pending_due = self._clock() + self._settings.pending_retry_ms / 1000
        self._inflight = asyncio.create_task(self._write(batch), name="write-batch")

    async def _write(self, batch: Batch) -> None:
        """Write `batch` until it commits (retrying transient failures), then advance."""
        expected = dict(self._expected)
        started = self._clock()
        try:
            result = await retrying(
                "write batch", lambda: self._writer.write(batch, expected), self._backoff
            )
        except Fenced as fenced:
            log.warning("positions moved under this consumer (%s); re-reading them", fenced)
            await self._reseek(list(self._expected))
            return
        metrics.WRITE_SECONDS.observe(self._clock() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        self._record(batch, result)
        for tp, next_offset in result.next_offsets.items():
            if tp in self._expected:
                self._expected[tp] = next_offset
        self._mirror(result.next_offsets)

    def _record(self, batch: Batch, result: WriteResult) -> None:
        for entity, count in result.applied.items():
            metrics.APPLIED.labels(entity).inc(count)
        for entity, count in result.stale.items():
            metrics.STALE.labels(entity).inc(count)
        metrics.WAITED.inc(result.waiting)
        for dead in batch.dead:
            metrics.DEAD_LETTERED.labels(dead.source.topic, dead.kind).inc()
            log.warning(
                "dead-lettered %s[%d]@%d (%s): %s",
                dead.source.topic, dead.source.partition, dead.source.offset, dead.kind,
                dead.reason,
            )  # fmt: skip

    def _mirror(self, next_offsets: dict[TP, int]) -> None:
        """Mirror stored positions into Kafka's group offsets, for lag tools only, beside
        the pipeline: the next batch never waits for the broker's answer, and positions
        stored meanwhile go in the next commit."""
        self._unmirrored.update(next_offsets)
        if self._mirroring is None or self._mirroring.done():
            self._mirroring = asyncio.create_task(self._commit_to_kafka(), name="mirror")

    async def _commit_to_kafka(self) -> None:
        consumer = self._consumer
        while consumer is not None and self._unmirrored:
            offsets = {
                TopicPartition(t, p): n for (t, p), n in self._unmirrored.items()
                if (t, p) in self._expected
            }  # fmt: skip
            self._unmirrored.clear()
            if not offsets:
                return
            try:
                await consumer.commit(offsets)
            except KafkaError as error:
                log.info("Kafka offset commit skipped (positions are safe in PostgreSQL): %s",
                         describe(error))  # fmt: skip
            for tp, next_offset in offsets.items():
                end = consumer.highwater(tp)
                if end is not None:
                    metrics.LAG.labels(tp.topic, str(tp.partition)).set(max(0, end - next_offset))

    async def _settle(self) -> None:
        """Wait for the batch in flight, whatever its outcome."""
        task = self._inflight
        if task is None:
            return
        await asyncio.wait([task])
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def _flush(self) -> None:
        await self._settle()
        if len(self._builder) and self._expected:
            self._start(self._builder.take())
            await self._settle()

    async def on_revoked(self, revoked: set[TP]) -> None:
        self._rebalancing = True
        await self._flush()
        for tp in revoked:
            self._expected.pop(tp, None)
            with contextlib.suppress(KeyError):
                metrics.LAG.remove(tp[0], str(tp[1]))
        self._builder.drop(revoked)
        self._aligner.drop(revoked)
        self._paused.difference_update(revoked)

    async def on_assigned(self, assigned: set[TP]) -> None:
        for tp in assigned:
            self._expected.setdefault(tp, None)
        await self._reseek(list(assigned))
        self._pending_due = self._clock()  # sweep now: changes may have waited from before
        self._rebalancing = False
        log.info("assigned %s", ", ".join(f"{t}[{p}]" for t, p in sorted(assigned)) or "nothing")

    async def _reseek(self, partitions: list[TP]) -> None:
        """Seek `partitions` to their stored positions (the beginning where none is stored)
        and forget what was buffered for them."""
        consumer = self._consumer
        assert consumer is not None
        positions = await retrying(
            "read positions", lambda: self._writer.positions(partitions), self._backoff
        )
        self._builder.drop(set(partitions))
        self._aligner.drop(partitions)
        fresh = []
        for tp in partitions:
            position = positions.get(tp)
            self._expected[tp] = position
            if position is None:
                fresh.append(TopicPartition(*tp))
            else:
                consumer.seek(TopicPartition(*tp), position)
        if fresh:
            await consumer.seek_to_beginning(*fresh)

    async def _shutdown(self, consumer: AIOKafkaConsumer) -> None:
        """Finish or roll back the batch in flight, write what is buffered, leave the group."""
        try:
            await asyncio.wait_for(self._flush(), timeout=self._grace)
        except TimeoutError:
            log.warning("batch not written within %.0fs of stop; rolled back, will be re-read",
                        self._grace)  # fmt: skip
            if self._inflight is not None:
                self._inflight.cancel()
                await asyncio.wait([self._inflight])
        finally:
            if self._mirroring is not None:  # the last positions, unless the broker is gone
                await asyncio.wait([self._mirroring], timeout=self._grace)
                self._mirroring.cancel()
                await asyncio.wait([self._mirroring])
            self._expected.clear()
            await consumer.stop()


async def _behind(consumer: AIOKafkaConsumer, tp: TP, backlog: int) -> bool:
    """Whether more than `backlog` committed records of `tp` are not fetched yet (unknown
    until a fetch has answered for it, which counts as behind). Live traffic keeps every
    partition within a few records of its end, so only a backlog is ever held back."""
    partition = TopicPartition(*tp)
    end = consumer.last_stable_offset(partition)
    if end is None or end < 0:
        end = consumer.highwater(partition)
    try:
        return end is None or end - await consumer.position(partition) > backlog
    except IllegalStateError:  # revoked meanwhile
        return False


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Flush and forget on revoke; seek to the stored positions on assign."""

    def __init__(self, owner: ChangeConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._owner.on_revoked({(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._owner.on_assigned({(tp.topic, tp.partition) for tp in assigned})
