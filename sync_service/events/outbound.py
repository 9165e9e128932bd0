"""Outbound events (CONTRACT section 4): what the relay publishes for each applied change,
and the snapshots `sync-service republish` writes (the current state of a row, re-sent).

The downstream `event_id` of a change is a UUIDv5 of the inbound one, so a change keeps
its id however often it is replayed; a snapshot's is a UUIDv5 of the operator action that
re-sent it and the row's key and version.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from sync_service.events.change import Change, Entity

EVENT_ID_NAMESPACE = uuid.UUID("8d7f0c52-3b0e-5d61-9a47-2f6c1e8b4a90")
_NAMESPACE_SHA1 = hashlib.sha1(EVENT_ID_NAMESPACE.bytes)
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}

EventType = Literal[
    "user.upserted",
    "user.deleted",
    "order.upserted",
    "order.deleted",
    "user.snapshot",
    "order.snapshot",
]


class SourceRef(BaseModel):
    """The inbound record an outbound event was made from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str
    partition: int
    offset: int
    event_id: uuid.UUID


class OutboundEvent(BaseModel):
    """The value of a message on `sync.users` / `sync.orders`; the key is `aggregate_id`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: uuid.UUID
    type: EventType
    aggregate_id: str
    version: int
    occurred_at: datetime
    data: dict[str, Any]
    """The row as stored right after the change: money as a decimal string, times in
    RFC 3339, and `deleted_at` set on a delete. A snapshot carries the row as stored when
    it was re-sent (`deleted_at` set if the row is deleted)."""
    source: SourceRef | None
    """The inbound record of the change; null on a snapshot, which re-sends stored state."""


def downstream_event_id(inbound_event_id: uuid.UUID) -> uuid.UUID:
    """The downstream id of a change: the same inbound event always maps to the same id,
    `uuid.uuid5(EVENT_ID_NAMESPACE, str(inbound_event_id))`."""
    return uuid.UUID(downstream_event_text(inbound_event_id))


def downstream_event_text(inbound_event_id: uuid.UUID) -> str:
    """`str(downstream_event_id(...))`, without building UUID objects or hashing the
    namespace again: this runs once per applied change. In the hex digest, the version
    nibble (13th) becomes 5 and the variant nibble (17th) gets RFC 4122's 10xx bits."""
    sha = _NAMESPACE_SHA1.copy()
    # orjson writes a UUID in its canonical text, as str() does, in C: a third of the cost.
    sha.update(orjson.dumps(inbound_event_id)[1:-1])
    h = sha.hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


_EVENT_TYPES: dict[tuple[str, str], EventType] = {
    ("user", "upsert"): "user.upserted",
    ("user", "delete"): "user.deleted",
    ("order", "upsert"): "order.upserted",
    ("order", "delete"): "order.deleted",
}


def event_type(change: Change) -> EventType:
    """`user.upserted`, `order.deleted`, ..."""
    return _EVENT_TYPES[change.entity, change.op]


def outbound_value(
    change: Change,
    row: dict[str, Any],
    event_id: uuid.UUID | str | None = None,
    kind: EventType | None = None,
    aggregate_id: str | None = None,
) -> dict[str, Any]:
    """The outbound event as a plain dict, ready for orjson (built without a model, since
    this runs once per applied change; a test checks it against `OutboundEvent`). A writer
    that has the event's id, type or aggregate id at hand for its own columns passes them."""
    source = change.source
    return {
        "event_id": event_id or downstream_event_id(change.event_id),
        "type": kind or event_type(change),
        "aggregate_id": aggregate_id or str(change.id),
        "version": change.version,
        "occurred_at": change.occurred_at,
        "data": row,
        "source": {
            "topic": source.topic,
            "partition": source.partition,
            "offset": source.offset,
            "event_id": change.event_id,
        },
    }


def snapshot_event_id(action_id: int, entity: Entity, entity_id: int, version: int) -> str:
    """The id of a snapshot re-sent by operator action `action_id`: the same row at the
    same version re-sent by another action is another event."""
    return str(
        uuid.uuid5(EVENT_ID_NAMESPACE, f"snapshot:{action_id}:{entity}:{entity_id}:{version}")
    )


def snapshot_value(
    entity: Entity, row: dict[str, Any], event_id: str, occurred_at: datetime
) -> dict[str, Any]:
    """A snapshot event as a plain dict: `row` is the stored row (with `version` and
    `deleted_at`), `occurred_at` the time it was read."""
    return {
        "event_id": event_id,
        "type": f"{entity}.snapshot",
        "aggregate_id": str(row["id"]),
        "version": row["version"],
        "occurred_at": occurred_at,
        "data": row,
        "source": None,
    }
