"""Decide, for one batch, what each entity's row becomes and which changes must wait.

Pure and synchronous: given the batch, the waiting changes and the stored rows, `plan`
returns the writes. Invariants it keeps (the property tests check them):
- per entity, changes apply in version order; one whose version is not above the stored
  one changes nothing (stale or duplicate);
- an entity's changes wait *as a whole* when its final state would break a source rule
  (an order whose user has no row yet; an email another live user still holds), and once
  one change of an entity waits, every later change of it waits behind;
- every change that applies yields one `Applied`, with the row as it stood right after it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple

from sync_service.events.change import Change, Entity

USER_COLUMNS = (
    "id", "email", "name", "active", "country", "created_at", "updated_at", "version",
    "deleted_at",
)  # fmt: skip
ORDER_COLUMNS = (
    "id", "user_id", "total", "currency", "status", "created_at", "updated_at", "version",
    "deleted_at",
)  # fmt: skip
COLUMNS: Mapping[Entity, tuple[str, ...]] = {"user": USER_COLUMNS, "order": ORDER_COLUMNS}

Row = dict[str, Any]
Key = tuple[Entity, int]
PendingKey = tuple[Entity, int, int]


class Applied(NamedTuple):
    """A change that advanced its entity, and the row right after it (a named tuple, like
    `Change`: one is made per applied change, and a tuple is built several times faster
    than a frozen dataclass)."""

    change: Change
    row: Row


@dataclass(frozen=True, slots=True)
class Waiting:
    """A change that cannot apply yet: `blocked_by` is the user whose arrival or change
    it waits for (the order's user, or the user holding the email)."""

    change: Change
    reason: str
    blocked_by: int


@dataclass(slots=True)
class Plan:
    """The writes of one batch; rows are complete, in the tables' column order."""

    rows: dict[Entity, list[Row]] = field(default_factory=lambda: {"user": [], "order": []})
    applied: list[Applied] = field(default_factory=list)
    """Users' first, then orders'."""
    applied_by_entity: dict[Entity, int] = field(default_factory=lambda: {"user": 0, "order": 0})
    wait: list[Waiting] = field(default_factory=list)
    """Changes not yet pending that must wait now."""
    unpend: list[PendingKey] = field(default_factory=list)
    """Pending changes that applied or turned out stale."""
    stale: list[Change] = field(default_factory=list)


@dataclass(slots=True)
class _Chain:
    changes: list[Change]
    after: list[Row]

    @property
    def final(self) -> Row:
        return self.after[-1]


@dataclass(frozen=True, slots=True)
class Needs:
    """The stored rows `plan` needs for some changes: the users and orders they touch, the
    users their orders refer to, and the live holders of the emails their users want."""

    user_ids: frozenset[int]
    order_ids: frozenset[int]
    emails: frozenset[str]


def needs(changes: Iterable[Change]) -> Needs:
    user_ids: set[int] = set()
    order_ids: set[int] = set()
    emails: set[str] = set()
    add_user, add_order, add_email = user_ids.add, order_ids.add, emails.add  # per change
    for change in changes:
        row = change.row
        if change.entity == "user":
            add_user(change.id)
            if row is not None:
                add_email(row["email"])
        else:
            add_order(change.id)
            if row is not None:
                add_user(row["user_id"])
    return Needs(frozenset(user_ids), frozenset(order_ids), frozenset(emails))


def plan(
    incoming: Iterable[Change],
    pending: Iterable[Change],
    stored: Mapping[Entity, Mapping[int, Row]],
) -> Plan:
    """Plan a batch. `stored` must hold, for users, every row of an id in the batch or
    the waiting changes, every live holder of an email they want, and every user an
    order refers to; for orders, every row of an id in the batch or the waiting ones."""
    result = Plan()
    pending = list(pending)
    pending_keys = {_pkey(c) for c in pending}
    by_id: dict[Entity, dict[int, list[Change]]] = {"user": {}, "order": {}}
    for change in [*pending, *incoming]:  # pending first: a duplicate keeps its first copy
        of_entity = by_id[change.entity]
        same = of_entity.get(change.id)
        if same is None:
            of_entity[change.id] = [change]
        else:
            same.append(change)

    chains: dict[Entity, dict[int, _Chain]] = {"user": {}, "order": {}}
    for entity, grouped in by_id.items():
        stored_rows, entity_chains = stored[entity], chains[entity]
        for entity_id, changes in grouped.items():
            prior = stored_rows.get(entity_id)
            first = changes[0]
            if len(changes) == 1 and (data := first.row) is not None and not first.snapshot:
                # The common case, inline: one upsert (newer than the stored row, or stale).
                version = first.version
                if prior is None or version > prior["version"]:
                    row = {**data, "version": version, "deleted_at": None}
                    entity_chains[entity_id] = _Chain(changes, [row])
                    continue
            chain = _chain(entity, entity_id, changes, prior, pending_keys, result)
            if chain is not None:
                entity_chains[entity_id] = chain

    waiting = _settle_emails(chains["user"], stored["user"])
    waiting_orders: dict[int, tuple[str, int]] = {}
    for order_id, chain in chains["order"].items():
        user_id = chain.after[-1]["user_id"]  # a tombstone of an unseen order has none
        prior = stored["order"].get(order_id)
        if user_id is None or user_id in stored["user"]:
            continue
        if prior is not None and prior["user_id"] == user_id:
            continue  # the stored row already refers to this user, so it has a row
        if user_id not in chains["user"] or user_id in waiting:
            waiting_orders[order_id] = (f"user {user_id} has not arrived yet", user_id)

    blocked: dict[Entity, dict[int, tuple[str, int]]] = {"user": waiting, "order": waiting_orders}
    applied = result.applied
    for entity, reasons in blocked.items():
        rows = result.rows[entity]
        applied_before = len(applied)
        for entity_id, chain in chains[entity].items():
            if reasons and entity_id in reasons:
                why = reasons[entity_id]
                result.wait.extend(
                    Waiting(c, *why) for c in chain.changes if _pkey(c) not in pending_keys
                )
                continue
            after = chain.after
            rows.append(after[-1])
            if len(after) == 1:
                applied.append(Applied(chain.changes[0], after[0]))
            else:
                applied.extend(map(Applied, chain.changes, after))
            if pending_keys:
                result.unpend.extend(k for k in map(_pkey, chain.changes) if k in pending_keys)
        result.applied_by_entity[entity] = len(applied) - applied_before
    return result


def _chain(
    entity: Entity,
    entity_id: int,
    changes: list[Change],
    prior: Row | None,
    pending_keys: set[PendingKey],
    result: Plan,
) -> _Chain | None:
    """Order an entity's changes by version, set stale ones aside, and compute the row
    after each of the rest (a delete keeps the last known columns and sets deleted_at)."""
    stored_version = prior["version"] if prior is not None else -1
    first = changes[0]
    if len(changes) == 1 and first.version > stored_version and not first.snapshot:
        live = changes  # the common case
    else:
        live = []
        last = stored_version
        for change in sorted(changes, key=_version):  # stable: the first copy comes first
            if change.snapshot and _unchanged(entity, change, live[-1].row if live else prior):
                result.stale.append(change)  # a snapshot read of the row as it is stored
                if _pkey(change) in pending_keys:
                    result.unpend.append(_pkey(change))
                continue
            if change.version <= last:
                result.stale.append(change)
                # A waiting change overtaken by the stored row is done; a copy of one that
                # still waits (a redelivery) must leave it waiting.
                if change.version <= stored_version and _pkey(change) in pending_keys:
                    result.unpend.append(_pkey(change))
                continue
            last = change.version
            live.append(change)
        if not live:
            return None
    after: list[Row] = []
    previous = prior
    for change in live:
        if change.row is not None:
            row = {**change.row, "version": change.version, "deleted_at": None}
        else:
            base = previous if previous is not None else dict.fromkeys(COLUMNS[entity])
            row = {**base, "id": entity_id, "version": change.version}
            row["deleted_at"] = change.occurred_at
        after.append(row)
        previous = row
    return _Chain(live, after)


def _unchanged(entity: Entity, change: Change, before: Row | None) -> bool:
    """True when `change` would leave the live row `before` as it is."""
    if before is None or change.row is None or before.get("deleted_at") is not None:
        return False
    row = change.row
    return all(row.get(c) == before.get(c) for c in COLUMNS[entity][:-2])  # not version...


def _settle_emails(
    chains: Mapping[int, _Chain], stored: Mapping[int, Row]
) -> dict[int, tuple[str, int]]:
    """The user ids whose changes must wait because their final email would be shared
    by two live users (with the reason and the holder); settles to a fixpoint, since a
    user that waits keeps its stored email, which another user may want."""
    waiting: dict[int, tuple[str, int]] = {}
    while True:
        holders: dict[str, list[int]] = defaultdict(list)
        for user_id, row in stored.items():
            if (user_id not in chains or user_id in waiting) and _live_email(row):
                holders[row["email"]].append(user_id)
        for user_id, chain in chains.items():
            if user_id not in waiting and _live_email(chain.final):
                holders[chain.final["email"]].append(user_id)
        newly: dict[int, tuple[str, int]] = {}
        for email, ids in holders.items():
            if len(ids) < 2:
                continue
            # Whoever already holds the email keeps it; the newcomers wait.
            keepers = [i for i in ids if i in stored and _holds(stored[i], email)]
            for user_id in ids:
                if user_id in chains and user_id not in waiting and user_id not in keepers:
                    holder = next(i for i in keepers or ids if i != user_id)
                    newly[user_id] = (f"email {email} is held by user {holder}", holder)
        if not newly:
            return waiting
        waiting.update(newly)


def _holds(row: Row, email: str) -> bool:
    return _live_email(row) and row["email"] == email


def _live_email(row: Row) -> bool:
    return row["deleted_at"] is None and row["email"] is not None


_version = attrgetter("version")
"""A change's version, as a sort key (in C: no Python call per comparison)."""


def _pkey(change: Change) -> PendingKey:
    return (change.entity, change.id, change.version)
