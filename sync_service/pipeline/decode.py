"""Decode and validate one Kafka record into a `Change`, or say why it is a dead letter.

Nothing raises out of `decode`: every record becomes exactly one of the two, so a bad
message can never stop the partition behind it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, cast

import orjson
from pydantic import TypeAdapter, ValidationError

from sync_service.events.change import Change, DeadLetter, Entity, Skipped, Source
from sync_service.events.inbound import MONEY, ORDER_ENVELOPE, USER_ENVELOPE, Envelope

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
    brackets = value.count(b"{") + value.count(b"[")  # a bound on the depth, at C speed
    if brackets > limits.max_depth or b"NaN" in value or b"Infinity" in value:
        _check_json(value, limits.max_depth)
    try:
        envelope = _ADAPTERS[entity].validate_json(value)
    except ValidationError as exc:
        raise _diagnose(entity, source, value, exc) from None
    if envelope["entity"] == "order" and envelope["op"] == "upsert":
        _check_exact_total(value)
    entity_id: int = envelope["data"]["id"]
    if key is None:
        raise InvalidMessage("bad_key", f"missing key: expected b'{entity_id}'")
    if key != str(entity_id).encode():
        shown = key[:40].decode("utf-8", "replace")
        raise InvalidMessage("bad_key", f"key {shown!r} does not match data.id {entity_id}")
    return _change(entity, envelope, source)


def _strict_json(value: bytes) -> Any:
    """`value` parsed as RFC 8259 JSON (orjson: no NaN or Infinity, unlike pydantic-core)."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("not_json", f"not UTF-8 JSON: {exc}") from None


def _check_json(value: bytes, limit: int) -> None:
    """What pydantic-core's reader lets through: NaN and Infinity (not JSON), and depth."""
    if _depth_exceeds(_strict_json(value), limit):
        raise InvalidMessage("too_deep", f"JSON nests deeper than {limit} levels")


def _diagnose(entity: Entity, source: Source, value: bytes, exc: ValidationError) -> InvalidMessage:
    """Why an envelope failed, in the words of the kind of fault (slow: failures only)."""
    try:
        parsed = _strict_json(value)
    except InvalidMessage as not_json:
        return not_json
    if not isinstance(parsed, dict):
        return InvalidMessage("invalid", "the envelope must be a JSON object")
    got = parsed.get("entity")
    if got != entity:
        return InvalidMessage(
            "wrong_entity", f"entity {got!r} on topic {source.topic}, which carries {entity!r}"
        )
    return InvalidMessage("invalid", _summarize(exc))


_EXACT_TOTAL = re.compile(rb'"total"\s*:\s*(?:"|[0-9]{1,13}(?:\.[0-9]{1,2})?(?![0-9.eE]))')
"""A total that pydantic-core read exactly: a string, or a plain number of at most 15
digits (a float holds any such number exactly)."""


def _check_exact_total(value: bytes) -> None:
    """pydantic-core reads a JSON number through a float, so `19.999999999999999999` would
    pass as 20.00: unless the only `"total"` in `value` is plainly exact, read the total
    again as a decimal and validate that."""
    at = value.find(b'"total"')
    only = at >= 0 and value.find(b'"total"', at + 7) < 0
    if only and (value[at + 7 : at + 9] == b':"' or _EXACT_TOTAL.match(value, at)):
        return
    total = json.loads(value, parse_float=Decimal)["data"]["total"]
    if not isinstance(total, Decimal):  # an integer or a string: read exactly
        return
    try:
        MONEY.validate_python(total)
    except ValidationError as exc:
        raise InvalidMessage("invalid", f"data.total: {exc.errors()[0]['msg']}") from None


def _change(entity: Entity, envelope: Envelope, source: Source) -> Change:
    data = envelope["data"]
    row: dict[str, Any] | None = None
    if envelope["op"] == "upsert":
        row = cast(dict[str, Any], data)  # the validated dict itself: nothing else holds it
        if entity == "user":
            row.setdefault("country", None)
    return Change(  # positionally: keywords double the cost of building the tuple
        entity,
        data["id"],
        envelope["version"],
        envelope["op"],
        envelope["event_id"],
        envelope["occurred_at"],
        row,
        source,
        envelope,
    )


def envelope_document(change: Change) -> Any:
    """The change's envelope as JSON-ready values, to be stored while it waits."""
    return _ADAPTERS[change.entity].dump_python(change.envelope, mode="json")


def change_from_envelope(entity: Entity, envelope: dict[str, Any], source: Source) -> Change:
    """Rebuild a change stored while it waited (its envelope was valid when stored)."""
    return _change(entity, _ADAPTERS[entity].validate_json(orjson.dumps(envelope)), source)


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


class Decoder(Protocol):
    """What turns one record of an inbound topic into a change, a dead letter, or (for a
    record that holds no change by design) a skip."""

    def __call__(
        self,
        *,
        entity: Entity,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        limits: Limits,
    ) -> Change | DeadLetter | Skipped: ...


def decoder_for(inbound_format: str) -> Decoder:
    """The decoder of `SYNC_INBOUND_FORMAT`, chosen once wherever records are decoded."""
    if inbound_format == "debezium":
        from sync_service.pipeline.decode_debezium import decode as decode_debezium

        return decode_debezium
    return decode
