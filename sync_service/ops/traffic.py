"""Reproducible source histories of users and orders, in the native envelope, and the
state the target must end in after consuming them.

Invariant: every good event is a step that is valid in the source when it is made (versions
rise per entity, live emails are unique, an order's user exists); duplicates, late
deliveries and bad messages never change the expected final state.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Boolean, DateTime, FromClause, Numeric, Text, cast, func, literal, select
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from sync_service.db.models import Order, User
from sync_service.events.change import Entity
from sync_service.pipeline.plan import COLUMNS

NULL = "\\N"
"""How a missing value reads in a canonical row (as in PostgreSQL's COPY text format)."""
_TIME_FORMAT_SQL = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: where every history's clock starts

_FIRST = (
    ("Ada", "ada"), ("Alan", "alan"), ("Grace", "grace"), ("Linus", "linus"),
    ("Margaret", "margaret"), ("Edsger", "edsger"), ("Barbara", "barbara"), ("Ken", "ken"),
    ("Radia", "radia"), ("Donald", "donald"), ("Frances", "frances"), ("Niklaus", "niklaus"),
    ("José", "jose"), ("Zoë", "zoe"), ("Søren", "soren"), ("Chloé", "chloe"),
    ("Mei", "mei"), ("Kenji", "kenji"), ("Amara", "amara"), ("Olusegun", "olusegun"),
    ("Priya", "priya"), ("Ingrid", "ingrid"), ("Mateo", "mateo"), ("Fatima", "fatima"),
)  # fmt: skip
_LAST = (
    ("Lovelace", "lovelace"), ("Turing", "turing"), ("Hopper", "hopper"),
    ("Torvalds", "torvalds"), ("Hamilton", "hamilton"), ("Dijkstra", "dijkstra"),
    ("Liskov", "liskov"), ("Thompson", "thompson"), ("Perlman", "perlman"),
    ("Knuth", "knuth"), ("Allen", "allen"), ("Wirth", "wirth"), ("García", "garcia"),
    ("Müller", "muller"), ("Kierkegaard", "kierkegaard"), ("Dubois", "dubois"),
    ("Zhang", "zhang"), ("Tanaka", "tanaka"), ("Okafor", "okafor"), ("Adeyemi", "adeyemi"),
    ("Sharma", "sharma"), ("Johansson", "johansson"), ("Rossi", "rossi"), ("Haddad", "haddad"),
)  # fmt: skip
_DOMAINS = ("example.com", "example.org", "example.net")
_COUNTRIES = ("GB", "DE", "FR", "NL", "ES", "IT", "US", "CA", "SE", "PL", "JP", "BR", None)
_CURRENCIES = ("EUR", "EUR", "EUR", "GBP", "USD", "USD")
_OPEN = ("pending", "paid")
"""Order statuses that may still change; shipped, cancelled and refunded are final here."""

# The mix of source changes: _MIX[i] is chosen with the probability up to _MIX_CUTS[i].
_MIX = ("create_user", "update_user", "delete_user", "create_order", "update_order",
        "delete_order")  # fmt: skip
_MIX_CUTS = (0.08, 0.25, 0.255, 0.505, 0.995)
_HOT = 0.6
"""Share of updates and new orders that go to recently active entities: real traffic is
skewed, and it puts several versions of one entity into one batch."""
_REUSE_EMAIL = 0.3
_MAX_LATE_GAP = 40
"""A held-back change is delivered within this many steps, right after its successor."""


@dataclass(frozen=True, slots=True)
class Event:
    """One message to produce: `entity` names the topic, `partition` is where all the
    changes of its key go. A `bad` one must be dead-lettered (its id/version are nominal)."""

    entity: Entity
    key: bytes
    value: bytes
    id: int
    version: int
    partition: int
    bad: bool = False


@dataclass(frozen=True, slots=True)
class ExpectedState:
    """What the target must hold after a history, and what the pipeline must count.

    `users`/`orders` are the canonical rows (see `canonical_row`) in id order. Outbox rows:
    every distinct source change applies, except that a change delivered *late* (after the
    next version of its entity) is stale if that next version was already written; but if
    both land in one batch, or the later one is still waiting when the older arrives, they
    apply together in version order (the contract's coalescing), each with an outbox row.
    So the outbox count lies in [changes - late, changes]; duplicates and bad messages
    never write one, and every good event is either applied or stale exactly once.
    """

    users: tuple[str, ...]
    orders: tuple[str, ...]
    id_range: tuple[int, int]
    """Inclusive bounds of every id this history uses, in both tables."""
    events: int
    changes: int
    duplicates: int
    late: int
    dead_letters: int

    @property
    def applied_at_least(self) -> int:
        return self.changes - self.late

    @property
    def applied_at_most(self) -> int:
        return self.changes

    def checksum(self) -> str:
        """The same figure `table_checksum` computes from a target holding these rows."""
        return checksum_of(self.users, self.orders)


# --- canonical rows and their checksum -------------------------------------------------


def _time_text(value: Any) -> str:
    if isinstance(value, str):
        if len(value) == 24 and value[19] == "." and value[23] == "Z":
            return value[:23] + "000Z"  # fast path for this module's own millisecond times
        value = datetime.fromisoformat(value)
    return str(value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def _converter(column_type: Any) -> Callable[[Any], str]:
    """How a value of a column reads in a canonical row; mirrors `_sql_text`."""
    if isinstance(column_type, DateTime):
        return _time_text
    if isinstance(column_type, Boolean):
        return lambda v: "true" if v else "false"
    if isinstance(column_type, Numeric):
        places = column_type.scale or 0
        return lambda v: f"{Decimal(v):.{places}f}"
    return str


_TABLES: dict[Entity, FromClause] = {"user": User.__table__, "order": Order.__table__}
_CONVERTERS: dict[Entity, tuple[tuple[str, Callable[[Any], str]], ...]] = {
    entity: tuple((name, _converter(_TABLES[entity].c[name].type)) for name in COLUMNS[entity])
    for entity in ("user", "order")
}


def _compact(value: bytes) -> bytes:
    """A copy of exactly its size: orjson's bytes keep their whole buffer (about 4 KB), which
    for a million held events is gigabytes."""
    return bytes(memoryview(value))


def canonical_row(entity: Entity, row: Mapping[str, Any]) -> str:
    """One row as text: the table's columns in order, `|`-separated, NULL as `\\N`, times
    in UTC with microseconds, money with its scale. Generated values hold no `|` or
    newline, so the form is unambiguous for them."""
    return "|".join(
        NULL if row.get(name) is None else convert(row[name])
        for name, convert in _CONVERTERS[entity]
    )


def _sql_text(column: Any) -> ColumnElement[Any]:
    """The SQL side of `_converter`: the same text, computed by PostgreSQL."""
    text_value: ColumnElement[Any]
    if isinstance(column.type, DateTime):
        text_value = func.to_char(func.timezone("UTC", column), _TIME_FORMAT_SQL)
    else:
        text_value = cast(column, Text)  # booleans read true/false, numerics keep their scale
    return func.coalesce(text_value, NULL)


def _line(entity: Entity) -> ColumnElement[Any]:
    """A row's `canonical_row`, computed by PostgreSQL."""
    table = _TABLES[entity]
    return func.concat_ws("|", *(_sql_text(table.c[name]) for name in COLUMNS[entity]))


def _checksum_query(entity: Entity, ids: tuple[int, int] | None) -> Any:
    table = _TABLES[entity]
    joined = func.string_agg(_line(entity), aggregate_order_by(literal("\n"), table.c.id))
    query = select(func.md5(func.coalesce(joined, "")))
    if ids is not None:
        query = query.where(table.c.id.between(*ids))
    return query


async def table_checksum(engine: AsyncEngine, ids: tuple[int, int] | None = None) -> str:
    """The checksum of `users` and `orders` (only ids within `ids`, inclusive, if given),
    one query per table; equal to `ExpectedState.checksum()` for the same rows."""
    async with engine.connect() as connection:
        users = (await connection.execute(_checksum_query("user", ids))).scalar()
        orders = (await connection.execute(_checksum_query("order", ids))).scalar()
    return _combine(str(users), str(orders))


async def table_rows(engine: AsyncEngine, ids: tuple[int, int]) -> dict[Entity, tuple[str, ...]]:
    """The canonical rows of `users` and `orders` with ids within `ids`, in id order: what
    `table_checksum` sums, for saying which rows differ when it does not match."""
    rows: dict[Entity, tuple[str, ...]] = {}
    async with engine.connect() as connection:
        for entity in ("user", "order"):
            id_ = _TABLES[entity].c.id
            query = select(_line(entity)).where(id_.between(*ids)).order_by(id_)
            rows[entity] = tuple((await connection.execute(query)).scalars())
    return rows


def checksum_of(users: Iterable[str], orders: Iterable[str]) -> str:
    """The checksum of canonical rows, each table's in id order."""
    return _combine(_md5_lines(users), _md5_lines(orders))


def _md5_lines(lines: Iterable[str]) -> str:
    return hashlib.md5("\n".join(lines).encode(), usedforsecurity=False).hexdigest()


def _combine(users: str, orders: str) -> str:
    return f"users:{users} orders:{orders}"


# --- the generator ----------------------------------------------------------------------


class _User:
    __slots__ = ("active", "country", "created_at", "deleted_at", "email", "id", "name",
                 "updated_at", "version")  # fmt: skip

    def __init__(self, user_id: int, email: str, name: str, active: bool, country: str | None,
                 now: str) -> None:  # fmt: skip
        self.id = user_id
        self.version = 1
        self.email = email
        self.name = name
        self.active = active
        self.country = country
        self.created_at = now
        self.updated_at = now
        self.deleted_at: str | None = None

    def data(self) -> dict[str, Any]:
        return {
            "id": self.id, "email": self.email, "name": self.name, "active": self.active,
            "country": self.country, "created_at": self.created_at,
            "updated_at": self.updated_at,
        }  # fmt: skip

    def row(self) -> dict[str, Any]:
        return {**self.data(), "version": self.version, "deleted_at": self.deleted_at}


class _Order:
    __slots__ = ("created_at", "currency", "deleted_at", "id", "status", "total", "updated_at",
                 "user_id", "version")  # fmt: skip

    def __init__(self, order_id: int, user_id: int, total: str, currency: str, now: str) -> None:
        self.id = order_id
        self.version = 1
        self.user_id = user_id
        self.total = total
        self.currency = currency
        self.status = "pending"
        self.created_at = now
        self.updated_at = now
        self.deleted_at: str | None = None

    def data(self) -> dict[str, Any]:
        return {
            "id": self.id, "user_id": self.user_id, "total": self.total,
            "currency": self.currency, "status": self.status, "created_at": self.created_at,
            "updated_at": self.updated_at,
        }  # fmt: skip

    def row(self) -> dict[str, Any]:
        return {**self.data(), "version": self.version, "deleted_at": self.deleted_at}


class _Pool:
    """Ids that an operation may pick: O(1) add, remove and uniform or recent-biased pick."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._ids: list[int] = []
        self._at: dict[int, int] = {}
        self._recent: deque[int] = deque(maxlen=64)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, entity_id: int) -> None:
        self._at[entity_id] = len(self._ids)
        self._ids.append(entity_id)
        self._recent.append(entity_id)

    def remove(self, entity_id: int) -> None:
        index = self._at.pop(entity_id)
        last = self._ids.pop()
        if last != entity_id:
            self._ids[index] = last
            self._at[last] = index

    def touch(self, entity_id: int) -> None:
        self._recent.append(entity_id)

    def pick(self, hot: bool) -> int:
        rng = self._rng
        if hot and self._recent and rng.random() < _HOT:
            candidate = self._recent[int(rng.random() * len(self._recent))]
            if candidate in self._at:
                return candidate
        return self._ids[int(rng.random() * len(self._ids))]


class Traffic:
    """A seeded source history: the same arguments always give the same bytes.

    Users are created, renamed, (de)activated, moved between countries and given new
    emails (a freed email is often taken again by another user), and now and then
    deleted; orders are placed by live users, paid, shipped, cancelled, refunded or
    re-priced, and now and then deleted. On top, as delivered by a real pipeline:
    `duplicate_rate` re-sends of a recent event (same id, same bytes),
    `out_of_order_rate` changes held back and delivered right after their successor
    (never around a delete), and `bad_rate` messages that must be dead-lettered. Ids run
    from `id_base + 1`; emails are numbered from `id_base` too, so histories with
    different bases share no ids, emails or event ids. One `Traffic` makes one history.
    """

    def __init__(
        self,
        seed: int,
        *,
        id_base: int = 0,
        duplicate_rate: float = 0.01,
        out_of_order_rate: float = 0.01,
        bad_rate: float = 0.0,
        partitions: int = 12,
    ) -> None:
        rates = {"duplicate_rate": duplicate_rate, "out_of_order_rate": out_of_order_rate,
                 "bad_rate": bad_rate}  # fmt: skip
        for name, rate in rates.items():
            if not 0.0 <= rate < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), not {rate}")
        if duplicate_rate + bad_rate >= 0.5:
            raise ValueError("duplicate_rate + bad_rate must stay below 0.5")
        if partitions < 1 or id_base < 0:
            raise ValueError("partitions must be >= 1 and id_base >= 0")
        self._rng = random.Random(seed)
        self._id_base = id_base
        # Histories that differ only in their base must not share event ids either.
        salt = hashlib.blake2b(str(id_base).encode(), digest_size=16).digest()
        self._event_id_salt = int.from_bytes(salt, "big")
        self._duplicate_rate = duplicate_rate
        self._out_of_order_rate = out_of_order_rate
        self._bad_rate = bad_rate
        self._partitions = partitions
        self._started = False
        self._finished = False

        self._users: dict[int, _User] = {}
        self._orders: dict[int, _Order] = {}
        self._live_users = _Pool(self._rng)
        self._open_orders = _Pool(self._rng)
        self._freed: list[str] = []
        """Emails no live user holds any more, ready to be taken again; new ones are
        numbered, so no two live users ever share one (the source's unique rule)."""
        self._email_serial = id_base

        self._now_ms = _EPOCH_MS
        self._second = -1
        self._second_text = ""
        self._step = 0
        self._held: dict[tuple[Entity, int], Event] = {}
        self._due: list[tuple[int, int, Entity, int]] = []
        self._recent: deque[Event] = deque(maxlen=1024)

        self._events = 0
        self._changes = 0
        self._duplicates = 0
        self._late = 0
        self._bad = 0

    # -- public --------------------------------------------------------------------------

    def events(self, n: int) -> Iterator[Event]:
        """Exactly `n` events in delivery order, made as they are consumed."""
        if self._started:
            raise RuntimeError("a Traffic makes one history; create another for more")
        self._started = True
        rng = self._rng
        dup_cut = self._duplicate_rate
        bad_cut = dup_cut + self._bad_rate
        # Each step adds one to delivered + held (a hold defers one event, a release
        # delivers two), so stopping here and then releasing the held gives exactly n.
        while self._events + len(self._held) < n:
            self._step += 1
            r = rng.random()
            if r < dup_cut and self._recent:
                self._duplicates += 1
                out = [self._recent[int(rng.random() * len(self._recent))]]
            elif r < bad_cut and self._users:
                self._bad += 1
                out = [self._bad_event()]
            else:
                out = self._next_change()
            for event in out:
                self._events += 1
                if not event.bad:
                    self._recent.append(event)
                yield event
        for _, _, entity, entity_id in sorted(self._due):
            held = self._held.pop((entity, entity_id), None)
            if held is not None:  # delivered last, but still in version order
                self._events += 1
                yield held
        self._finished = True

    def expected(self) -> ExpectedState:
        """The target's final state and the counts, once `events` has been consumed."""
        if not self._finished:
            raise RuntimeError("consume all of events(n) before asking for the expected state")
        ids = (self._id_base + 1, self._id_base + max(len(self._users), len(self._orders), 1))
        return ExpectedState(
            users=tuple(canonical_row("user", u.row()) for u in self._users.values()),
            orders=tuple(canonical_row("order", o.row()) for o in self._orders.values()),
            id_range=ids,
            events=self._events,
            changes=self._changes,
            duplicates=self._duplicates,
            late=self._late,
            dead_letters=self._bad,
        )

    # -- one source change ---------------------------------------------------------------

    def _next_change(self) -> list[Event]:
        due = self._due
        while due and (due[0][2], due[0][3]) not in self._held:
            heapq.heappop(due)  # released early by an ordinary pick
        if due and due[0][0] <= self._step:
            _, _, entity, entity_id = heapq.heappop(due)
            if entity == "user":
                return self._update_user(entity_id)
            return self._update_order(entity_id)
        op = _MIX[bisect.bisect(_MIX_CUTS, self._rng.random())]
        if op != "create_user" and not self._live_users:
            op = "create_user"
        if op in ("update_order", "delete_order") and not self._open_orders:
            op = "create_order"
        if op == "create_user":
            return self._create_user()
        if op == "update_user":
            return self._update_user(self._live_users.pick(hot=True))
        if op == "delete_user":
            return self._delete_user(self._live_users.pick(hot=False))
        if op == "create_order":
            return self._create_order(self._live_users.pick(hot=True))
        if op == "update_order":
            return self._update_order(self._open_orders.pick(hot=True))
        return self._delete_order(self._open_orders.pick(hot=False))

    def _create_user(self) -> list[Event]:
        rng = self._rng
        now = self._tick()
        user_id = self._id_base + len(self._users) + 1
        name, slug = self._name()
        email = self._take_email(slug)
        country = _COUNTRIES[int(rng.random() * len(_COUNTRIES))]
        user = _User(user_id, email, name, rng.random() < 0.9, country, now)
        self._users[user_id] = user
        self._live_users.add(user_id)
        return self._emit("user", user_id, 1, "upsert", user.data(), now, can_wait=True)

    def _update_user(self, user_id: int) -> list[Event]:
        rng = self._rng
        user = self._users[user_id]
        now = self._tick()
        r = rng.random()
        if r < 0.35:
            user.name = self._name()[0]
        elif r < 0.55:
            user.active = not user.active
        elif r < 0.7:
            user.country = _COUNTRIES[int(rng.random() * len(_COUNTRIES))]
        else:
            old = user.email
            user.email = self._take_email(old.split("@", 1)[0].rstrip("0123456789"))
            self._free_email(old)
        user.version += 1
        user.updated_at = now
        self._live_users.touch(user_id)
        return self._emit("user", user_id, user.version, "upsert", user.data(), now, can_wait=True)

    def _delete_user(self, user_id: int) -> list[Event]:
        if ("user", user_id) in self._held:
            return self._update_user(user_id)  # a held change is never delivered past a delete
        user = self._users[user_id]
        now = self._tick()
        user.version += 1
        user.deleted_at = now
        self._live_users.remove(user_id)
        self._free_email(user.email)
        return self._emit("user", user_id, user.version, "delete", {"id": user_id}, now)

    def _create_order(self, user_id: int) -> list[Event]:
        rng = self._rng
        now = self._tick()
        order_id = self._id_base + len(self._orders) + 1
        currency = _CURRENCIES[int(rng.random() * len(_CURRENCIES))]
        order = _Order(order_id, user_id, self._money(), currency, now)
        self._orders[order_id] = order
        self._open_orders.add(order_id)
        self._live_users.touch(user_id)
        return self._emit("order", order_id, 1, "upsert", order.data(), now, can_wait=True)

    def _update_order(self, order_id: int) -> list[Event]:
        order = self._orders[order_id]
        now = self._tick()
        r = self._rng.random()
        if order.status == "pending":
            if r < 0.55:
                order.status = "paid"
            elif r < 0.85:
                order.total = self._money()
            else:
                order.status = "cancelled"
        else:  # paid
            order.status = "shipped" if r < 0.85 else "refunded"
        order.version += 1
        order.updated_at = now
        if order.status in _OPEN:
            self._open_orders.touch(order_id)
        else:
            self._open_orders.remove(order_id)
        return self._emit("order", order_id, order.version, "upsert", order.data(), now,
                          can_wait=order.status in _OPEN)  # fmt: skip

    def _delete_order(self, order_id: int) -> list[Event]:
        if ("order", order_id) in self._held:
            return self._update_order(order_id)
        order = self._orders[order_id]
        now = self._tick()
        order.version += 1
        order.deleted_at = now
        self._open_orders.remove(order_id)
        return self._emit("order", order_id, order.version, "delete", {"id": order_id}, now)

    def _emit(
        self,
        entity: Entity,
        entity_id: int,
        version: int,
        op: str,
        data: dict[str, Any],
        now: str,
        *,
        can_wait: bool = False,
    ) -> list[Event]:
        """Encode one source change; deliver it, hold it back, or deliver it and then the
        change it follows (late). `can_wait`: the entity will have another change that
        is not a delete, so holding this one back makes a plain swap."""
        self._changes += 1
        envelope = {
            "event_id": self._uuid(), "entity": entity, "op": op, "version": version,
            "occurred_at": now, "data": data,
        }  # fmt: skip
        key = str(entity_id).encode()
        event = Event(entity, key, _compact(orjson.dumps(envelope)), entity_id, version,
                      zlib.crc32(key) % self._partitions)  # fmt: skip
        held = self._held.pop((entity, entity_id), None)
        if held is not None:
            self._late += 1
            return [event, held]
        if can_wait and self._rng.random() < self._out_of_order_rate:
            self._held[(entity, entity_id)] = event
            gap = 1 + int(self._rng.random() * _MAX_LATE_GAP)
            heapq.heappush(self._due, (self._step + gap, self._step, entity, entity_id))
            return []
        return [event]

    # -- bad messages --------------------------------------------------------------------

    def _bad_event(self) -> Event:
        """A message the service must dead-letter; it changes no source state."""
        rng = self._rng
        r = rng.random()
        if r < 0.25 and self._recent:
            sample = self._recent[int(rng.random() * len(self._recent))]
            return _bad(sample.entity, sample.id, sample.value[: len(sample.value) // 2],
                        self._partitions)  # fmt: skip
        if r < 0.5 and self._live_users:
            user = self._users[self._live_users.pick(hot=False)]
            data = {**user.data(), "email": user.email.replace("@", " at ")}
            return self._bad_envelope("user", "user", user.id, user.version + 1, data)
        if self._orders:
            order = self._orders[1 + self._id_base + int(rng.random() * len(self._orders))]
            if r < 0.75:
                data = {**order.data(), "total": f"-{order.total}"}
                return self._bad_envelope("order", "order", order.id, order.version + 1, data)
            # An order's change on the users topic: the entity does not match the topic.
            return self._bad_envelope("user", "order", order.id, order.version + 1, order.data())
        user = next(iter(self._users.values()))
        return _bad("user", user.id, b"\x00not json", self._partitions)

    def _bad_envelope(
        self, topic_entity: Entity, entity: str, entity_id: int, version: int,
        data: dict[str, Any],
    ) -> Event:  # fmt: skip
        envelope = {
            "event_id": self._uuid(), "entity": entity, "op": "upsert", "version": version,
            "occurred_at": self._stamp(self._now_ms), "data": data,
        }  # fmt: skip
        return _bad(topic_entity, entity_id, _compact(orjson.dumps(envelope)), self._partitions)

    # -- values --------------------------------------------------------------------------

    def _tick(self) -> str:
        """Advance the source clock (by at least 1 ms, so every change has its own time)."""
        self._now_ms += 1 + int(self._rng.random() * 40)
        return self._stamp(self._now_ms)

    def _stamp(self, ms: int) -> str:
        second, milli = divmod(ms, 1000)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{milli:03d}Z"

    def _uuid(self) -> str:
        """A random (version 4) UUID from the seeded generator; formatted by hand, as
        `uuid.UUID` costs more than the rest of an event."""
        h = f"{self._rng.getrandbits(128) ^ self._event_id_salt:032x}"
        variant = "89ab"[int(h[16], 16) & 3]
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"

    def _name(self) -> tuple[str, str]:
        rng = self._rng
        first, first_slug = _FIRST[int(rng.random() * len(_FIRST))]
        last, last_slug = _LAST[int(rng.random() * len(_LAST))]
        return f"{first} {last}", f"{first_slug}.{last_slug}"

    def _take_email(self, slug: str) -> str:
        """A free email: often one a deleted or renamed user gave up, else a new one."""
        rng = self._rng
        freed = self._freed
        if freed and rng.random() < _REUSE_EMAIL:
            index = int(rng.random() * len(freed))
            freed[index], freed[-1] = freed[-1], freed[index]
            email = freed.pop()
        else:
            self._email_serial += 1
            email = f"{slug}{self._email_serial}@{_DOMAINS[self._email_serial % len(_DOMAINS)]}"
        return email

    def _free_email(self, email: str) -> None:
        self._freed.append(email)

    def _money(self) -> str:
        cents = 100 + int(self._rng.random() * 49_900)
        return f"{cents // 100}.{cents % 100:02d}"


def _bad(entity: Entity, entity_id: int, value: bytes, partitions: int) -> Event:
    key = str(entity_id).encode()
    return Event(entity, key, value, entity_id, -1, zlib.crc32(key) % partitions, bad=True)
