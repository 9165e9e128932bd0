"""An in-memory target that loads and applies a `Plan` the way `BatchWriter` does.

It checks the target's rules like PostgreSQL would: a row only moves to a higher version,
`orders.user_id` has a `users` row at once, and at commit no two live users share an email.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson

from sync_service.events.change import Change, Entity
from sync_service.pipeline.decode import decode
from sync_service.pipeline.plan import Plan, Row, Waiting, needs, plan
from tests.histories import LIMITS, TOPICS, VersionKey

REQUIRED: dict[Entity, tuple[str, ...]] = {
    "user": ("email", "name", "active", "created_at", "updated_at"),
    "order": ("user_id", "total", "currency", "status", "created_at", "updated_at"),
}


class RuleBroken(AssertionError):
    """The target would refuse this write (a constraint, or a row that does not advance)."""


def decoded(envelope: dict[str, Any], *, partition: int = 0, offset: int = 0) -> Change:
    """The change a consumer decodes from `envelope` (which must be valid)."""
    entity = envelope["entity"]
    result = decode(
        entity=entity,
        topic=TOPICS[entity],
        partition=partition,
        offset=offset,
        key=str(envelope["data"]["id"]).encode(),
        value=orjson.dumps(envelope),
        limits=LIMITS,
    )
    assert isinstance(result, Change), result
    return result


def pending_key(change: Change) -> VersionKey:
    return (change.entity, change.id, change.version)


class FakeTarget:
    """One consumer that owns every partition, with a pending-load limit never reached."""

    def __init__(self) -> None:
        self.tables: dict[Entity, dict[int, Row]] = {"user": {}, "order": {}}
        self.pending: dict[VersionKey, Waiting] = {}
        self.outbox: list[tuple[Change, Row]] = []

    def write(self, incoming: Sequence[Change], *, sweep: bool = False) -> Plan:
        """Plan `incoming` with the waiting changes and the rows `BatchWriter` loads, then
        apply the plan as one transaction would."""
        pending = self.load_pending(incoming, sweep)
        result = plan(incoming, pending, self.load([*pending, *incoming]))
        self.apply(result)
        return result

    def load_pending(self, incoming: Sequence[Change], sweep: bool) -> list[Change]:
        """What `write._load_pending` reads, always whole entities: those in the batch,
        those with a change blocked by a user in the batch, and on a sweep all of them."""
        users = {c.id for c in incoming if c.entity == "user"}
        entities = {(c.entity, c.id) for c in incoming} | {
            (w.change.entity, w.change.id) for w in self.pending.values() if w.blocked_by in users
        }
        return [
            w.change
            for w in self.pending.values()
            if sweep or (w.change.entity, w.change.id) in entities
        ]

    def load(self, changes: Sequence[Change]) -> dict[Entity, dict[int, Row]]:
        """What `write._load_stored` reads: the rows of the changes' ids, the users their
        orders refer to, and the live holders of the emails their users want (copies, so
        that the planner cannot alter the tables)."""
        wanted = needs(changes)
        user_ids, order_ids, emails = wanted.user_ids, wanted.order_ids, wanted.emails
        users, orders = self.tables["user"], self.tables["order"]
        return {
            "user": {
                i: dict(row)
                for i, row in users.items()
                if i in user_ids or (row["deleted_at"] is None and row["email"] in emails)
            },
            "order": {i: dict(row) for i, row in orders.items() if i in order_ids},
        }

    def apply(self, todo: Plan) -> None:
        for entity in ("user", "order"):  # users first: orders refer to them
            table = self.tables[entity]
            for row in todo.rows[entity]:
                held = table.get(row["id"])
                if held is not None and held["version"] >= row["version"]:
                    raise RuleBroken(
                        f"{entity} {row['id']}: v{row['version']} does not advance"
                        f" v{held['version']}"
                    )
                if entity == "order" and row["user_id"] not in (None, *self.tables["user"]):
                    raise RuleBroken(f"order {row['id']}: user {row['user_id']} has no row")
                table[row["id"]] = dict(row)
        entities = [a.change.entity for a in todo.applied]
        if entities != sorted(entities, reverse=True) or todo.applied_by_entity != {
            "user": entities.count("user"),
            "order": entities.count("order"),
        }:
            raise RuleBroken(f"applied {entities} miscounted as {todo.applied_by_entity}")
        self.outbox.extend((a.change, a.row) for a in todo.applied)
        for key in todo.unpend:
            self.pending.pop(key, None)
        for waiting in todo.wait:
            self.pending.setdefault(pending_key(waiting.change), waiting)  # ON CONFLICT DO NOTHING
        self.check_rules()

    def check_rules(self) -> None:
        """The constraints that PostgreSQL checks at commit."""
        live = [row for row in self.tables["user"].values() if row["deleted_at"] is None]
        shared = {e: n for e, n in Counter(row["email"] for row in live).items() if n > 1}
        if shared:
            raise RuleBroken(f"live users share an email: {shared}")
        for entity, columns in REQUIRED.items():
            for row in self.tables[entity].values():
                missing = [c for c in columns if row["deleted_at"] is None and row[c] is None]
                if missing:
                    raise RuleBroken(f"live {entity} {row['id']} lacks {missing}")
