"""Write one batch in one transaction: rows, outbox, waiting changes, dead letters and the
stored positions commit together, or none of them does.

Fencing: the positions of every partition this consumer owns are locked and compared
with what it expects first; if another consumer moved one, `Fenced` is raised and
nothing is written, so a consumer that lost its partitions cannot write behind the new
owner.

A bounded replay (`replay_end`, `resume_offset` beside a position) ends in the batch
that reaches `replay_end`: its records from there on are left out, the position becomes
`resume_offset` and the plan is cleared, all in the batch's transaction; the consumer
then seeks there (`WriteResult.resumed`).
"""

from __future__ import annotations

import asyncio
from base64 import b64encode
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    func,
    or_,
    select,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import BigInteger, Boolean, DateTime, Integer, String, Text

from sync_service.db.models import (
    ConsumerOffset,
    DeadLetterRow,
    Order,
    OutboxEvent,
    PendingChange,
    User,
)
from sync_service.db.statements import array_rows, copy_rows, readable_times, upsert_rows
from sync_service.events.change import Change, DeadLetter, Entity, Source
from sync_service.events.dead_letter import DEAD_LETTER, outbox_payload
from sync_service.events.dead_letter import event_id as dead_letter_event_id
from sync_service.events.outbound import downstream_event_text, event_type, outbound_value
from sync_service.pipeline.batch import Batch, TopicPartition
from sync_service.pipeline.decode import change_from_envelope, envelope_document
from sync_service.pipeline.guard import DeadLetterGuard, Trip, paused_partitions
from sync_service.pipeline.plan import COLUMNS, Applied, PendingKey, Plan, Row, Waiting, needs, plan
from sync_service.retry import Transient

OUTBOX_CHANNEL = "sync_outbox"
_TABLES: dict[Entity, Table] = {"user": User.__table__, "order": Order.__table__}  # type: ignore[dict-item]
_CHECK_PLANS_GENERIC = func.set_config("plan_cache_mode", "force_generic_plan", True)
_CHECK_PLANS_CUSTOM = func.set_config("plan_cache_mode", "force_custom_plan", True)
"""Around the orders' upsert, in the statements themselves (no round trip of their own):
the foreign key's check of each order's user is a query PostgreSQL plans per row under
the connection's `force_custom_plan` (see `db.engine`), a tenth of its CPU in a batch;
its plan is a probe of the users' primary key whatever the statistics say, so it is
planned once. The batch's `NOTIFY`, which always follows written rows, switches back
before anything that joins keys to a table."""
_TIMES: dict[Entity, tuple[str, ...]] = {
    entity: tuple(c.name for c in table.c if isinstance(c.type, DateTime))
    for entity, table in _TABLES.items()
}
_UPSERTS: dict[Entity, Insert] = {
    "user": upsert_rows(_TABLES["user"], COLUMNS["user"]),
    "order": upsert_rows(_TABLES["order"], COLUMNS["order"], before=_CHECK_PLANS_GENERIC),
}
_OUTBOX = OutboxEvent.__table__
_OUTBOX_COLUMNS = (
    "txid", "aggregate_type", "aggregate_id", "event_type", "event_id", "version", "payload",
)  # fmt: skip
_KEYS = array_rows(
    ("entity", "entities", String),
    ("entity_id", "ids", BigInteger),
    ("version", "versions", BigInteger),
)
_PENDING_KEY = tuple_(PendingChange.entity, PendingChange.entity_id, PendingChange.version)
_IN_KEYS = _PENDING_KEY.in_(select(_KEYS.c.entity, _KEYS.c.entity_id, _KEYS.c.version))
_UNPEND = delete(PendingChange).where(_IN_KEYS)
_PENDING_ENVELOPES = select(
    PendingChange.entity,
    PendingChange.envelope,
    PendingChange.topic,
    PendingChange.partition,
    PendingChange.offset,
).where(_IN_KEYS)
_REMEMBER_AT_MOST = 200_000
_NOTIFY = select(func.pg_notify(OUTBOX_CHANNEL, ""), _CHECK_PLANS_CUSTOM)


def _lookup(
    entity: Entity, key: str, values: str, type_: type[BigInteger | String],
    *where: ColumnElement[bool],
) -> Select[Any]:  # fmt: skip
    """The row of each of the array `values` in column `key` (unique where `where` holds:
    a primary key, or a live user's email), in `COLUMNS` order: one index probe per value,
    whatever the table's statistics say. A join the planner orders itself turned
    quadratic while a fresh table filled and its statistics lagged (30-400 ms a batch)."""
    table = _TABLES[entity]
    keys = array_rows(("key", values, type_), name="k")
    found = (
        select(*(table.c[name] for name in COLUMNS[entity]))
        .where(table.c[key] == keys.c.key, *where)
        .limit(1)  # keeps the subquery a probe per key: the planner cannot flatten it
        .lateral("found")
    )
    return select(*found.c).select_from(keys).join(found, true())


_STORED_USERS = union_all(
    _lookup("user", "id", "user_ids", BigInteger),
    _lookup("user", "email", "emails", String, User.__table__.c.deleted_at.is_(None)),
)
_STORED_ORDERS = _lookup("order", "id", "order_ids", BigInteger)
_PARTITION_ARRAYS = (("topic", "topics", Text), ("partition", "partitions", Integer))
"""Partitions as two arrays (`_partition_arrays`): one statement text and one parameter
each, whatever their number (an expanding `IN` list is rendered again per execution)."""
_PARTITIONS = array_rows(*_PARTITION_ARRAYS)
_TXID = cast(cast(func.pg_current_xact_id(), Text), BigInteger)
"""This transaction's id, as the outbox's `txid` default computes it (once, not per row:
the default's casts cost PostgreSQL ~1.5 us per outbox row)."""
_FENCE = (
    select(
        ConsumerOffset.topic,
        ConsumerOffset.partition,
        ConsumerOffset.next_offset,
        _TXID,
        ConsumerOffset.replay_end,
        ConsumerOffset.resume_offset,
    )
    .where(ConsumerOffset.group_id == bindparam("group_id"))
    .where(tuple_(ConsumerOffset.topic, ConsumerOffset.partition).in_(select(*_PARTITIONS.c)))
    .order_by(ConsumerOffset.topic, ConsumerOffset.partition)
    .with_for_update()
)


_OWNED = tuple_(PendingChange.topic, PendingChange.partition).in_(
    bindparam("partitions", expanding=True)
)
_USER_IDS = bindparam("user_ids", type_=ARRAY(BigInteger))
_PENDING_ENTITY = tuple_(PendingChange.entity, PendingChange.entity_id)
_PENDING_KEYS = select(PendingChange.entity, PendingChange.entity_id, PendingChange.version).where(
    or_(
        # The entities in the batch ...
        and_(_OWNED, PendingChange.entity == "user", PendingChange.entity_id == any_(_USER_IDS)),
        and_(
            _OWNED,
            PendingChange.entity == "order",
            PendingChange.entity_id == any_(bindparam("order_ids", type_=ARRAY(BigInteger))),
        ),
        # ... those waiting for a user in it ...
        _PENDING_ENTITY.in_(
            select(PendingChange.entity, PendingChange.entity_id).where(
                _OWNED, PendingChange.blocked_by == any_(_USER_IDS)
            )
        ),
        # ... and on a sweep, the oldest.
        and_(
            bindparam("sweep", type_=Boolean),
            _PENDING_ENTITY.in_(
                select(PendingChange.entity, PendingChange.entity_id)
                .where(_OWNED)
                .group_by(PendingChange.entity, PendingChange.entity_id)
                .order_by(func.min(PendingChange.first_seen_at))
                .limit(bindparam("oldest", type_=Integer))
            ),
        ),
    )
)

_POSITION_ROWS = array_rows(*_PARTITION_ARRAYS, ("next_offset", "offsets", BigInteger))
_POSITIONS = insert(ConsumerOffset.__table__).from_select(  # type: ignore[arg-type]
    ["group_id", "topic", "partition", "next_offset"],
    select(bindparam("group_id", type_=Text), *_POSITION_ROWS.c),
)
_STORE_POSITIONS = _POSITIONS.on_conflict_do_update(
    index_elements=["group_id", "topic", "partition"],
    set_={"next_offset": _POSITIONS.excluded.next_offset, "updated_at": func.now()},
)
"""Every partition's position in one statement, from arrays (a row per partition would
be a statement each for the server). Built once, like every statement a batch runs: an
`excluded` built per batch is an alias of the table whose columns refer to each other,
garbage only the cycle collector frees (seven columns' worth of objects a batch,
measured with `gc.get_objects`)."""
_STORE_PENDING = insert(PendingChange).on_conflict_do_nothing()
_STORE_DEAD_LETTERS = insert(DeadLetterRow).on_conflict_do_nothing()
_STORE_NEW_DEAD_LETTERS = _STORE_DEAD_LETTERS.returning(
    DeadLetterRow.topic, DeadLetterRow.partition, DeadLetterRow.offset
)


class Fenced(Exception):
    """Another consumer has moved a position this one expected: it must re-read them."""


class LostUpdate(Transient):
    """A row changed between the batch's read and its write; the batch is retried."""


@dataclass(slots=True)
class WriteResult:
    """What one committed batch did."""

    applied: dict[Entity, int] = field(default_factory=lambda: {"user": 0, "order": 0})
    stale: dict[Entity, int] = field(default_factory=lambda: {"user": 0, "order": 0})
    waiting: int = 0
    resolved: int = 0
    dead: int = 0
    outbox: int = 0
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    resumed: dict[TopicPartition, int] = field(default_factory=dict)
    """Partitions whose bounded replay this batch ended: the consumer seeks to these."""
    tripped: list[Trip] = field(default_factory=list)
    """Partitions this batch made the dead-letter guard pause (stored with it)."""


class BatchWriter:
    """Writes batches for one consumer group; each `write` is one transaction."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        group_id: str,
        pending_load_limit: int,
        guard: DeadLetterGuard | None = None,
        *,
        publish_dead_letters: bool = False,
    ) -> None:
        self._sessions = sessions
        self._group_id = group_id
        self._pending_limit = pending_load_limit
        self._guard = guard
        self._publish_dead_letters = publish_dead_letters
        """Write an outbox row per new dead letter (`SYNC_DLQ_TOPIC` is set)."""
        self._waiting: dict[PendingKey, Change] = {}

    async def paused(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, Trip]:
        """Which of `partitions` the dead-letter guard holds for this group, and why."""
        async with self._sessions() as session:
            return await paused_partitions(session, self._group_id, partitions)

    async def positions(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        """The stored next offsets of `partitions` (absent where nothing was stored yet)."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(ConsumerOffset.topic, ConsumerOffset.partition, ConsumerOffset.next_offset)
                .where(ConsumerOffset.group_id == self._group_id)
                .where(tuple_(ConsumerOffset.topic, ConsumerOffset.partition).in_(partitions))
            )
            return {(t, p): n for t, p, n in rows}

    async def write(
        self, batch: Batch, expected: Mapping[TopicPartition, int | None]
    ) -> WriteResult:
        """Apply `batch` for the partitions in `expected` (all this consumer owns, with the
        positions it believes are stored). Changes waiting on those partitions are tried
        again in the same transaction."""
        async with self._sessions() as session, session.begin():
            # First, always: locking the positions gives this transaction its id, so two
            # batches that write the same aggregate get ids in commit order, which is the
            # order the relay publishes in.
            txid, replays = await self._fence(session, expected)
            batch, resumed = _bound(batch, replays)
            pending = await self._load_pending(session, batch, list(expected))
            stored = await load_stored(session, [*pending, *batch.changes])
            result_plan = plan(batch.changes, pending, stored)
            result = await self._apply(session, batch, result_plan, stored, txid)
            if self._guard is not None and batch.dead:
                result.tripped = await self._guard.check(session, batch)
            await self._store_positions(session, batch.next_offsets, resumed)
        result.next_offsets = dict(batch.next_offsets)
        result.resumed = resumed
        return result

    async def _fence(
        self, session: AsyncSession, expected: Mapping[TopicPartition, int | None]
    ) -> tuple[int, dict[TopicPartition, tuple[int, int]]]:
        """Check that the stored positions are still `expected`, locking them; returns the
        transaction's id and the bounded replays under way (replay end, resume offset)."""
        arrays = _partition_arrays(expected)
        rows = (await session.execute(_FENCE, {"group_id": self._group_id, **arrays})).all()
        stored = {(t, p): n for t, p, n, *_ in rows}
        for tp, position in expected.items():
            if stored.get(tp) != position:
                raise Fenced(f"{tp[0]}[{tp[1]}] is at {stored.get(tp)}, expected {position}")
        replays = {
            (t, p): (end, resume)
            for t, p, _, _, end, resume in rows
            if end is not None and resume is not None
        }
        if not rows:  # no position stored yet (or none expected)
            return int(await session.scalar(select(_TXID))), replays  # type: ignore[arg-type]
        return int(rows[0][3]), replays

    async def _load_pending(
        self, session: AsyncSession, batch: Batch, partitions: list[TopicPartition]
    ) -> list[Change]:
        """The waiting changes this batch may settle, always whole entities (an entity's
        later versions must never apply ahead of an earlier one left unloaded): each
        entity in the batch, each with a change blocked by a user in the batch, and on a
        sweep the oldest waiting entities of the owned partitions."""
        if not partitions:
            return []
        ids: dict[Entity, set[int]] = {"user": set(), "order": set()}
        for change in batch.changes:
            ids[change.entity].add(change.id)
        if not (ids["user"] or ids["order"] or batch.sweep):
            return []
        found = await session.execute(
            _PENDING_KEYS,
            {
                "partitions": partitions,
                "user_ids": sorted(ids["user"]),
                "order_ids": sorted(ids["order"]),
                "sweep": batch.sweep,
                "oldest": self._pending_limit,
            },
        )
        keys: list[PendingKey] = [tuple(row) for row in found]  # type: ignore[misc]
        missing = [key for key in keys if key not in self._waiting]
        if missing:
            entities, entity_ids, versions = zip(*missing, strict=True)
            rows = await session.execute(
                _PENDING_ENVELOPES,
                {"entities": list(entities), "ids": list(entity_ids), "versions": list(versions)},
            )
            for entity, envelope, topic, partition, offset in rows:
                change = change_from_envelope(entity, envelope, Source(topic, partition, offset))
                self._remember([change])
        # A row another writer settled between the two reads no longer waits.
        return [self._waiting[key] for key in keys if key in self._waiting]

    def _remember(self, changes: Iterable[Change]) -> None:
        """Keep waiting changes decoded: most apply a batch or two later, and reading them
        back needs only their keys. What waits is decided by the table, never by this."""
        if len(self._waiting) > _REMEMBER_AT_MOST:
            self._waiting.clear()
        for change in changes:
            self._waiting[(change.entity, change.id, change.version)] = change

    async def _apply(
        self,
        session: AsyncSession,
        batch: Batch,
        todo: Plan,
        stored: Mapping[Entity, Mapping[int, Row]],
        txid: int,
    ) -> WriteResult:
        result = WriteResult(
            applied=dict(todo.applied_by_entity), waiting=len(todo.wait), dead=len(batch.dead)
        )
        for change in todo.stale:
            result.stale[change.entity] += 1
        for entity, rows in todo.rows.items():  # before the outbox rows are built from them
            readable_times(rows, _TIMES[entity])
        # PostgreSQL writes the rows while this process builds the outbox rows.
        upserting = asyncio.ensure_future(_upsert(session, todo, stored))
        try:
            outbox = await _outbox_rows(todo.applied, txid)
            await upserting
        finally:
            if not upserting.done():
                upserting.cancel()
                await asyncio.wait([upserting])
        if outbox:
            await copy_rows(session, _OUTBOX, _OUTBOX_COLUMNS, outbox)  # type: ignore[arg-type]
            await session.execute(_NOTIFY)
            result.outbox = len(outbox)
        if todo.unpend:
            for key in todo.unpend:
                self._waiting.pop(key, None)
            entities, entity_ids, versions = zip(*todo.unpend, strict=True)
            await session.execute(
                _UNPEND,
                {"entities": list(entities), "ids": list(entity_ids), "versions": list(versions)},
            )
            result.resolved = len(todo.unpend)
        if todo.wait:
            self._remember(waiting.change for waiting in todo.wait)
            await session.execute(
                _STORE_PENDING,
                [_pending_row(waiting) for waiting in todo.wait],
            )
        if batch.dead:
            await self._store_dead_letters(session, batch.dead, txid)
        return result

    async def _store_dead_letters(
        self, session: AsyncSession, dead: Sequence[DeadLetter], txid: int
    ) -> None:
        """Insert the letters not stored yet (a replay re-reads some); with
        `SYNC_DLQ_TOPIC`, each new one also gets an outbox row for the relay to publish."""
        dead = [_storable(d) for d in dead]
        rows = [
            {
                "topic": d.source.topic,
                "partition": d.source.partition,
                "offset": d.source.offset,
                "key": d.key,
                "key_size": d.key_size,
                "value": d.value,
                "value_size": d.value_size,
                "kind": d.kind,
                "reason": d.reason,
                "headers": _headers_document(d.headers),
            }
            for d in dead
        ]
        if not self._publish_dead_letters:
            await session.execute(_STORE_DEAD_LETTERS, rows)
            return
        stored = await session.execute(_STORE_NEW_DEAD_LETTERS, rows)
        new = {tuple(row) for row in stored}
        outbox = [_dead_letter_outbox_row(d, txid) for d in dead if tuple(d.source) in new]
        if outbox:
            await copy_rows(session, _OUTBOX, _OUTBOX_COLUMNS, outbox)  # type: ignore[arg-type]
            await session.execute(_NOTIFY)

    async def _store_positions(
        self,
        session: AsyncSession,
        next_offsets: Mapping[TopicPartition, int],
        resumed: Collection[TopicPartition] = (),
    ) -> None:
        if not next_offsets:
            return
        ordered = sorted(next_offsets)
        await session.execute(
            _STORE_POSITIONS,
            {
                "group_id": self._group_id,
                **_partition_arrays(ordered),
                "offsets": [next_offsets[tp] for tp in ordered],
            },
        )
        if resumed:
            await session.execute(
                update(ConsumerOffset)
                .where(ConsumerOffset.group_id == self._group_id)
                .where(tuple_(ConsumerOffset.topic, ConsumerOffset.partition).in_(list(resumed)))
                .values(replay_end=None, resume_offset=None)
            )


def _partition_arrays(partitions: Iterable[TopicPartition]) -> dict[str, list[Any]]:
    """The parameters of `_PARTITION_ARRAYS` for `partitions`, in their order."""
    listed = list(partitions)
    return {"topics": [t for t, _ in listed], "partitions": [p for _, p in listed]}


def _bound(
    batch: Batch, replays: Mapping[TopicPartition, tuple[int, int]]
) -> tuple[Batch, dict[TopicPartition, int]]:
    """`batch` without the records at or after the end of a bounded replay, and the
    partitions whose replay it ends, with where each resumes. A batch reaches the end
    when its next offset does (a control record may sit on the last offset, so the first
    record past the end, left out, can be what reaches it)."""
    ended = {
        tp: (end, resume)
        for tp, (end, resume) in replays.items()
        if batch.next_offsets.get(tp, -1) >= end
    }
    if not ended:
        return batch, {}

    def inside(source: Source) -> bool:
        bound = ended.get((source.topic, source.partition))
        return bound is None or source.offset < bound[0]

    next_offsets = dict(batch.next_offsets)
    next_offsets.update({tp: resume for tp, (_, resume) in ended.items()})
    bounded = Batch(
        changes=[c for c in batch.changes if inside(c.source)],
        dead=[d for d in batch.dead if inside(d.source)],
        next_offsets=next_offsets,
        opened_at=batch.opened_at,
        sweep=batch.sweep,
    )
    return bounded, {tp: resume for tp, (_, resume) in ended.items()}


async def _upsert(
    session: AsyncSession, todo: Plan, stored: Mapping[Entity, Mapping[int, Row]]
) -> None:
    """One upsert per table, users first (orders refer to them): a row the plan found
    stored is replaced only where its version is still the one read (`stored`), any
    other is inserted only where its key is still free. A row left unwritten means
    another writer got there between this batch's read and its write: `LostUpdate`, and
    the batch is planned again from what is stored then. So a change is applied, and its
    outbox row written, once, whichever writers race on an aggregate."""
    entities: tuple[Entity, ...] = ("user", "order")
    for entity in entities:
        rows = todo.rows[entity]
        if not rows:
            continue
        known = stored[entity]
        expected = {str(i): known[i]["version"] for row in rows if (i := row["id"]) in known}
        done = await session.execute(_UPSERTS[entity], {"rows": rows, "expected": expected})
        if done.rowcount != len(rows):  # type: ignore[attr-defined]
            raise LostUpdate(f"{entity}: wrote {done.rowcount} of {len(rows)} rows")  # type: ignore[attr-defined]


async def _outbox_rows(
    applied: Sequence[Applied], txid: int, slice_size: int = 500
) -> list[_OutboxRow]:
    """The outbox rows of `applied`, in order, yielding to the loop between slices so that
    a statement under way can be answered and the next one sent."""
    rows: list[_OutboxRow] = []
    for start in range(0, len(applied), slice_size):
        await asyncio.sleep(0)
        rows.extend(_outbox_row(a.change, a.row, txid) for a in applied[start : start + slice_size])
    return rows


async def load_stored(
    session: AsyncSession, changes: Sequence[Change]
) -> dict[Entity, dict[int, Row]]:
    """The rows `plan` needs for `changes` (see `plan.needs`)."""
    wanted = needs(changes)
    user_ids, order_ids, emails = wanted.user_ids, wanted.order_ids, wanted.emails
    stored: dict[Entity, dict[int, Row]] = {"user": {}, "order": {}}
    if user_ids or emails:
        rows = await session.execute(
            _STORED_USERS, {"user_ids": sorted(user_ids), "emails": sorted(emails)}
        )
        stored["user"] = _by_id(rows, COLUMNS["user"])  # a user found twice is kept once
    if order_ids:
        rows = await session.execute(_STORED_ORDERS, {"order_ids": sorted(order_ids)})
        stored["order"] = _by_id(rows, COLUMNS["order"])
    return stored


def _by_id(rows: Iterable[Sequence[Any]], columns: Sequence[str]) -> dict[int, Row]:
    """Rows as dicts keyed by id (the first column)."""
    return {row[0]: dict(zip(columns, row, strict=True)) for row in rows}


_OutboxRow = tuple[int, str, str, str, str, int, str]


def _outbox_row(change: Change, row: Row, txid: int) -> _OutboxRow:
    """One outbox row, in `_OUTBOX_COLUMNS` order."""
    event_id = downstream_event_text(change.event_id)
    kind = event_type(change)
    aggregate_id = str(change.id)  # each computed once, for its column and the payload
    value = outbound_value(change, row, event_id, kind, aggregate_id)
    payload = orjson.dumps(value, default=str).decode()
    return (txid, change.entity, aggregate_id, kind, event_id, change.version, payload)


def _dead_letter_outbox_row(letter: DeadLetter, txid: int) -> _OutboxRow:
    """A dead letter's outbox row, in `_OUTBOX_COLUMNS` order: one per record (its
    origin is its aggregate id, its offset the version)."""
    topic, partition, offset = letter.source
    return (
        txid,
        DEAD_LETTER,
        f"{topic}/{partition}/{offset}",
        DEAD_LETTER,
        str(dead_letter_event_id(topic, partition, offset)),
        offset,
        outbox_payload(letter),
    )


def _headers_document(headers: Sequence[tuple[str, bytes | None]]) -> list[list[str | None]] | None:
    """Kafka headers as JSON: `[name, base64 value or null]` pairs, in order (a header's
    value is any bytes, and a name may repeat)."""
    if not headers:
        return None
    return [[name, None if value is None else b64encode(value).decode()] for name, value in headers]


def storable_text(text: str) -> str:
    """`text` as PostgreSQL can store it: U+0000, which no text or jsonb value holds,
    becomes U+FFFD."""
    return text.replace("\x00", "\ufffd")


def _storable(letter: DeadLetter) -> DeadLetter:
    """`letter` as PostgreSQL can store it (`storable_text`): its reason may quote the
    record, and its headers' names are the producer's. Its key and value are bytes, kept
    whole."""
    if "\x00" not in letter.reason and not any("\x00" in name for name, _ in letter.headers):
        return letter
    return replace(
        letter,
        reason=storable_text(letter.reason),
        headers=tuple((storable_text(name), value) for name, value in letter.headers),
    )


def _pending_row(waiting: Waiting) -> dict[str, Any]:
    change = waiting.change
    return {
        "entity": change.entity,
        "entity_id": change.id,
        "version": change.version,
        "topic": change.source.topic,
        "partition": change.source.partition,
        "offset": change.source.offset,
        "envelope": envelope_document(change),
        "reason": waiting.reason,
        "blocked_by": waiting.blocked_by,
    }
