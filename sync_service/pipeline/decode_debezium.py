"""Decode one record of Debezium's PostgreSQL connector (Kafka Connect's JSON converter,
with or without the `schema`/`payload` wrapper) into the `Change` the native decoder yields.

Invariant: a change's version is the source's WAL position (`source.lsn`: of the row
change itself, or of the snapshot a read belongs to); a delete never reads `before` beyond
its `id`. Nothing raises out of `decode`: every record becomes one change, one dead
letter, or a skipped tombstone. An upsert in the shape the connector writes every time
takes a shorter path (`_usual_upsert`) to the very change the full one (`_decode`) makes;
every other record, and every fault, is the full path's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, NotRequired, get_type_hints

import orjson
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

from sync_service.db.models import Order
from sync_service.events.change import Change, DeadLetter, DeadLetterKind, Entity, Skipped, Source
from sync_service.events.inbound import (
    MONEY,
    ORDER_ENVELOPE,
    USER_ENVELOPE,
    Envelope,
    OrderData,
    UserData,
)
from sync_service.pipeline.decode import InvalidMessage, Limits, dead_letter

_ADAPTERS: dict[Entity, TypeAdapter[Any]] = {"user": USER_ENVELOPE, "order": ORDER_ENVELOPE}
_COLUMNS: dict[Entity, tuple[str, ...]] = {
    "user": ("id", "email", "name", "active", "country", "created_at", "updated_at"),
    "order": ("id", "user_id", "total", "currency", "status", "created_at", "updated_at"),
}
"""The target's columns of each entity; the source's other columns are ignored."""
_TIMES = frozenset({"created_at", "updated_at"})
_TOTAL_SCALE: Final[int] = Order.__table__.c.total.type.scale  # type: ignore[attr-defined]
"""The target column's scale: what an unscaled decimal without its schema is read with."""
MAX_KEY_BYTES = 4096

_EVENT_IDS = uuid.UUID("6c1b2f60-8b0e-5d43-9a54-4f1f6a3d2e10")
"""The namespace of the event ids derived from a change's source position."""
_EVENT_IDS_SHA1 = hashlib.sha1(_EVENT_IDS.bytes, usedforsecurity=False)


def _event_id(name: str) -> uuid.UUID:
    """`uuid.uuid5(_EVENT_IDS, name)`, without hashing the namespace again (once per
    change: half of uuid5's cost)."""
    sha = _EVENT_IDS_SHA1.copy()
    sha.update(name.encode())
    return uuid.UUID(bytes=sha.digest()[:16], version=5)


def _change_id(origin: Mapping[str, Any], entity_id: Any, op: str) -> uuid.UUID:
    """The event id of a change, from its position in the source (whichever path read it)."""
    return _event_id(
        f"{origin.get('db')}/{origin.get('schema')}.{origin.get('table')}/{entity_id}/{op}"
        f"/{origin.get('txId')}/{origin.get('lsn')}"
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_UNITS = {
    "io.debezium.time.Timestamp": "milliseconds",
    "org.apache.kafka.connect.data.Timestamp": "milliseconds",
    "io.debezium.time.MicroTimestamp": "microseconds",
    "io.debezium.time.NanoTimestamp": "nanoseconds",
}
"""Schema names of a `timestamp` (without zone) column as an epoch number, by unit; the
value is the source's wall time, read as UTC."""
_OPS = {"c": "upsert", "u": "upsert", "r": "upsert", "d": "delete"}


def decode(
    *,
    entity: Entity,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    limits: Limits,
) -> Change | DeadLetter | Skipped:
    """Turn the record at `offset` of a topic that carries `entity` into a change."""
    source = Source(topic, partition, offset)
    if value is None:
        return Skipped(source, "tombstone")  # what the connector sends after a delete
    if len(value) <= limits.max_bytes:
        usual = _usual_upsert(entity, source, key, value, limits.max_depth)
        if usual is not None:
            return usual
    try:
        return _decode(entity, source, key, value, limits)
    except InvalidMessage as exc:
        return dead_letter(source, key, value, limits, exc)


def _decode(
    entity: Entity, source: Source, key: bytes | None, value: bytes, limits: Limits
) -> Change | Skipped:
    if not value:
        raise InvalidMessage("empty", "empty value: a change event must be a JSON document")
    if len(value) > limits.max_bytes:
        raise InvalidMessage(
            "oversized", f"value is {len(value)} bytes, over the {limits.max_bytes}-byte limit"
        )
    payload, columns = _payload_and_columns(value, limits.max_depth, entity)
    if payload is None:
        return Skipped(source, "tombstone")  # a tombstone written with its (null) schema
    if not isinstance(payload, dict) or "op" not in payload:
        raise InvalidMessage("invalid", "not a Debezium change event: no `op` in the payload")
    origin = payload.get("source")
    if not isinstance(origin, dict):
        raise InvalidMessage(
            "invalid",
            "not a Debezium change event: no `source` block (is SYNC_INBOUND_FORMAT right?)",
        )
    connector = origin.get("connector")
    if connector != "postgresql":
        raise InvalidMessage(
            "unsupported_source",
            f"a change from Debezium's {connector!r} connector: only the PostgreSQL "
            "connector's events are read (SYNC_INBOUND_FORMAT=debezium)",
        )
    op = payload["op"]
    if op not in _OPS:
        raise InvalidMessage("unsupported_op", _unsupported(op, origin, payload))
    lsn = _position(origin, "lsn")
    committed_ms = _position(origin, "ts_ms")
    if op == "d":
        before = payload.get("before")
        # Only `id` of a delete's `before` is real: with the default replica identity the
        # other NOT NULL columns are filler (0, "", the epoch).
        if isinstance(before, dict) and "id" in before:
            entity_id = before["id"]
        else:
            entity_id = _key_id(key, limits.max_depth)
        data: dict[str, Any] = {"id": entity_id}
    else:
        after = payload.get("after")
        if not isinstance(after, dict):
            raise InvalidMessage("invalid", f"op {op!r} without an `after` row")
        data = _row(entity, after, columns)
        entity_id = data.get("id")
    _check_key(entity, key, entity_id, limits.max_depth)
    event_id = _change_id(origin, entity_id, op)
    envelope = {
        "event_id": event_id,
        "entity": entity,
        "op": _OPS[op],
        "version": lsn,
        "occurred_at": _EPOCH + timedelta(milliseconds=committed_ms),
        "data": data,
    }
    try:
        valid: Envelope = _ADAPTERS[entity].validate_python(envelope)
    except ValidationError as exc:
        raise InvalidMessage("invalid", _summarize(exc)) from None
    row: dict[str, Any] | None = None
    if valid["op"] == "upsert":
        row = dict(valid["data"])
        if entity == "user":
            row.setdefault("country", None)
    return Change(  # positionally, as the native decoder builds it
        entity,
        valid["data"]["id"],
        valid["version"],
        valid["op"],
        valid["event_id"],
        valid["occurred_at"],
        row,
        source,
        valid,
        op == "r",
    )


_AS_READ = ConfigDict(extra="ignore")
_Text = Annotated[str, Field(strict=True)]
_Position = Annotated[int, Field(strict=True, ge=0, lt=2**63)]


@with_config(_AS_READ)
class _Origin(TypedDict):
    """What the event's id, version and time are made of, read as `_decode` reads them."""

    connector: Literal["postgresql"]
    lsn: _Position
    ts_ms: _Position
    db: NotRequired[Any]  # these four as they are: the event id holds their text
    schema: NotRequired[Any]
    table: NotRequired[Any]
    txId: NotRequired[Any]


def _usual_payload(data: type) -> TypeAdapter[Any]:
    """An upsert's payload whose `after` is `data` (the native row) with its times and
    money left as the connector's text, for `_row`'s own conversions to read."""
    columns = {
        name: _Text if name in _TIMES or name == "total" else hint
        for name, hint in get_type_hints(data, include_extras=True).items()
    }
    after = with_config(_AS_READ)(TypedDict(f"{data.__name__}AsRead", columns))  # type: ignore[operator]
    fields = {"op": Literal["c", "u", "r"], "after": after, "source": _Origin}
    return TypeAdapter(with_config(_AS_READ)(TypedDict("UsualPayload", fields)))  # type: ignore[operator]


_USUAL: dict[Entity, TypeAdapter[Any]] = {
    "user": _usual_payload(UserData),
    "order": _usual_payload(OrderData),
}
_KNOWN_KEYS: dict[Entity, tuple[bytes, int]] = {}
"""By entity, the bytes of the newest key seen with a schema up to its id, and the key's
depth: the rest of such a key is `{"id":N}}`, whatever N."""


def _usual_upsert(
    entity: Entity, source: Source, key: bytes | None, value: bytes, max_depth: int
) -> Change | None:
    """The change of an upsert (`c`, `u`, `r`) as the connector writes it every time: its
    schema seen before, or none; its times as text; its key as the connector writes it.
    The payload is validated in one pass, by the rules `_decode` applies (the row's
    through the native schema's own fields), and the result is the change `_decode`
    would return, for about a third less decoding (`python -m bench.debezium`).
    None for any other record, whatever is wrong with it: `_decode` then reads it, and
    names the fault."""
    seen = _seen_schema(value, entity)
    if seen is not None:
        payload, schema_depth, columns = seen
        if 1 + schema_depth > max_depth or _deeper_than(payload, max_depth - 1):
            return None
    elif value.startswith(b'{"schema":') or _deeper_than(value, max_depth):
        return None
    else:
        payload, columns = value, {}
    try:
        # Parsed as `_decode` parses it: pydantic-core's own reader lets through what
        # orjson refuses (NaN, or 1e999, in a field it skips).
        event = _USUAL[entity].validate_python(orjson.loads(payload))
        data = event["after"]
        for column in _TIMES:
            data[column] = moment = _time(column, data[column], columns.get(column))
            if moment.tzinfo is None:
                return None
        if entity == "order":
            data["total"] = MONEY.validate_python(_money(data["total"], columns.get("total")))
    except (orjson.JSONDecodeError, ValidationError, InvalidMessage):
        return None
    entity_id = data["id"]
    tail = b'{"id":%d}' % entity_id
    known_key = _KNOWN_KEYS.get(entity)
    if not (
        key == tail  # no schema (the value's check above has bounded the depth)
        or (
            known_key is not None
            and key == known_key[0] + tail + b"}"
            and known_key[1] <= max_depth
            and len(key) <= MAX_KEY_BYTES
        )
    ):
        return None
    origin, op = event["source"], event["op"]
    lsn = origin["lsn"]
    event_id = _change_id(origin, entity_id, op)
    occurred_at = _EPOCH + timedelta(milliseconds=origin["ts_ms"])
    envelope: Any = {  # in the order of the envelope's schema, as validated
        "event_id": event_id, "version": lsn, "occurred_at": occurred_at, "entity": entity,
        "op": "upsert", "data": data,
    }  # fmt: skip
    row = dict(data)
    if entity == "user":
        row.setdefault("country", None)
    return Change(
        entity, entity_id, lsn, "upsert", event_id, occurred_at, row, source, envelope, op == "r"
    )


def _payload_and_columns(value: bytes, max_depth: int, entity: Entity) -> tuple[Any, Columns]:
    """The payload of `value` and the schemas of `after`'s columns (none without schemas).
    A value that starts with a schema seen before for `entity` has only its payload
    parsed: its schema's bytes are compared in place (not copied, not hashed)."""
    seen = _seen_schema(value, entity)
    if seen is not None:
        payload_bytes, schema_depth, columns = seen
        try:
            payload = orjson.loads(payload_bytes)
        except orjson.JSONDecodeError:
            pass  # not the converter's shape after all: read it whole below
        else:
            if 1 + schema_depth > max_depth or _deeper_than(payload_bytes, max_depth - 1):
                raise _too_deep("value", max_depth)
            return payload, columns
    schema, payload = _unwrap(_parse(value, "value", max_depth))
    columns = _row_schema(schema, "after")
    raw = _schema_bytes(value)
    if raw is not None and schema is not None and _same(raw, schema):
        _remember(entity, raw, _depth(raw, max_depth), columns)
    return payload, columns


def _seen_schema(value: bytes, entity: Entity) -> tuple[bytes, int, Columns] | None:
    """For a value that starts with a schema seen before for `entity`: the bytes after it
    (the payload's, if the value is JSON), the schema's depth and `after`'s columns."""
    if value.startswith(b'{"schema":') and value.endswith(b"}"):
        for raw, schema_depth, columns in _KNOWN_SCHEMAS.get(entity, ()):
            end = 10 + len(raw)
            if value.startswith(raw, 10) and value.startswith(b',"payload":', end):
                return value[end + 11 : -1], schema_depth, columns
    return None


Columns = dict[str, dict[str, Any]]
_KNOWN_SCHEMAS: dict[Entity, list[tuple[bytes, int, Columns]]] = {}
"""Value schemas seen before, by entity, newest first: their exact bytes, their depth and
`after`'s columns. The JSON converter writes the same schema bytes for every change of a
table, so a schema is parsed and measured once, not with every change (it is ~3 KB of a
~3.5 KB value). Such bytes are a whole JSON value without `,"payload":` in them, so a
value that starts with them and that text holds the payload in the rest."""
MAX_KNOWN_SCHEMAS = 8
"""Per entity: a table's schema changes only with its columns."""


def _remember(entity: Entity, raw: bytes, depth: int, columns: Columns) -> None:
    known = [k for k in _KNOWN_SCHEMAS.get(entity, ()) if k[0] != raw]
    known.insert(0, (raw, depth, columns))
    _KNOWN_SCHEMAS[entity] = known
    del known[MAX_KNOWN_SCHEMAS:]


def _schema_bytes(value: bytes) -> bytes | None:
    """The schema's bytes of `{"schema":...,"payload":...}` as the JSON converter writes
    it, or None. They are only trusted once they parsed to the schema of a whole value
    (`_same`): then they end where the first `,"payload":` starts."""
    if not value.startswith(b'{"schema":') or not value.endswith(b"}"):
        return None
    at = value.find(b',"payload":')
    return None if at < 0 else value[10:at]


def _same(raw: bytes, schema: dict[str, Any]) -> bool:
    try:
        return bool(orjson.loads(raw) == schema)
    except orjson.JSONDecodeError:
        return False


def _parse(raw: bytes, what: str, max_depth: int) -> Any:
    """`raw` as strict JSON (orjson: integers exact to 2^64, no NaN), no deeper than allowed."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        kind: DeadLetterKind = "not_json" if what == "value" else "bad_key"
        raise InvalidMessage(kind, f"{what} is not UTF-8 JSON: {exc}") from None
    if _deeper_than(raw, max_depth):
        raise _too_deep(what, max_depth)
    return document


def _too_deep(what: str, max_depth: int) -> InvalidMessage:
    return InvalidMessage("too_deep", f"JSON {what} nests deeper than {max_depth} levels")


_SHAPE = bytes.maketrans(b"[]", b"{}")  # depth does not care which kind of container
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"{}[]")


def _deeper_than(raw: bytes, most: int) -> bool:
    """Whether the JSON text `raw` (well formed) nests containers deeper than `most`
    levels. Its opening brackets, strings' included, bound its depth: a change event has
    a handful, so the scan below is only run on what could be too deep (~4 µs an event
    saved, `python -m bench.debezium`)."""
    if raw.count(b"{") + raw.count(b"[") <= most:
        return False
    return _depth(raw, most) > most


def _depth(raw: bytes, most: int) -> int:
    """How deep the JSON text `raw` (well formed) nests containers (a document that is one
    is level 1), counted up to `most + 1`. At C speed: without its escaped backslashes and
    quotes, the text between every other `"` is outside the strings; of that only the
    brackets are kept, and each round removes the containers left empty, so the rounds are
    the depth."""
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    shape = b"".join(unescaped.split(b'"')[::2]).translate(_SHAPE, _NOT_BRACKETS)
    depth = 0
    while shape and depth <= most:
        depth += 1
        shape = shape.replace(b"{}", b"")
    return depth


def _unwrap(document: Any) -> tuple[dict[str, Any] | None, Any]:
    """(schema, payload) of a `schemas.enable=true` document, (None, it) otherwise."""
    if isinstance(document, dict) and document.keys() == {"schema", "payload"}:
        schema = document["schema"]
        return (schema if isinstance(schema, dict) else None), document["payload"]
    return None, document


def _row_schema(schema: dict[str, Any] | None, field: str) -> Columns:
    """The schema of each column of the envelope's `before` or `after`, by name."""
    if schema is None:
        return {}
    for part in schema.get("fields") or ():
        if isinstance(part, dict) and part.get("field") == field:
            return {
                f["field"]: f
                for f in part.get("fields") or ()
                if isinstance(f, dict) and isinstance(f.get("field"), str)
            }
    return {}


def _position(origin: dict[str, Any], name: str) -> int:
    value = origin.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    raise InvalidMessage("invalid", f"source.{name}: expected an integer >= 0, got {value!r}")


def _unsupported(op: Any, origin: dict[str, Any], payload: dict[str, Any]) -> str:
    table = f"{origin.get('schema')}.{origin.get('table')}"
    if op == "t":
        return (
            f"op 't' (a TRUNCATE of {table}) is not applied: it is no row change; "
            "clear the target's rows by hand if that is what is meant"
        )
    if op == "m":
        prefix = (payload.get("message") or {}).get("prefix")
        return f"op 'm' (a logical decoding message, prefix {prefix!r}) is not a row change"
    return f"op {op!r} is not a Debezium row change (c, u, r or d)"


def _row(
    entity: Entity, after: dict[str, Any], schema: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The target's columns of `after`, each converted from the connector's encoding."""
    row: dict[str, Any] = {}
    for column in _COLUMNS[entity]:
        if column not in after:
            continue  # the adapter names a missing required column
        value = after[column]
        if value is not None and column in _TIMES:
            value = _time(column, value, schema.get(column))
        elif value is not None and column == "total":
            value = _money(value, schema.get(column))
        row[column] = value
    return row


def _time(column: str, value: Any, schema: dict[str, Any] | None) -> datetime:
    """A `timestamptz` arrives as an ISO-8601 string (io.debezium.time.ZonedTimestamp); a
    `timestamp` as an epoch number whose unit only its schema names."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise InvalidMessage(
                "invalid", f"data.{column}: {value[:40]!r} is not an ISO-8601 time"
            ) from None
    if isinstance(value, int) and not isinstance(value, bool):
        unit = _EPOCH_UNITS.get(str((schema or {}).get("name")))
        if unit is None:
            raise InvalidMessage(
                "invalid",
                f"data.{column}: an epoch number without a schema that names its unit "
                "(enable value.converter.schemas.enable, or make the column timestamptz)",
            )
        if unit == "nanoseconds":
            return _EPOCH + timedelta(microseconds=value // 1000)
        return _EPOCH + timedelta(**{unit: value})
    raise InvalidMessage("invalid", f"data.{column}: {type(value).__name__} is not a time")


def _money(value: Any, schema: dict[str, Any] | None) -> Decimal:
    """Exact money from `decimal.handling.mode` precise (base64 unscaled bytes) or string;
    a number (mode double) may already be rounded, so it is refused."""
    kind = (schema or {}).get("type")
    if (isinstance(value, float | int) and not isinstance(value, bool)) or kind in (
        "double",
        "float",
    ):
        raise InvalidMessage(
            "invalid",
            "data.total: a floating-point number (decimal.handling.mode=double) may have "
            "rounded the money; set the connector's decimal.handling.mode to precise or string",
        )
    if isinstance(value, dict):  # io.debezium.data.VariableScaleDecimal: {scale, value}
        return _unscaled(value.get("value"), value.get("scale"))
    if not isinstance(value, str):
        raise InvalidMessage("invalid", f"data.total: {type(value).__name__} is not money")
    if kind == "bytes" or (kind is None and "." not in value):
        parameters = (schema or {}).get("parameters") or {}
        return _unscaled(value, parameters.get("scale", _TOTAL_SCALE))
    try:
        return Decimal(value)  # decimal.handling.mode=string: BigDecimal.toPlainString()
    except ArithmeticError:
        raise InvalidMessage("invalid", f"data.total: {value[:40]!r} is not a decimal") from None


def _unscaled(encoded: Any, scale: Any) -> Decimal:
    """A Connect Decimal: big-endian two's-complement unscaled bytes, base64, and a scale."""
    try:
        raw = base64.b64decode(str(encoded), validate=True)
        exponent = -int(scale)
    except (binascii.Error, ValueError, TypeError):  # TypeError: a scale that is no number
        raise InvalidMessage(
            "invalid", f"data.total: {str(encoded)[:40]!r} (scale {scale!r}) is no decimal"
        ) from None
    return Decimal(int.from_bytes(raw, "big", signed=True)).scaleb(exponent)


def _key_id(key: bytes | None, max_depth: int) -> Any:
    """The `id` of Debezium's record key, `{"id": 42}` with or without its schema."""
    if key is None:
        raise InvalidMessage("bad_key", 'missing key: expected Debezium\'s {"id": N}')
    if len(key) > MAX_KEY_BYTES:
        raise InvalidMessage("bad_key", f"key is {len(key)} bytes, over {MAX_KEY_BYTES}")
    _, payload = _unwrap(_parse(key, "key", max_depth))
    if not isinstance(payload, dict) or "id" not in payload:
        shown = key[:60].decode("utf-8", "replace")
        raise InvalidMessage("bad_key", f'key {shown!r} is not Debezium\'s {{"id": N}}')
    return payload["id"]


def _check_key(entity: Entity, key: bytes | None, entity_id: Any, max_depth: int) -> None:
    key_id = _key_id(key, max_depth)
    if key_id != entity_id or type(key_id) is not type(entity_id):
        raise InvalidMessage(
            "bad_key", f"key id {key_id!r} does not match the row's id {entity_id!r}"
        )
    if key is None or type(key_id) is not int:
        return
    # The id is the key's last token: any other id written in its place parses the same.
    tail = b'{"id":%d}}' % key_id
    if key.startswith(b'{"schema":') and key.endswith(b',"payload":' + tail):
        _KNOWN_KEYS[entity] = (key[: -len(tail)], _depth(key, max_depth))


def _summarize(exc: ValidationError, most: int = 3) -> str:
    """One line that names each failing field, e.g. `data.email: value is not a valid ...`."""
    parts = []
    for error in exc.errors()[:most]:
        loc = [str(p) for p in error["loc"] if p not in ("upsert", "delete")]
        parts.append(f"{'.'.join(loc) or 'envelope'}: {error['msg']}")
    more = exc.error_count() - most
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
