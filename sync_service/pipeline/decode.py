"""Decode and validate one Kafka record into a `Change`, or say why it is a dead letter.

Nothing raises out of `decode`: every record becomes exactly one of the two, so a bad
message can never stop the partition behind it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, cast

import orjson
from pydantic import TypeAdapter, ValidationError

from sync_service.events.change import (
    Change,
    DeadLetter,
    DeadLetterKind,
    Entity,
    Skipped,
    Source,
)
from sync_service.events.inbound import MONEY, ORDER_ENVELOPE, USER_ENVELOPE, Envelope

if TYPE_CHECKING:
    from sync_service.config import Settings

_ADAPTERS: dict[Entity, TypeAdapter[Any]] = {"user": USER_ENVELOPE, "order": ORDER_ENVELOPE}


@dataclass(frozen=True, slots=True)
class Limits:
    """What a record may weigh before it is parsed, how deep its JSON may nest, and how
    much of a dead letter's value and key is kept."""

    max_bytes: int
    max_depth: int
    dead_letter_value_bytes: int
    dead_letter_key_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_message_bytes,
            settings.max_json_depth,
            settings.dead_letter_value_bytes,
            settings.dead_letter_key_bytes,
        )


class InvalidMessage(Exception):
    """The record itself is at fault: `kind` labels the metric, the message says why."""

    def __init__(self, kind: DeadLetterKind, reason: str) -> None:
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
        return dead_letter(source, key, value, limits, exc)


def dead_letter(
    source: Source, key: bytes | None, value: bytes | None, limits: Limits, exc: InvalidMessage
) -> DeadLetter:
    """The record kept as a dead letter: key and value capped, their full sizes noted."""
    return DeadLetter(
        source,
        key[: limits.dead_letter_key_bytes] if key is not None else None,
        value[: limits.dead_letter_value_bytes] if value is not None else None,
        len(value) if value is not None else 0,
        exc.kind,
        str(exc),
        key_size=len(key) if key is not None else 0,
    )


def _decode(
    entity: Entity, source: Source, key: bytes | None, value: bytes | None, limits: Limits
) -> Change:
    if value is None:
        raise InvalidMessage("empty", "null value (a tombstone): a change event is a JSON object")
    if not value:
        raise InvalidMessage("empty", "empty value: a change event is a JSON object")
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
        shown = repr(key[:_KEY_SHOWN].decode("utf-8", "replace"))
        if len(key) > _KEY_SHOWN:
            shown += f"... ({len(key):,} bytes)"
        raise InvalidMessage("bad_key", f"key {shown} does not match data.id {entity_id}")
    return _change(entity, envelope, source)


def _strict_json(value: bytes) -> Any:
    """`value` parsed as RFC 8259 JSON (orjson: no NaN or Infinity, unlike pydantic-core)."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise _unreadable(value, exc) from None


def _check_json(value: bytes, limit: int) -> None:
    """What pydantic-core's reader lets through: nesting deeper than `limit`, and NaN and
    Infinity (not JSON). Scans of the bytes at C speed, whatever their size or depth: a
    parse builds an object per container, and a megabyte of them took ~1 s to walk."""
    try:
        value.decode()  # text first: the brackets of random bytes are no nesting
    except UnicodeDecodeError as bad:
        raise _not_utf8(value, bad) from None
    outside = _outside_strings(value)
    if _nests_deeper(outside, limit):
        raise InvalidMessage("too_deep", f"JSON nests deeper than {limit} levels")
    if b"NaN" in outside or b"Infinity" in outside:
        _strict_json(value)  # stops at the literal, and names its field


def _outside_strings(value: bytes) -> bytes:
    """`value` without its JSON strings. Once escaped backslashes and quotes are gone, the
    strings lie between pairs of quotes. Exact for well-formed JSON; for the rest, what
    counts as inside a string may be wrong, which the parse that follows finds."""
    return b"".join(value.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])


_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _nests_deeper(outside: bytes, limit: int) -> bool:
    """Whether the brackets of `outside` (JSON without its strings) nest deeper than
    `limit`. Brackets left open (a message cut short) are closed at the end; then each
    pass removes every innermost pair, which is one level, at C speed. Brackets that
    never pair up are not JSON, which the parse that follows says."""
    brackets = outside.translate(_BRACKETS, _NOT_BRACKETS)
    brackets += b"]" * (brackets.count(b"[") - brackets.count(b"]"))
    for _ in range(limit):
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return False  # nothing pairs up any more: not nesting, not JSON
        brackets = shorter
    return b"[" in brackets


def _diagnose(entity: Entity, source: Source, value: bytes, exc: ValidationError) -> InvalidMessage:
    """Why an envelope failed, in the words of the kind of fault (slow: failures only)."""
    try:
        parsed = _strict_json(value)
    except InvalidMessage as unreadable:
        return unreadable
    if not isinstance(parsed, dict):
        return InvalidMessage("invalid", "the envelope must be a JSON object")
    got = parsed.get("entity")
    if isinstance(got, str) and got in _ADAPTERS and got != entity:
        return InvalidMessage(
            "wrong_entity", f"entity {got!r} on topic {source.topic}, which carries {entity!r}"
        )
    # No entity, or one that names nothing: the schema's own words say which.
    return InvalidMessage("invalid", _summarize(exc))


_KEY_SHOWN = 40
"""How much of a wrong key a reason quotes."""
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?")
_NOT_A_NUMBER = re.compile(r"-?(?:NaN|Infinity)")
_NAME_BEFORE = re.compile(r'"([^"\\]{1,64})"\s*:\s*\Z')


def _unreadable(value: bytes, error: orjson.JSONDecodeError) -> InvalidMessage:
    """What keeps `value` from being read as JSON, in words its producer can act on. The
    checks do not rely on the wording of orjson's messages, only on where it stopped."""
    try:
        text = value.decode()
    except UnicodeDecodeError as bad:
        return _not_utf8(value, bad)
    at = error.pos  # in characters of `text`
    if at and text[at - 1] == "-":
        at -= 1  # a sign is part of the number or literal it starts
    name = _NAME_BEFORE.search(text, max(0, at - 100), at)
    where = f"{name[1]}: " if name else f"at character {at:,}: "
    number = _NUMBER.match(text, at)
    if number is not None and math.isinf(float(number[0])):
        digits = number[0]
        shown = digits if len(digits) <= 24 else f"{digits[:20]}... ({len(digits):,} characters)"
        return InvalidMessage("invalid", f"{where}number too large: {shown}")
    literal = _NOT_A_NUMBER.match(text, at)
    if literal is not None:
        return InvalidMessage(
            "not_json", f"{where}{literal[0]} is not JSON (RFC 8259 has no NaN or Infinity)"
        )
    return InvalidMessage("not_json", f"not JSON: {error}")


def _not_utf8(value: bytes, bad: UnicodeDecodeError) -> InvalidMessage:
    return InvalidMessage(
        "not_json", f"not UTF-8: byte 0x{value[bad.start]:02x} at offset {bad.start:,}"
    )


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


def _summarize(exc: ValidationError, most: int = 3) -> str:
    """One line that names each failing field, e.g. `data.email: value is not a valid ...`."""
    parts = []
    for error in exc.errors()[:most]:
        # The discriminated union prefixes the op tag ("upsert.data.email"); drop it.
        loc = [str(p) for p in error["loc"] if p not in ("upsert", "delete")]
        if error["type"] == "union_tag_not_found":  # no `op`: nothing else was read
            parts.append("op: Field required")
        elif error["type"] == "union_tag_invalid":
            ctx = error.get("ctx", {})
            parts.append(
                f"op: Input should be one of {ctx.get('expected_tags')}, not {ctx.get('tag')}"
            )
        else:
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
