"""The relay's pure parts: rows to messages, Kafka's partition of a key, the position and
how it is found again, the lock key, and the transaction discipline of `publish` (against
a fake producer)."""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as kafka_murmur2

from sync_service.events.change import DeadLetter, Source
from sync_service.events.dead_letter import DEAD_LETTER, outbox_payload
from sync_service.relay.lease import lock_key
from sync_service.relay.outbox import Message, OutboxRecord, position_of, to_messages
from sync_service.relay.partition import murmur2, partition_index
from sync_service.relay.position import (
    START,
    Position,
    decode_position,
    encode_position,
    latest,
)
from sync_service.relay.producer import publish, stop_producer

TOPICS = {"user": "out.users", "order": "out.orders"}
EVENT_ID = uuid.UUID("2b1f0c7e-8a55-4c1e-9d3e-6f1a2b3c4d5e")


def _row(aggregate_type: str = "order", row_id: int = 7, aggregate_id: str = "42") -> OutboxRecord:
    """A fetched row as PostgreSQL sends it: the published fields already UTF-8."""
    payload = {"event_id": str(EVENT_ID), "type": f"{aggregate_type}.upserted", "version": 3}
    return (
        1000,
        row_id,
        aggregate_type,
        aggregate_id.encode(),
        orjson.dumps(payload),
        f"{aggregate_type}.upserted".encode(),
        str(EVENT_ID).encode(),
    )


def test_rows_become_the_contract_messages_on_their_aggregates_topics_in_order() -> None:
    rows = [_row("user", 1, "7"), _row("order", 2, "42"), _row("user", 3, "8")]
    event_id = ("event_id", str(EVENT_ID).encode())
    assert to_messages(rows, TOPICS) == [
        ("out.users", b"7", rows[0][4], [("event_type", b"user.upserted"), event_id]),
        ("out.orders", b"42", rows[1][4], [("event_type", b"order.upserted"), event_id]),
        ("out.users", b"8", rows[2][4], [("event_type", b"user.upserted"), event_id]),
    ]
    assert to_messages([], TOPICS) == []


def test_a_row_of_an_unknown_aggregate_stops_the_relay_instead_of_being_skipped() -> None:
    rows = [_row("user", 1), _row("invoice", 2), _row("order", 3)]
    with pytest.raises(ValueError, match="outbox row 2: unknown aggregate_type 'invoice'"):
        to_messages(rows, TOPICS)


def test_a_dead_letter_row_goes_to_the_dlq_topic_as_its_original_record() -> None:
    letter = DeadLetter(Source("cdc.users", 2, 41), None, b"\x00\xff", 5, "oversized", "too big",
                        0, (("trace", b"t"),))  # fmt: skip
    dead = (1000, 2, DEAD_LETTER, b"cdc.users/2/41", outbox_payload(letter).encode(),
            DEAD_LETTER.encode(), b"e-1")  # fmt: skip
    rows = [_row("user", 1, "7"), dead, _row("order", 3, "42")]
    messages = to_messages(rows, TOPICS, "dlq")
    assert [m[0] for m in messages] == ["out.users", "dlq", "out.orders"]
    assert messages[0] == to_messages(rows[:1], TOPICS)[0]
    assert messages[1] == (
        "dlq", None, b"\x00\xff",
        [("trace", b"t"), ("dlq.topic", b"cdc.users"), ("dlq.partition", b"2"),
         ("dlq.offset", b"41"), ("dlq.kind", b"oversized"), ("dlq.reason", b"too big"),
         ("dlq.value_size", b"5"), ("event_type", b"dead_letter"), ("event_id", b"e-1")],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"row 2: .*'dead_letter' \(set SYNC_DLQ_TOPIC for the"):
        to_messages(rows, TOPICS)


def test_positions_order_by_transaction_id_first() -> None:
    assert Position(5, 1) > Position(4, 99) > Position(4, 98) > START
    assert position_of(_row(row_id=9)) == Position(1000, 9)


def test_murmur2_is_kafkas_for_keys_of_every_length() -> None:
    rng = random.Random(5)
    keys = [rng.randbytes(rng.randrange(0, 70)) for _ in range(5_000)]
    keys += [str(n).encode() for n in [*range(1_000), 2**31, 2**63 - 1]]
    keys += ["ünïcødé-42".encode(), b"\xff" * 13]
    assert [murmur2(k) for k in keys] == [kafka_murmur2(k) for k in keys]


def test_a_keys_partition_is_the_one_any_kafka_client_picks() -> None:
    partitioner = DefaultPartitioner()
    for count in (1, 3, 12, 100):
        every = list(range(count))
        for key in [str(n).encode() for n in range(2_000)]:
            assert partition_index(key, count) == partitioner(key, every, every)


def test_a_position_survives_its_encoding() -> None:
    position = Position(2**62, 123_456_789)
    assert decode_position(encode_position(position)) == position


@dataclass
class Record:
    offset: int
    key: bytes | None
    value: bytes | None


def test_the_latest_position_is_the_last_one_of_this_relay_before_the_end() -> None:
    mine, other = b"relay-a", b"relay-b"
    records = [
        Record(0, mine, encode_position(Position(10, 1))),
        Record(1, other, encode_position(Position(99, 9))),
        Record(3, mine, encode_position(Position(10, 5))),
        Record(4, mine, None),  # a tombstone is not a position
        Record(5, other, encode_position(Position(99, 10))),
        Record(7, mine, encode_position(Position(11, 6))),  # at the end offset: not yet read
    ]
    assert latest(records, mine, end=7) == Position(10, 5)
    assert latest(records, b"relay-c", end=7) is None


def test_lock_keys_are_stable_signed_64_bit_and_distinct() -> None:
    key = lock_key("sync-service-relay")
    assert key == lock_key("sync-service-relay")
    assert -(2**63) <= key < 2**63
    assert key != lock_key("sync-service-relay-2")


class FakeBatch:
    """Holds up to `room` records, as aiokafka's BatchBuilder holds up to its byte size."""

    def __init__(self, room: int) -> None:
        self.keys: list[bytes] = []
        self._room = room

    def append(
        self, *, key: bytes, value: bytes, timestamp: None, headers: list[tuple[str, bytes]]
    ) -> object | None:
        if len(self.keys) == self._room:
            return None
        self.keys.append(key)
        return object()


class FakeProducer:
    """Records the transactional calls; a batch fails if its topic is in `failing`."""

    def __init__(self, failing: frozenset[str] = frozenset(), room: int = 100) -> None:
        self.calls: list[Any] = []
        self._failing = failing
        self._room = room
        self.stoppable = asyncio.Event()
        self.stoppable.set()

    async def begin_transaction(self) -> None:
        self.calls.append("begin")

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self._room)

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        self.calls.append((topic, partition, batch.keys))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if topic in self._failing:
            future.set_exception(RuntimeError(f"{topic} failed"))
        else:
            future.set_result(None)
        return future

    async def commit_transaction(self) -> None:
        self.calls.append("commit")

    async def stop(self) -> None:
        await self.stoppable.wait()
        self.calls.append("stopped")


MESSAGES: list[Message] = [("a", b"1", b"{}", []), ("b", b"2", b"{}", []), ("pos", b"r", b"{}", [])]


def _partition(key: bytes) -> int:
    """Kafka's default rule for a keyed record: murmur2 of the key, modulo the count."""
    every = [0, 1, 2]
    return int(DefaultPartitioner()(key, every, every))


async def test_publish_sends_every_record_inside_one_transaction() -> None:
    producer = FakeProducer()
    await publish(producer, MESSAGES)
    assert producer.calls == [
        "begin",
        ("a", _partition(b"1"), [b"1"]),
        ("b", _partition(b"2"), [b"2"]),
        ("pos", _partition(b"r"), [b"r"]),
        "commit",
    ]


async def test_publish_keeps_the_order_of_each_partition_across_full_batches() -> None:
    producer = FakeProducer(room=2)
    keys = [str(i).encode() for i in range(20)]
    await publish(producer, [("a", k, b"{}", []) for k in keys])
    sent: dict[int, list[bytes]] = {}
    for _, partition, batch in producer.calls[1:-1]:
        assert len(batch) <= 2
        sent.setdefault(partition, []).extend(batch)
    assert sent == {
        p: [k for k in keys if _partition(k) == p] for p in {_partition(k) for k in keys}
    }
    assert producer.calls[-1] == "commit"


async def test_publish_never_commits_when_a_send_failed() -> None:
    producer = FakeProducer(failing=frozenset({"b"}))
    with pytest.raises(RuntimeError, match="b failed"):
        await publish(producer, MESSAGES)
    assert "commit" not in producer.calls


async def test_a_producer_that_cannot_stop_yet_finishes_in_the_background() -> None:
    stuck = FakeProducer()
    stuck.stoppable.clear()  # as when its batches wait for a broker that is down
    await asyncio.wait_for(stop_producer(stuck, grace_s=0.05), timeout=5)
    assert stuck.calls == []
    stuck.stoppable.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert stuck.calls == ["stopped"]
