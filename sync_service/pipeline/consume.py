"""The consumer: Kafka records in, committed batches out.

Positions live in PostgreSQL; on assignment the consumer seeks to them, and after each
committed batch it also commits them to Kafka (best effort, never holding up the next
batch) so that standard lag tools see the truth. Fetched records are buffered per
partition and taken oldest first across partitions (`align`); one batch is written at a
time while the next one fills, and a partition whose buffer holds its share of a batch
pauses (backpressure) until it drains. On revoke and on stop, the batch in flight
finishes (or, past the grace period, is rolled back whole). The consumer reads
`read_committed`: an upstream's aborted transactions are never returned, and the stored
positions move past them and past the transaction markers, to the partitions' ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from sync_service.config import Settings
from sync_service.connections import kafka
from sync_service.events.change import DeadLetter, Entity
from sync_service.observability import metrics, outages
from sync_service.observability.logging import OffsetRange
from sync_service.pipeline.align import Aligner
from sync_service.pipeline.batch import Batch, BatchBuilder
from sync_service.pipeline.decode import Limits, decoder_for
from sync_service.pipeline.guard import Trip
from sync_service.pipeline.write import BatchWriter, Fenced, WriteResult
from sync_service.retry import Backoff, describe, is_transient, retrying

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
GUARD_POLL_S = 2.0
"""While the dead-letter guard holds a partition, how often to look whether an operator
has resumed it (`sync-service dlq resume`)."""


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
        self._limits = Limits.of(settings)
        self._decode = decoder_for(settings.inbound_format)
        self._builder = BatchBuilder(settings.batch_max_events, settings.batch_max_wait_ms / 1000)
        self._expected: dict[TP, int | None] = {}
        """Owned partitions and the position this consumer believes is stored for each."""
        self._inflight: asyncio.Task[None] | None = None
        self._rebalancing = False
        self._pending_due = 0.0
        """When to next retry the oldest waiting changes (a sweep), whatever arrives."""
        self._paused: set[TP] = set()
        self._guarded: dict[TP, Trip] = {}
        """Partitions the dead-letter guard holds paused, until an operator resumes them."""
        self._guard_due = 0.0
        self._unmirrored: dict[TP, int] = {}
        self._mirroring: asyncio.Task[None] | None = None
        self._sliced = False
        """The last step decoded a whole slice: more is at hand, so do not wait to fetch."""
        self._aligner: Aligner[ConsumerRecord[bytes, bytes]] = Aligner(ALIGN_MAX_HOLD_S)
        self._consumer: AIOKafkaConsumer | None = None
        self._fetched_at: float | None = None
        """While Kafka is known to be unreachable: the latest fetch answer seen so far."""
        self._backoff = Backoff(settings.retry_initial_ms / 1000, settings.retry_max_ms / 1000)
        self._epoch = 0
        """Counts rebalances and seeks: a position read across one of them is stale."""

    @property
    def assigned(self) -> bool:
        """True once this consumer owns at least one partition."""
        return bool(self._expected)

    @property
    def guarded(self) -> Mapping[TP, Trip]:
        """The owned partitions that the dead-letter guard holds paused, and why."""
        return self._guarded

    async def run(self, stop: asyncio.Event) -> None:
        settings = self._settings
        consumer = kafka.consumer(
            settings,
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
        await retrying(
            "kafka connect",
            lambda: kafka.start(consumer, settings),
            self._backoff,
            stop=stop,
            on=outages.KAFKA,
        )
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
        if outages.current().kafka.down:
            self._notice_fetches(consumer, fetched)
        else:
            self._fetched_at = None
        for tp, records in fetched.items():
            key = (tp.topic, tp.partition)
            if key not in self._expected or key in self._guarded:
                continue  # revoked, or held by the guard, while the fetch was under way
            self._aligner.add((tp.topic, tp.partition), records)
            metrics.CONSUMED.labels(tp.topic).inc(len(records))
        room = self._settings.batch_max_events - len(self._builder)
        self._sliced = False
        if room > 0 and len(self._aligner):
            behind = [
                tp
                for tp in self._expected
                if tp not in self._guarded
                and not self._aligner.buffered(tp)
                and await _behind(consumer, tp, self._share)
            ]
            released = self._aligner.release(min(room, DECODE_SLICE), behind, now)
            self._sliced = len(released) == DECODE_SLICE
            for (topic, partition), record in released:
                decoded = self._decode(
                    entity=self._entities[topic],
                    topic=topic,
                    partition=partition,
                    offset=record.offset,
                    key=record.key,
                    value=record.value,
                    limits=self._limits,
                )
                if record.headers and isinstance(decoded, DeadLetter):
                    decoded = replace(decoded, headers=tuple(record.headers))
                self._builder.add(decoded, now)
        if self._inflight is not None and self._inflight.done():
            task, self._inflight = self._inflight, None
            task.result()  # a defect (not a transient failure) stops the service here
        if self._inflight is None and not self._rebalancing and self._expected:
            sweep = now >= self._pending_due
            if self._builder.due(now) or sweep:
                skipped = await self._skipped(consumer)
                if skipped is None:
                    return  # a rebalance or a seek came between: the next step decides
                batch = self._builder.take() if self._builder.due(now) else Batch()
                batch.sweep = sweep
                for tp, position in skipped.items() if not len(self._builder) else ():
                    # Only with every decoded record in this batch: then none lies before.
                    if position > batch.next_offsets.get(tp, 0):
                        batch.next_offsets[tp] = position
                self._start(batch)
        if self._guarded and now >= self._guard_due:
            self._guard_due = now + GUARD_POLL_S
            await self._release_resumed(consumer)
        await asyncio.sleep(0)  # let the batch in flight take its turn

    def _notice_fetches(self, consumer: AIOKafkaConsumer, fetched: dict[Any, Any]) -> None:
        """End a Kafka outage once the broker answers a fetch again (an answer without
        records, too, moves a partition's poll time)."""
        polled = [
            consumer.last_poll_timestamp(TopicPartition(*tp)) or 0
            for tp in self._expected
            if TopicPartition(*tp) in consumer.assignment()
        ]
        latest = max(polled, default=0)
        if self._fetched_at is not None and (fetched or latest > self._fetched_at):
            outages.current().kafka.recovered()
        self._fetched_at = latest

    async def _skipped(self, consumer: AIOKafkaConsumer) -> dict[TP, int] | None:
        """The consumer's position of each owned partition whose fetched records are all
        decoded, where it is past the stored one: only a position shows what read_committed
        skipped without returning it (transaction markers, an aborted transaction's
        records), so a log that ends with a marker is stored as read to its end. None when
        a rebalance or a seek happened while the positions were read."""
        epoch = self._epoch
        skipped = {}
        for tp, stored in list(self._expected.items()):
            if stored is None or tp in self._guarded or self._aligner.buffered(tp):
                # Nothing stored yet: the position may wait on the broker to be known
                # (never worth holding the loop for). Held by the guard: what it fetched
                # was dropped, to be read again. Records still to decode: the batch's
                # own offsets say how far it goes.
                continue
            try:
                position = await consumer.position(TopicPartition(*tp))
            except IllegalStateError:  # revoked meanwhile
                continue
            if position > stored:
                skipped[tp] = position
        return skipped if epoch == self._epoch else None

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
            if tp in self._guarded:
                continue  # paused until an operator resumes it, whatever its buffer
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
                "write batch",
                lambda: self._writer.write(batch, expected),
                self._backoff,
                on=outages.POSTGRESQL,
            )
        except Fenced as fenced:
            log.warning(
                "positions moved under this consumer; re-reading them",
                extra={"reason": str(fenced)},
            )
            await self._reseek(list(self._expected))
            return
        seconds = self._clock() - started
        metrics.WRITE_SECONDS.observe(seconds)
        metrics.BATCH_SIZE.observe(len(batch))
        self._record(batch, result)
        if len(batch) and log.isEnabledFor(logging.DEBUG):
            log.debug("batch written", extra=_batch_context(batch, result, seconds))
        for tp, next_offset in result.next_offsets.items():
            if tp in self._expected:
                self._expected[tp] = next_offset
        if result.resumed:  # a bounded replay ended: back to where the partition was
            log.info("replay ended; resuming %s", ", ".join(
                f"{t}[{p}] at {n}" for (t, p), n in sorted(result.resumed.items())))  # fmt: skip
            self._seek({tp: n for tp, n in result.resumed.items() if tp in self._expected})
        for trip in result.tripped:
            metrics.GUARD_TRIPS.labels(trip.topic).inc()
            log.error("%s", trip.describe())
            self._hold(trip)
        self._mirror(result.next_offsets)

    def _hold(self, trip: Trip) -> None:
        """Stop reading `trip`'s partition: what was fetched or built for it beyond its
        stored position is dropped, and read again once it is resumed."""
        tp = (trip.topic, trip.partition)
        if tp not in self._expected or self._consumer is None:
            return
        self._guarded[tp] = trip
        self._consumer.pause(TopicPartition(*tp))
        self._paused.discard(tp)
        self._builder.drop({tp})
        self._aligner.drop([tp])
        self._epoch += 1  # a position read meanwhile may cover what was just dropped
        metrics.GUARDED.labels(tp[0], str(tp[1])).set(1)

    async def _release_resumed(self, consumer: AIOKafkaConsumer) -> None:
        """Resume the held partitions that an operator has resumed, from their stored
        positions (which a replay may have moved meanwhile)."""
        try:
            still = await self._writer.paused(list(self._guarded))
        except Exception as error:
            if not is_transient(error):
                raise
            log.info("guard state not read (will try again): %s", describe(error))
            return
        resumed = [tp for tp in self._guarded if tp not in still]
        if not resumed:
            return
        await self._reseek(resumed)
        resumed = [tp for tp in resumed if self._guarded.pop(tp, None) is not None]
        for tp in resumed:
            with contextlib.suppress(KeyError):
                metrics.GUARDED.remove(tp[0], str(tp[1]))
            log.info("%s[%d] resumed from offset %s", tp[0], tp[1], self._expected.get(tp))
        consumer.resume(*(TopicPartition(*tp) for tp in resumed))

    def _record(self, batch: Batch, result: WriteResult) -> None:
        for entity, count in result.applied.items():
            metrics.APPLIED.labels(entity).inc(count)
        for entity, count in result.stale.items():
            metrics.STALE.labels(entity).inc(count)
        metrics.WAITED.inc(result.waiting)
        for dead in batch.dead:
            metrics.DEAD_LETTERED.labels(dead.source.topic, dead.kind).inc()
            log.warning(
                "dead-lettered",
                extra={
                    "topic": dead.source.topic, "partition": dead.source.partition,
                    "offset": dead.source.offset, "kind": dead.kind, "reason": dead.reason,
                },
            )  # fmt: skip
        for skipped in batch.skipped:
            metrics.SKIPPED.labels(skipped.source.topic, skipped.kind).inc()

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
                if outages.is_connection_failure(error):
                    outages.current().kafka.failed(describe(error), doing="committing offsets")
                else:
                    log.info("Kafka offset commit skipped (positions are safe in PostgreSQL)",
                             extra={"cause": describe(error)})  # fmt: skip
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
        self._epoch += 1
        await self._flush()
        for tp in revoked:
            self._expected.pop(tp, None)
            with contextlib.suppress(KeyError):
                metrics.LAG.remove(tp[0], str(tp[1]))
            if self._guarded.pop(tp, None) is not None:
                with contextlib.suppress(KeyError):
                    metrics.GUARDED.remove(tp[0], str(tp[1]))
        self._builder.drop(revoked)
        self._aligner.drop(revoked)
        self._paused.difference_update(revoked)

    async def on_assigned(self, assigned: set[TP]) -> None:
        for tp in assigned:
            self._expected.setdefault(tp, None)
        await self._reseek(list(assigned))
        held = await retrying(
            "read guards",
            lambda: self._writer.paused(list(assigned)),
            self._backoff,
            on=outages.POSTGRESQL,
        )
        for trip in held.values():
            log.warning("still held: %s", trip.describe())
            self._hold(trip)
        self._pending_due = self._clock()  # sweep now: changes may have waited from before
        self._rebalancing = False
        outages.current().kafka.recovered()  # the group coordinator answered
        log.info(
            "assigned %d partitions", len(assigned),
            extra={"partitions": [f"{t}[{p}]" for t, p in sorted(assigned)]},
        )  # fmt: skip

    async def _reseek(self, partitions: list[TP]) -> None:
        """Seek `partitions` to their stored positions (the beginning where none is stored)
        and forget what was buffered for them."""
        consumer = self._consumer
        assert consumer is not None
        self._epoch += 1
        positions = await retrying(
            "read positions",
            lambda: self._writer.positions(partitions),
            self._backoff,
            on=outages.POSTGRESQL,
        )
        fresh = self._seek({tp: positions.get(tp) for tp in partitions})
        if fresh:
            await consumer.seek_to_beginning(*fresh)
            self._epoch += 1

    def _seek(self, positions: dict[TP, int | None]) -> list[TopicPartition]:
        """Forget what is buffered for these partitions and seek each to its position;
        returns those without one (the caller seeks them to the beginning)."""
        consumer = self._consumer
        assert consumer is not None
        self._builder.drop(set(positions))
        self._aligner.drop(list(positions))
        fresh = []
        for tp, position in positions.items():
            self._expected[tp] = position
            if position is None:
                fresh.append(TopicPartition(*tp))
            else:
                consumer.seek(TopicPartition(*tp), position)
        self._epoch += 1  # and after: a position read while the seeks were under way
        return fresh

    async def _shutdown(self, consumer: AIOKafkaConsumer) -> None:
        """Finish or roll back the batch in flight, write what is buffered, leave the group."""
        try:
            await asyncio.wait_for(self._flush(), timeout=self._grace)
        except TimeoutError:
            log.warning("batch not written within the grace period of stop; rolled back, "
                        "will be re-read", extra={"grace_s": self._grace})  # fmt: skip
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


def _batch_context(batch: Batch, result: WriteResult, seconds: float) -> dict[str, Any]:
    """A written batch's fields in the log: each partition's offset range and the counts."""
    first: dict[TP, int] = {}
    for source in [c.source for c in batch.changes] + [d.source for d in batch.dead]:
        tp = (source.topic, source.partition)
        first[tp] = min(first.get(tp, source.offset), source.offset)
    return {
        "partitions": [
            OffsetRange(t, p, first.get((t, p), n - 1), n - 1)
            for (t, p), n in sorted(batch.next_offsets.items())
        ],
        "records": len(batch),
        "applied": sum(result.applied.values()),
        "stale": sum(result.stale.values()),
        "waiting": result.waiting,
        "resolved": result.resolved,
        "dead_letters": len(batch.dead),
        "outbox": result.outbox,
        "write_ms": round(seconds * 1000, 1),
    }


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
