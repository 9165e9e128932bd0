"""Decode and validate one Kafka record into a `Change`, or say why it is a dead letter.

Nothing raises out of `decode`: every record becomes exactly one of the two, so a bad
message can never stop the partition behind it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from sync_service.events.change import Change, DeadLetter, Entity, Source
from sync_service.events.inbound import (
    ORDER_ENVELOPE,
    USER_ENVELOPE,
    OrderDelete,
    OrderUpsert,
    UserDelete,
    UserUpsert,
)

_ADAPTERS: dict[Entity, TypeAdapter[Any]] = {"user": USER_ENVELOPE, "order": ORDER_ENVELOPE}


@dataclass(frozen=True, slots=True)
class Limits:
    """What a record may weigh before it is parsed, and how deep its JSON may nest."""

    max_bytes: int
    max_depth: int
    dead_letter_value_bytes: int


class InvalidMessage(Exception):
    """The record itself is at fault: `kind` labels the metric, the message says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def decode(
    *,
    entity: Entity,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    limits: Limits,
) -> Change | DeadLetter:
    """Turn the record at `offset` of a topic that carries `entity` into a change."""
    source = Source(topic, partition, offset)
    try:
        return _decode(entity, source, key, value, limits)
    except InvalidMessage as exc:
        size = len(value) if value is not None else 0
        kept = value[: limits.dead_letter_value_bytes] if value is not None else None
        return DeadLetter(source, key, kept, size, exc.kind, str(exc))


def _decode(
    entity: Entity, source: Source, key: bytes | None, value: bytes | None, limits: Limits
) -> Change:
    if value is None or not value:
        raise InvalidMessage("empty", "empty value: a change event must be a JSON envelope")
    if len(value) > limits.max_bytes:
        raise InvalidMessage(
            "oversized", f"value is {len(value)} bytes, over the {limits.max_bytes}-byte limit"
        )
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("not_json", f"not UTF-8 JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidMessage("invalid", "the envelope must be a JSON object")
    brackets = value.count(b"{") + value.count(b"[")  # a bound on the depth, at C speed
    if brackets > limits.max_depth and _depth_exceeds(parsed, limits.max_depth):
        raise InvalidMessage("too_deep", f"JSON nests deeper than {limits.max_depth} levels")
    data = parsed.get("data")
    if isinstance(data, dict) and isinstance(data.get("total"), float):
        # orjson reads 12.345 as a float; read the numbers again as exact decimals (money
        # is the one field where a fraction is valid, so it is the one to look at).
        parsed = json.loads(value, parse_float=Decimal)
    got = parsed.get("entity")
    if got != entity:
        raise InvalidMessage(
            "wrong_entity", f"entity {got!r} on topic {source.topic}, which carries {entity!r}"
        )
    try:
        envelope = _ADAPTERS[entity].validate_python(parsed)
    except ValidationError as exc:
        raise InvalidMessage("invalid", _summarize(exc)) from None
    entity_id: int = envelope.data.id
    if key is None:
        raise InvalidMessage("bad_key", f"missing key: expected b'{entity_id}'")
    if key != str(entity_id).encode():
        shown = key[:40].decode("utf-8", "replace")
        raise InvalidMessage("bad_key", f"key {shown!r} does not match data.id {entity_id}")
    return _change(entity, envelope, source)


def _change(
    entity: Entity, envelope: UserUpsert | UserDelete | OrderUpsert | OrderDelete, source: Source
) -> Change:
    # The validated fields as they are (a model's __dict__ holds exactly them), cheaper
    # than model_dump for a flat model.
    row = dict(envelope.data.__dict__) if envelope.op == "upsert" else None
    return Change(
        entity=entity,
        id=envelope.data.id,
        version=envelope.version,
        op=envelope.op,
        event_id=envelope.event_id,
        occurred_at=envelope.occurred_at,
        row=row,
        source=source,
        envelope=envelope,
    )


def change_from_envelope(entity: Entity, envelope: dict[str, Any], source: Source) -> Change:
    """Rebuild a change stored while it waited (its envelope was valid when stored)."""
    return _change(entity, _ADAPTERS[entity].validate_python(envelope), source)


def _depth_exceeds(node: Any, limit: int) -> bool:
    """True when containers nest deeper than `limit` (the envelope itself is level 1)."""
    stack: list[tuple[Any, int]] = [(node, 1)]  # iterative: no recursion limit to hit
    while stack:
        current, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(current, dict):
            stack.extend((v, depth + 1) for v in current.values() if isinstance(v, dict | list))
        elif isinstance(current, list):
            stack.extend((v, depth + 1) for v in current if isinstance(v, dict | list))
    return False


def _summarize(exc: ValidationError, most: int = 3) -> str:
    """One line that names each failing field, e.g. `data.email: value is not a valid ...`."""
    parts = []
    for error in exc.errors()[:most]:
        # The discriminated union prefixes the op tag ("upsert.data.email"); drop it.
        loc = [str(p) for p in error["loc"] if p not in ("upsert", "delete")]
        parts.append(f"{'.'.join(loc) or 'envelope'}: {error['msg']}")
    more = exc.error_count() - most
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
