"""Our native envelopes as the peer's input: Debezium change events, JSON with schemas.

One native event becomes exactly one peer record with the same key, row image and
version, so both systems get the same events; money and times stay exact on the way.

The format is Debezium's own envelope (`before`/`after`/`op`, value schema named
`<topic>.Envelope`), which the JDBC sink consumes natively, serialised the way Kafka
Connect's `JsonConverter` reads it with `schemas.enable=true` (the sink needs schemas
and no schema registry is reachable here):

- key: `{"schema": <struct id:int64>, "payload": {"id": 42}}`, for `primary.key.mode=record_key`;
- upsert: `op` "u", `after` = the row (`data` plus `version`), `before` null;
- delete: `op` "d", `before` = `{"id", "version"}`, `after` null (`delete.enabled=true`);
- money: Connect's `Decimal` logical type (scale 2): base64 of the unscaled integer, exact;
- times: Debezium's `ZonedTimestamp` (RFC 3339 text with its offset), passed through as is.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from decimal import Decimal
from typing import Any, Final, Literal, TypeVar

import orjson

Entity = Literal["user", "order"]

_MONEY_SCALE: Final = 2
_CENT: Final = Decimal(1).scaleb(-_MONEY_SCALE)


def _field(field: str, kind: str, *, optional: bool = True, **extra: Any) -> dict[str, Any]:
    return {"field": field, "type": kind, "optional": optional, **extra}


def _zoned(field: str) -> dict[str, Any]:
    return _field(field, "string", name="io.debezium.time.ZonedTimestamp", version=1)


def _money(field: str) -> dict[str, Any]:
    parameters = {"scale": str(_MONEY_SCALE), "connect.decimal.precision": "14"}
    return _field(
        field,
        "bytes",
        name="org.apache.kafka.connect.data.Decimal",
        version=1,
        parameters=parameters,
    )


def _columns(entity: Entity) -> list[dict[str, Any]]:
    """The row's fields, in the target's column order; only the key and version are required."""
    if entity == "user":
        middle = [
            _field("email", "string"),
            _field("name", "string"),
            _field("active", "boolean"),
            _field("country", "string"),
        ]
    else:
        middle = [
            _field("user_id", "int64"),
            _money("total"),
            _field("currency", "string"),
            _field("status", "string"),
        ]
    return [
        _field("id", "int64", optional=False),
        *middle,
        _zoned("created_at"),
        _zoned("updated_at"),
        _field("version", "int64", optional=False),
    ]


def _row_struct(entity: Entity, topic: str, field: str) -> dict[str, Any]:
    return _field(field, "struct", name=f"{topic}.Value", fields=_columns(entity))


def envelope_schema(entity: Entity, topic: str) -> dict[str, Any]:
    """The value schema: Debezium's envelope, recognised by its name `<topic>.Envelope`."""
    return {
        "type": "struct",
        "optional": False,
        "name": f"{topic}.Envelope",
        "fields": [
            _row_struct(entity, topic, "before"),
            _row_struct(entity, topic, "after"),
            {"field": "op", "type": "string", "optional": False},
        ],
    }


def key_schema(topic: str) -> dict[str, Any]:
    return {
        "type": "struct",
        "optional": False,
        "name": f"{topic}.Key",
        "fields": [{"field": "id", "type": "int64", "optional": False}],
    }


def money(value: str | int | float) -> str:
    """Connect's Decimal as JsonConverter writes it: base64 of the big-endian two's-complement
    unscaled integer. A float from orjson came from a JSON number of at most 14 digits, so
    its shortest repr is that number's text again."""
    amount = Decimal(repr(value) if isinstance(value, float) else value)
    unscaled = amount.scaleb(_MONEY_SCALE)
    if unscaled != unscaled.to_integral_value():
        raise ValueError(f"money with more than {_MONEY_SCALE} decimal places: {value!r}")
    number = int(unscaled)
    raw = number.to_bytes((number.bit_length() + 8) // 8, "big", signed=True)
    return base64.b64encode(raw).decode()


def decode_money(text: str) -> Decimal:
    """The inverse of `money`, for checks."""
    unscaled = int.from_bytes(base64.b64decode(text), "big", signed=True)
    return Decimal(unscaled) * _CENT


class PeerEncoder:
    """Encodes native envelopes for the peer's two topics; the schemas are serialised once."""

    def __init__(self, users_topic: str = "peer.users", orders_topic: str = "peer.orders"):
        self.topics: dict[Entity, str] = {"user": users_topic, "order": orders_topic}
        self._value_head = {
            entity: b'{"schema":' + orjson.dumps(envelope_schema(entity, topic)) + b',"payload":'
            for entity, topic in self.topics.items()
        }
        self._key_head = {
            entity: b'{"schema":' + orjson.dumps(key_schema(topic)) + b',"payload":{"id":'
            for entity, topic in self.topics.items()
        }

    def encode(self, event_value: bytes) -> tuple[str, bytes, bytes]:
        """(peer topic, key, value) for one native envelope (already valid: the benchmark's
        generator made it)."""
        event = orjson.loads(event_value)
        entity: Entity = event["entity"]
        data: dict[str, Any] = event["data"]
        entity_id = int(data["id"])
        if event["op"] == "delete":
            payload = {
                "before": {"id": entity_id, "version": event["version"]},
                "after": None,
                "op": "d",
            }
        else:
            row = {name: data.get(name) for name in _ROW_FIELDS[entity]}
            if entity == "order":
                row["total"] = money(data["total"])
            row["version"] = event["version"]
            payload = {"before": None, "after": row, "op": "u"}
        key = self._key_head[entity] + str(entity_id).encode() + b"}}"
        value = self._value_head[entity] + orjson.dumps(payload) + b"}"
        return self.topics[entity], key, value


_ROW_FIELDS: Final[dict[Entity, tuple[str, ...]]] = {
    entity: tuple(f["field"] for f in _columns(entity) if f["field"] != "version")
    for entity in ("user", "order")
}

_DEFAULT = PeerEncoder()


def encode_for_peer(event_value: bytes) -> tuple[bytes, bytes]:
    """(key, value) of the peer record for one native envelope, for the default topics
    `peer.users` / `peer.orders` (the entity picks the topic: see `PeerEncoder.encode`)."""
    _, key, value = _DEFAULT.encode(event_value)
    return key, value


T = TypeVar("T")


def in_version_order(
    events: Sequence[T], key: Callable[[T], Hashable], version: Callable[[T], int]
) -> list[T]:
    """The same events with each key's events sorted by version, in the slots that key had.

    The JDBC sink has no version guard: it applies events in arrival order, so an
    out-of-order event would leave an older row behind. Feeding it each key's events in
    version order (a stable sort, so duplicates stay and re-apply harmlessly) gives it the
    same event count and interleaving, and the same final state as a version-guarded sink.
    """
    slots: dict[Hashable, list[int]] = defaultdict(list)
    for index, event in enumerate(events):
        slots[key(event)].append(index)
    ordered: list[T] = list(events)
    for indexes in slots.values():
        for index, event in zip(
            indexes, sorted((events[i] for i in indexes), key=version), strict=True
        ):
            ordered[index] = event
    return ordered
