"""The consumer's loop with a fake broker and a fake writer: batches by count, pauses
a partition once it buffers a batch's worth while one is written and the next is
built, and resumes after; decodes a backlog a slice per step; mirrors offsets to Kafka
without holding up the next batch; holds a partition the dead-letter guard tripped on
until it is resumed."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from sync_service.config import Settings
from sync_service.pipeline.batch import Batch
from sync_service.pipeline.consume import DECODE_SLICE, ChangeConsumer
from sync_service.pipeline.guard import Trip
from sync_service.pipeline.write import WriteResult
from tests.factories import encode, user_event


@dataclass
class Record:
    offset: int
    key: bytes
    value: bytes
    timestamp: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class FakeKafka:
    """Hands out `backlog` records of one partition, `max_records` at a time."""

    backlog: list[Record]
    paused: set[TopicPartition] = field(default_factory=set)
    tp: TopicPartition = field(default_factory=lambda: TopicPartition("users", 0))

    def __post_init__(self) -> None:
        self.end = len(self.backlog)

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Record]]:
        await asyncio.sleep(0)
        if self.tp in self.paused or not self.backlog:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        taken, self.backlog = self.backlog[:max_records], self.backlog[max_records:]
        return {self.tp: taken}

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused.difference_update(partitions)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        pass

    async def stop(self) -> None:
        pass

    def highwater(self, tp: TopicPartition) -> int:
        return self.end

    def last_stable_offset(self, tp: TopicPartition) -> int:
        return self.end

    async def position(self, tp: TopicPartition) -> int:
        return self.end - len(self.backlog)


@dataclass
class HeldWriter:
    """Holds every write until `release` is set, so a test decides when a batch commits."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    batches: list[int] = field(default_factory=list)

    async def write(
        self, batch: Batch, expected: Mapping[tuple[str, int], int | None]
    ) -> WriteResult:
        await self.release.wait()
        self.batches.append(len(batch))
        return WriteResult(next_offsets=dict(batch.next_offsets))


async def test_a_partition_pauses_once_it_buffers_a_batch_while_one_is_written() -> None:
    settings = Settings(
        users_topic="users", batch_max_events=10, poll_max_records=10, batch_max_wait_ms=5
    )
    kafka = FakeKafka([Record(i, b"1", encode(user_event(1, i))) for i in range(35)])
    writer = HeldWriter()
    consumer = ChangeConsumer(settings, writer)  # type: ignore[arg-type]
    consumer._consumer = kafka
    consumer._expected[("users", 0)] = None  # as after an assignment with nothing stored
    consumer._pending_due = float("inf")  # no sweeps of waiting changes here

    # 1: ten records, a full batch, handed to the writer (held); 2: the next ten fill the
    # builder; 3: ten more are buffered; 4: a batch's worth buffered, so it pauses.
    for _ in range(4):
        await consumer._step(kafka)
    assert kafka.paused == {kafka.tp}
    assert len(kafka.backlog) == 5
    assert writer.batches == []

    writer.release.set()
    for _ in range(50):
        await consumer._step(kafka)
        if consumer._expected[("users", 0)] == 35:
            break
    assert writer.batches == [10, 10, 10, 5]
    assert consumer._expected[("users", 0)] == 35  # the next offset after the last record
    assert not kafka.paused


async def test_a_backlog_is_decoded_a_slice_per_step_without_waiting_between() -> None:
    # A wait long enough that the batch never comes due by age meanwhile, however slowly
    # a loaded machine decodes the first slice (the decoder's first use included).
    settings = Settings(
        users_topic="users", batch_max_events=1000, poll_max_records=1000, batch_max_wait_ms=1_000
    )
    kafka = FakeKafka([Record(i, b"1", encode(user_event(1, i))) for i in range(DECODE_SLICE + 1)])
    waits: list[int] = []
    getmany = kafka.getmany

    async def recording_getmany(*, timeout_ms: int, max_records: int) -> dict[Any, list[Record]]:
        waits.append(timeout_ms)
        return await getmany(timeout_ms=timeout_ms, max_records=max_records)

    kafka.getmany = recording_getmany  # type: ignore[method-assign]
    consumer = ChangeConsumer(settings, HeldWriter())  # type: ignore[arg-type]
    consumer._consumer = kafka
    consumer._expected[("users", 0)] = None
    consumer._pending_due = float("inf")

    await consumer._step(kafka)  # the batch in flight gets the loop after each slice
    assert len(consumer._builder) == DECODE_SLICE
    await consumer._step(kafka)  # more was at hand: no fetch wait before decoding it
    assert len(consumer._builder) == DECODE_SLICE + 1
    await consumer._step(kafka)  # all decoded: a fetch may wait again
    assert waits == [1_000, 0, 1_000]


async def test_a_slow_kafka_offset_commit_never_holds_up_the_next_batch() -> None:
    settings = Settings(
        users_topic="users", batch_max_events=10, poll_max_records=10, batch_max_wait_ms=5
    )
    kafka = FakeKafka([Record(i, b"1", encode(user_event(1, i))) for i in range(30)])
    answer = asyncio.Event()
    commits: list[int] = []

    async def slow_commit(offsets: Mapping[TopicPartition, int]) -> None:
        await answer.wait()  # the broker does not answer until told to
        commits.append(offsets[kafka.tp])

    kafka.commit = slow_commit  # type: ignore[method-assign]
    writer = HeldWriter()
    writer.release.set()
    consumer = ChangeConsumer(settings, writer)  # type: ignore[arg-type]
    consumer._consumer = kafka
    consumer._expected[("users", 0)] = None
    consumer._pending_due = float("inf")

    for _ in range(50):
        await consumer._step(kafka)
        if consumer._expected[("users", 0)] == 30:
            break
    assert writer.batches == [10, 10, 10]  # all written while the first commit hangs
    assert commits == []

    answer.set()
    assert consumer._mirroring is not None
    await consumer._mirroring
    assert commits == [10, 30]  # the first, then the latest of what was stored meanwhile


async def test_stop_waits_at_most_the_grace_period_for_a_broker_that_never_answers() -> None:
    settings = Settings(users_topic="users", batch_max_events=10, batch_max_wait_ms=5)
    kafka = FakeKafka([Record(i, b"1", encode(user_event(1, i))) for i in range(10)])
    never = asyncio.Event()

    async def hanging_commit(offsets: Mapping[TopicPartition, int]) -> None:
        await never.wait()

    kafka.commit = hanging_commit  # type: ignore[method-assign]
    writer = HeldWriter()
    writer.release.set()
    consumer = ChangeConsumer(settings, writer, stop_grace_s=0.05)  # type: ignore[arg-type]
    consumer._consumer = kafka
    consumer._expected[("users", 0)] = None
    consumer._pending_due = float("inf")
    for _ in range(20):
        await consumer._step(kafka)
        if writer.batches:
            break
    assert writer.batches == [10]

    await asyncio.wait_for(consumer._shutdown(kafka), timeout=2)
    assert consumer._mirroring is not None
    assert consumer._mirroring.cancelled()


async def test_positions_move_past_what_read_committed_skips_never_past_a_pending_record() -> None:
    settings = Settings(
        users_topic="users", batch_max_events=100, batch_max_wait_ms=5, pending_retry_ms=200
    )
    kafka = FakeKafka([Record(i, b"1", encode(user_event(1, i + 1))) for i in range(3)])
    kafka.end = 6  # offsets 3 to 5: aborted records and markers, which are never returned
    stored: list[dict[tuple[str, int], int]] = []

    class Writer:
        async def write(
            self, batch: Batch, expected: Mapping[tuple[str, int], int | None]
        ) -> WriteResult:
            stored.append(dict(batch.next_offsets))
            return WriteResult(next_offsets=dict(batch.next_offsets))

    now = [0.0]
    consumer = ChangeConsumer(settings, Writer(), clock=lambda: now[0])  # type: ignore[arg-type]
    consumer._consumer = kafka
    consumer._expected[("users", 0)] = None
    consumer._pending_due = 0.0  # a sweep of waiting changes is due at once

    # The three records are decoded but their batch is not due: the sweep goes alone, and
    # must not store the position past them (a crash then would lose them).
    await consumer._step(kafka)
    await consumer._settle()
    assert stored == [{}]
    now[0] = 1.0  # the batch is due
    await consumer._step(kafka)
    await consumer._settle()
    assert stored == [{}, {("users", 0): 3}]
    now[0] = 2.0  # the next sweep stores the position past the skipped offsets
    await consumer._step(kafka)
    await consumer._settle()
    assert stored == [{}, {("users", 0): 3}, {("users", 0): 6}]
    assert consumer._expected[("users", 0)] == 6
    now[0] = 3.0  # once there, a sweep stores no position
    await consumer._step(kafka)
    await consumer._settle()
    assert stored[3:] == [{}]


async def test_a_batch_that_ends_a_bounded_replay_makes_the_consumer_seek_and_forget() -> None:
    """What was fetched and built after the end of the range is dropped, not written: the
    partition goes on from the offset the writer stored."""
    settings = Settings(
        users_topic="users", batch_max_events=10, poll_max_records=10, batch_max_wait_ms=5
    )
    kafka = FakeKafka([Record(i, b"1", encode(user_event(1, i))) for i in range(25)])
    seeks: list[int] = []

    def seek(tp: TopicPartition, offset: int) -> None:
        seeks.append(offset)
        kafka.backlog = []  # nothing after the resume offset in this fake

    kafka.seek = seek  # type: ignore[attr-defined]

    @dataclass
    class EndsTheReplay(HeldWriter):
        async def write(
            self, batch: Batch, expected: Mapping[tuple[str, int], int | None]
        ) -> WriteResult:
            await super().write(batch, expected)
            return WriteResult(next_offsets={("users", 0): 100}, resumed={("users", 0): 100})

    writer = EndsTheReplay()
    consumer = ChangeConsumer(settings, writer)  # type: ignore[arg-type]
    consumer._consumer = kafka
    consumer._expected[("users", 0)] = 0
    consumer._pending_due = float("inf")
    for _ in range(3):  # one batch handed to the (held) writer, the next one built
        await consumer._step(kafka)
    assert len(consumer._builder) == 10
    writer.release.set()
    for _ in range(20):
        await consumer._step(kafka)
    assert writer.batches == [10]
    assert seeks == [100]
    assert consumer._expected[("users", 0)] == 100
    assert len(consumer._builder) == 0


@dataclass
class SeekableKafka(FakeKafka):
    """A partition that can be read again from any offset."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.records = list(self.backlog)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.backlog = self.records[offset:]


@dataclass
class GuardingWriter:
    """Stores positions, and trips the guard on the first batch with dead letters; an
    operator's resume is `held = False`."""

    held: bool = False
    stored: dict[tuple[str, int], int] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)

    async def write(
        self, batch: Batch, expected: Mapping[tuple[str, int], int | None]
    ) -> WriteResult:
        self.batches.append(len(batch))
        self.stored.update(batch.next_offsets)
        result = WriteResult(next_offsets=dict(batch.next_offsets))
        if batch.dead and not self.held and len(self.batches) == 1:
            self.held = True
            result.tripped = [Trip("users", 0, len(batch.dead), 10, "not_json", "not JSON")]
        return result

    async def paused(self, partitions: Collection[tuple[str, int]]) -> dict[Any, Trip]:
        trip = Trip("users", 0, 10, 10, "not_json", "not JSON")
        return {("users", 0): trip} if self.held and ("users", 0) in partitions else {}

    async def positions(self, partitions: Collection[tuple[str, int]]) -> dict[Any, int]:
        return {tp: self.stored[tp] for tp in partitions if tp in self.stored}


async def test_a_tripped_partition_stops_until_resumed_then_reads_on_from_its_position() -> None:
    settings = Settings(
        users_topic="users", batch_max_events=10, poll_max_records=10, batch_max_wait_ms=5
    )
    garbage = [Record(i, b"1", b"{") for i in range(10)]
    kafka = SeekableKafka(
        [*garbage, *(Record(i, b"1", encode(user_event(1, i))) for i in range(10, 30))]
    )
    writer = GuardingWriter()
    consumer = ChangeConsumer(settings, writer)  # type: ignore[arg-type]
    consumer._consumer = kafka
    consumer._expected[("users", 0)] = None
    consumer._pending_due = float("inf")

    for _ in range(30):
        await consumer._step(kafka)
    assert writer.batches == [10]  # the garbage; nothing after it
    assert dict(consumer.guarded) == {
        ("users", 0): Trip("users", 0, 10, 10, "not_json", "not JSON")
    }
    assert kafka.paused == {kafka.tp}
    assert len(consumer._builder) == 0
    assert consumer._expected[("users", 0)] == 10

    writer.held = False  # `sync-service dlq resume`
    consumer._guard_due = 0.0
    for _ in range(50):
        await consumer._step(kafka)
        if consumer._expected[("users", 0)] == 30:
            break
    assert not consumer.guarded
    assert not kafka.paused
    assert writer.batches == [10, 10, 10]  # every record after the pause, once
