"""The benchmark's workload: one seeded history of change events, produced once to Kafka and
read by every contender, with the final state and outbox rows that history implies.

Invariant: every contender gets exactly these bytes, and every check compares against
the generator's own `ExpectedState` of exactly these events.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaProducer

from sync_service.events.change import Change, Entity
from sync_service.events.outbound import downstream_event_id, event_type, outbound_value
from sync_service.ops.traffic import Event, ExpectedState, Traffic, canonical_row, checksum_of
from sync_service.pipeline.decode import Limits, decode
from sync_service.pipeline.plan import COLUMNS

PARTITIONS = 12
BAD_RATE = 0.001
"""About one message in a thousand must be dead-lettered, as in the demo."""
_LIMITS = Limits(max_bytes=1 << 20, max_depth=8, dead_letter_value_bytes=0, dead_letter_key_bytes=0)


@dataclass(frozen=True, slots=True)
class Topics:
    """The two inbound topics of one run."""

    users: str
    orders: str

    def of(self, entity: Entity) -> str:
        return self.users if entity == "user" else self.orders

    def entity(self, topic: str) -> Entity:
        return "user" if topic == self.users else "order"


@dataclass(frozen=True)
class Workload:
    """A generated history, in delivery order, and what it must leave behind."""

    seed: int
    partitions: int
    events: list[Event]
    expected: ExpectedState
    generate_seconds: float

    @classmethod
    def generate(
        cls, count: int, *, seed: int, partitions: int = PARTITIONS, id_base: int = 0
    ) -> Workload:
        started = time.perf_counter()
        traffic = Traffic(seed, id_base=id_base, bad_rate=BAD_RATE, partitions=partitions)
        # orjson's bytes keep a buffer several times their length: copied to their exact
        # size, a million events take about 0.7 GB here instead of 4 GB.
        events = [replace(e, value=bytes(memoryview(e.value))) for e in traffic.events(count)]
        expected = traffic.expected()
        return cls(seed, partitions, events, expected, time.perf_counter() - started)

    def good_values(self) -> list[bytes]:
        """The values of every event that is not meant to be dead-lettered."""
        return [event.value for event in self.events if not event.bad]

    def summary(self) -> dict[str, Any]:
        x = self.expected
        return {
            "seed": self.seed,
            "partitions": self.partitions,
            "events": x.events,
            "changes": x.changes,
            "duplicates": x.duplicates,
            "late": x.late,
            "dead_letters": x.dead_letters,
            "users": len(x.users),
            "orders": len(x.orders),
            "value_bytes_mean": round(sum(len(e.value) for e in self.events) / len(self.events)),
            "generate_seconds": round(self.generate_seconds, 2),
        }


class Produced(Protocol):
    """What is produced to an inbound topic: an `Event`, or a record of another input
    format (`bench.service.formats`), which may have no value (a tombstone)."""

    @property
    def entity(self) -> Entity: ...
    @property
    def partition(self) -> int: ...
    @property
    def key(self) -> bytes: ...
    @property
    def value(self) -> bytes | None: ...


async def produce_backlog(bootstrap: str, topics: Topics, events: Sequence[Produced]) -> float:
    """Produce `events` to their partitions as fast as the broker takes them (whole
    record batches per partition, acks=1: a backlog to drain, not a source to imitate);
    returns the seconds it took."""
    started = time.perf_counter()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=50, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        open_batches: dict[tuple[str, int], Any] = {}
        sent: list[Any] = []
        for event in events:
            where = (topics.of(event.entity), event.partition)
            batch = open_batches.get(where)
            if batch is None:
                batch = open_batches[where] = producer.create_batch()
            if batch.append(key=event.key, value=event.value, timestamp=None) is None:
                sent.append(await producer.send_batch(batch, where[0], partition=where[1]))
                batch = open_batches[where] = producer.create_batch()
                batch.append(key=event.key, value=event.value, timestamp=None)
        for (topic, partition), batch in open_batches.items():
            sent.append(await producer.send_batch(batch, topic, partition=partition))
        for future in sent:
            await future
    finally:
        await producer.stop()
    return time.perf_counter() - started


# --- the final rows and outbox rows, for the machine's limit ---------------------------

Record = tuple[Any, ...]


@dataclass(frozen=True)
class FinalState:
    """What a correct pipeline leaves after the workload, as typed records: the rows in
    the tables' column order, and one outbox row per distinct source change."""

    users: list[Record]
    orders: list[Record]
    outbox: list[Record]


def final_state(workload: Workload, topics: Topics) -> FinalState:
    """Decode the history as the service does and apply each entity's changes in version
    order (a delete keeps the last row and sets `deleted_at`), with the outbox row of
    each change; checked against the generator's expected checksum before it is used."""
    latest: dict[Entity, dict[int, dict[str, Any]]] = {"user": {}, "order": {}}
    seen: set[tuple[Entity, int, int]] = set()
    outbox: list[Record] = []
    for change in _changes(workload.events, topics):
        key = (change.entity, change.id, change.version)
        if key in seen:
            continue  # a duplicate delivery of a change already counted
        seen.add(key)
        before = latest[change.entity].get(change.id)
        row = _row_after(change, before)
        if before is None or before["version"] < change.version:
            latest[change.entity][change.id] = row
        event_id = downstream_event_id(change.event_id)
        payload = orjson.dumps(outbound_value(change, row, event_id), default=str).decode()
        outbox.append(
            (change.entity, str(change.id), event_type(change), event_id, change.version, payload)
        )
    users = [_record("user", row) for _, row in sorted(latest["user"].items())]
    orders = [_record("order", row) for _, row in sorted(latest["order"].items())]
    got = checksum_of(
        (canonical_row("user", r) for _, r in sorted(latest["user"].items())),
        (canonical_row("order", r) for _, r in sorted(latest["order"].items())),
    )
    if got != workload.expected.checksum():
        raise RuntimeError("the final state rebuilt from the events differs from the expected")
    return FinalState(users, orders, outbox)


def _changes(events: Iterable[Event], topics: Topics) -> Iterable[Change]:
    """The valid changes, with the offsets the events get on fresh topics."""
    next_offset: dict[tuple[str, int], int] = {}
    for event in events:
        topic = topics.of(event.entity)
        offset = next_offset.get((topic, event.partition), 0)
        next_offset[(topic, event.partition)] = offset + 1
        decoded = decode(
            entity=event.entity,
            topic=topic,
            partition=event.partition,
            offset=offset,
            key=event.key,
            value=event.value,
            limits=_LIMITS,
        )
        if isinstance(decoded, Change):
            yield decoded


def _row_after(change: Change, before: dict[str, Any] | None) -> dict[str, Any]:
    """The row right after `change`. A late change's predecessor by version is its own
    upsert (the generator only holds back upserts), so `before` is right for deletes."""
    if change.row is not None:
        return {**change.row, "version": change.version, "deleted_at": None}
    base = before if before is not None else dict.fromkeys(COLUMNS[change.entity])
    return {**base, "id": change.id, "version": change.version, "deleted_at": change.occurred_at}


def _record(entity: Entity, row: dict[str, Any]) -> Record:
    return tuple(row[name] for name in COLUMNS[entity])


def event_ids(events: Iterable[Event]) -> list[str | None]:
    """Each event's inbound `event_id`; None for one meant to be dead-lettered."""
    return [None if event.bad else str(orjson.loads(event.value)["event_id"]) for event in events]
