"""Random source histories, valid at every step, and the ways Kafka may deliver them.

A delivery keeps each partition's order and nothing else: entities, partitions and topics
interleave freely, records are duplicated and replayed, and batches end anywhere.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import orjson
from hypothesis import strategies as st

from sync_service.events.change import Change, Entity
from sync_service.pipeline.decode import Limits, decode

TOPICS: dict[Entity, str] = {"user": "cdc.users", "order": "cdc.orders"}
ENTITIES: dict[str, Entity] = {topic: entity for entity, topic in TOPICS.items()}
# Few ids and emails, so that emails collide, move and are reused after a delete.
EMAILS = tuple(f"e{i}@example.com" for i in range(3))
USER_IDS = (1, 2, 3, 4, 5)
ORDER_IDS = (1, 2, 3, 4)
STATUSES = ("pending", "paid", "shipped", "cancelled", "refunded")
EPOCH = datetime(2026, 11, 24, 10, tzinfo=UTC)
# One draw per user's other columns: fewer draws make generation faster and shrinking easier.
_USER_VARIANTS = tuple(itertools.product(("Ada", "Grace"), (True, False), (None, "GB", "NL")))
LIMITS = Limits(
    max_bytes=1_048_576, max_depth=8, dead_letter_value_bytes=65_536, dead_letter_key_bytes=1024
)

Row = dict[str, Any]
TopicPartition = tuple[str, int]
VersionKey = tuple[Entity, int, int]
Draw = st.DrawFn
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SourceChange:
    """One change in the source, and the row the target must hold right after it."""

    entity: Entity
    envelope: dict[str, Any]
    after: Row

    @property
    def id(self) -> int:
        return int(self.envelope["data"]["id"])

    @property
    def version(self) -> int:
        return int(self.envelope["version"])

    @property
    def key(self) -> VersionKey:
        return (self.entity, self.id, self.version)

    @property
    def event_id(self) -> uuid.UUID:
        return uuid.UUID(self.envelope["event_id"])


@dataclass(frozen=True, slots=True)
class History:
    """Changes in source order."""

    changes: tuple[SourceChange, ...]

    @property
    def final(self) -> dict[Entity, dict[int, Row]]:
        """Each entity at its highest version: what the target's tables must end as."""
        tables: dict[Entity, dict[int, Row]] = {"user": {}, "order": {}}
        for change in self.changes:
            tables[change.entity][change.id] = change.after
        return tables

    @property
    def by_version(self) -> dict[VersionKey, SourceChange]:
        return {change.key: change for change in self.changes}


class _Source:
    """The source of truth: it only ever makes changes its own rules allow."""

    def __init__(self) -> None:
        self.rows: dict[Entity, dict[int, Row]] = {"user": {}, "order": {}}
        self.changes: list[SourceChange] = []

    @property
    def now(self) -> datetime:
        return EPOCH + timedelta(seconds=len(self.changes))

    def live(self, entity: Entity) -> list[int]:
        return sorted(i for i, row in self.rows[entity].items() if row["deleted_at"] is None)

    def free_emails(self) -> list[str]:
        held = {self.rows["user"][i]["email"] for i in self.live("user")}
        return [email for email in EMAILS if email not in held]

    def moves(self) -> list[Callable[[Draw], None]]:
        users, orders = self.live("user"), self.live("order")
        moves: list[Callable[[Draw], None]] = []
        if self.free_emails() and any(i not in users for i in USER_IDS):
            moves.append(self.create_user)
        if users:
            moves += [self.update_user, self.delete_user]
        if users and any(i not in self.rows["order"] for i in ORDER_IDS):
            moves.append(self.create_order)
        if orders:
            moves += [self.update_order, self.delete_order]
        return moves

    def create_user(self, draw: Draw) -> None:
        """A new user, or a deleted one revived, with an email no live user holds."""
        user_id = _pick(draw, [i for i in USER_IDS if i not in self.live("user")])
        self._put_user(user_id, _pick(draw, self.free_emails()), draw, self.now)

    def update_user(self, draw: Draw) -> None:
        """A user keeps its email or moves to a free one."""
        user_id = _pick(draw, self.live("user"))
        current = self.rows["user"][user_id]
        email = _pick(draw, [current["email"], *self.free_emails()])
        self._put_user(user_id, email, draw, current["created_at"])

    def _put_user(self, user_id: int, email: str, draw: Draw, created_at: datetime) -> None:
        name, active, country = _pick(draw, _USER_VARIANTS)
        row = {
            "id": user_id,
            "email": email,
            "name": name,
            "active": active,
            "country": country,
            "created_at": created_at,
            "updated_at": self.now,
        }
        self._record("user", "upsert", row)

    def create_order(self, draw: Draw) -> None:
        """An order, only ever for a user that is live in the source at that moment."""
        order_id = _pick(draw, [i for i in ORDER_IDS if i not in self.rows["order"]])
        user_id = _pick(draw, self.live("user"))
        self._put_order(order_id, user_id, draw, self.now)

    def update_order(self, draw: Draw) -> None:
        """A new status or total, whatever became of the user (its row stays, deleted)."""
        order_id = _pick(draw, self.live("order"))
        current = self.rows["order"][order_id]
        self._put_order(order_id, current["user_id"], draw, current["created_at"])

    def _put_order(self, order_id: int, user_id: int, draw: Draw, created_at: datetime) -> None:
        row = {
            "id": order_id,
            "user_id": user_id,
            "total": Decimal(draw(st.integers(0, 10**6))).scaleb(-2),
            "currency": "EUR",
            "status": _pick(draw, STATUSES),
            "created_at": created_at,
            "updated_at": self.now,
        }
        self._record("order", "upsert", row)

    def delete_user(self, draw: Draw) -> None:
        self._delete("user", _pick(draw, self.live("user")))

    def delete_order(self, draw: Draw) -> None:
        self._delete("order", _pick(draw, self.live("order")))

    def _delete(self, entity: Entity, entity_id: int) -> None:
        # The target keeps the last known columns of a deleted row.
        self._record(entity, "delete", {**self.rows[entity][entity_id], "deleted_at": self.now})

    def _record(self, entity: Entity, op: str, row: Row) -> None:
        # One sequence for the whole source, like an LSN: strictly increasing per entity,
        # with gaps; the first change has version 0.
        version = len(self.changes)
        data = {"id": row["id"]} if op == "delete" else _as_json(row)
        after = {"deleted_at": None, **row, "version": version}
        envelope = {
            "event_id": str(uuid.UUID(int=(1 << 96) + version)),
            "entity": entity,
            "op": op,
            "version": version,
            "occurred_at": self.now.isoformat(),
            "data": data,
        }
        self.changes.append(SourceChange(entity, envelope, after))
        self.rows[entity][row["id"]] = after


def _as_json(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(orjson.dumps(row, default=str))
    return out


_MORE = st.integers(0, 15).map(bool)  # one more change? 15 times in 16


@st.composite
def histories(draw: Draw, max_changes: int = 24) -> History:
    """A history that is valid in the source at every step."""
    source = _Source()
    # "One more?" before each change, rather than a length drawn first: Hypothesis then
    # shrinks a failing history by deleting changes from anywhere in it.
    while not source.changes or (len(source.changes) < max_changes and draw(_MORE)):
        move = _pick(draw, source.moves())
        move(draw)
    return History(tuple(source.changes))


def _pick(draw: Draw, choices: Sequence[T]) -> T:
    """`st.sampled_from`, minus building and validating a new strategy on every draw
    (`st.integers` is cached by its bounds), which made generation the slow part."""
    return choices[draw(st.integers(0, len(choices) - 1))]


@dataclass(frozen=True, slots=True)
class Record:
    """A change as a Kafka record: where it sits, and its key and value."""

    topic: str
    partition: int
    offset: int
    change: SourceChange

    @property
    def key(self) -> bytes:
        return str(self.change.id).encode()

    @property
    def value(self) -> bytes:
        return orjson.dumps(self.change.envelope)

    def decoded(self) -> Change:
        """The change as the consumer decodes it (a generated record is always valid)."""
        result = decode(
            entity=ENTITIES[self.topic],
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            key=self.key,
            value=self.value,
            limits=LIMITS,
        )
        assert isinstance(result, Change), result
        return result


@dataclass(frozen=True, slots=True)
class Delivery:
    """One batch as the consumer hands it to the writer; a sweep also retries the waiting
    changes of every owned partition (the consumer sweeps now and then, even with no
    records, and always once everything has been read)."""

    records: tuple[Record, ...]
    sweep: bool


@dataclass(frozen=True, slots=True)
class Scenario:
    """A history, its partition logs (offset = index), and the batches one consumer that
    owns every partition reads them in."""

    history: History
    logs: dict[TopicPartition, tuple[Record, ...]]
    batches: tuple[Delivery, ...]

    def __repr__(self) -> str:
        # Short enough to read a shrunk failure: one line per change and per batch.
        lines = ["history:", *(f"  {_describe(c)}" for c in self.history.changes), "batches:"]
        for batch in self.batches:
            read = (
                f"{r.topic}[{r.partition}]@{r.offset}:v{r.change.version}" for r in batch.records
            )
            lines.append(f"  [{', '.join(read)}]{' + sweep' if batch.sweep else ''}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # Hypothesis prints a failing example with this


def _describe(change: SourceChange) -> str:
    data = change.envelope["data"]
    what = f"v{change.version} {change.entity} {change.id} {change.envelope['op']}"
    if change.envelope["op"] == "delete":
        return what
    if change.entity == "user":
        return f"{what} {data['email']}"
    return f"{what} user={data['user_id']} {data['status']}"


READ, FLUSH, REPLAY, SWEEP = 0, 1, 2, 3
_MAX_REPLAYS = 3
_MAX_BATCHES = 60


@st.composite
def scenarios(draw: Draw, max_changes: int = 24) -> Scenario:
    """A valid history delivered in any way Kafka may deliver it."""
    history = draw(histories(max_changes))
    partitions = _pick(draw, (2, 3, 1))  # one partition keeps the source order: the dull case
    logs: dict[TopicPartition, list[SourceChange]] = {}
    for change in history.changes:
        # All changes of one entity are on one partition, in source order.
        logs.setdefault((TOPICS[change.entity], change.id % partitions), []).append(change)
    for _ in range(draw(st.integers(0, 3))):
        # A producer's retry writes a copy of a change again, anywhere later in its partition.
        log = logs[_pick(draw, sorted(logs))]
        first = draw(st.integers(0, len(log) - 1))
        log.insert(draw(st.integers(first + 1, len(log))), log[first])
    records = {
        tp: tuple(Record(tp[0], tp[1], offset, change) for offset, change in enumerate(log))
        for tp, log in logs.items()
    }
    return Scenario(history, records, _schedule(draw, records))


def _schedule(draw: Draw, logs: dict[TopicPartition, tuple[Record, ...]]) -> tuple[Delivery, ...]:
    """Read the partitions in any interleaving; end batches anywhere; now and then rewind
    a partition to an earlier offset (a replay) or sweep the waiting changes."""
    position = dict.fromkeys(logs, 0)
    batches: list[Delivery] = []
    current: list[Record] = []
    replays = 0

    def flush(sweep: bool = False) -> None:
        if current or sweep:
            batches.append(Delivery(tuple(current), sweep))
            current.clear()

    while unread := sorted(tp for tp, log in logs.items() if position[tp] < len(log)):
        # Weighted towards reading (-3..0), so that a history is delivered in few steps.
        action = max(draw(st.integers(-3, SWEEP)), READ) if len(batches) < _MAX_BATCHES else READ
        if action == READ:
            tp = _pick(draw, unread)
            start = position[tp]
            position[tp] = min(len(logs[tp]), start + draw(st.integers(1, 4)))
            current.extend(logs[tp][start : position[tp]])
        elif action == FLUSH:
            flush()
        elif action == REPLAY and replays < _MAX_REPLAYS:
            read = sorted(tp for tp in logs if position[tp] > 0)
            if read:
                flush()  # a rewound consumer drops what it buffered and re-reads
                tp = _pick(draw, read)
                position[tp] = draw(st.integers(0, position[tp] - 1))
                replays += 1
        elif action == SWEEP:
            flush(sweep=True)
    flush()
    flush(sweep=True)
    return tuple(batches)
