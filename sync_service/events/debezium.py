"""Native envelopes written as Debezium's PostgreSQL connector (3.x, pgoutput) writes their
rows through Kafka Connect's JSON converter: for the demo, the benchmark and the tests.

Invariant: `decode_debezium.decode` of what `DebeziumEncoder.encode` makes is the native
envelope's change (same id, op, row and occurred_at; the version is the `lsn` given).
The shapes follow the connector's own output (see tests/integration/test_debezium_mirror.py,
which checks the decoder against the real connector).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import orjson

from sync_service.events.change import Entity

DecimalMode = Literal["precise", "string"]
Op = Literal["c", "u", "r", "d"]

_TABLES: dict[Entity, str] = {"user": "users", "order": "orders"}
_ZONED = {"type": "string", "optional": False, "name": "io.debezium.time.ZonedTimestamp",
          "version": 1}  # fmt: skip
_FILLER: dict[str, Any] = {
    "email": "", "name": "", "active": False, "user_id": 0, "total": "AA==", "currency": "",
    "status": "", "created_at": "1970-01-01T00:00:00Z", "updated_at": "1970-01-01T00:00:00Z",
}  # fmt: skip
"""What a delete's `before` holds for NOT NULL columns under the default replica identity."""


def _column(field: str, kind: str, optional: bool = False, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "optional": optional, **extra, "field": field}


def _columns(entity: Entity, decimals: DecimalMode) -> list[dict[str, Any]]:
    times = [{**_ZONED, "field": "created_at"}, {**_ZONED, "field": "updated_at"}]
    if entity == "user":
        return [
            _column("id", "int64"), _column("email", "string"), _column("name", "string"),
            _column("active", "boolean"), _column("country", "string", optional=True), *times,
        ]  # fmt: skip
    total = (
        _column("total", "bytes", name="org.apache.kafka.connect.data.Decimal", version=1,
                parameters={"scale": "2", "connect.decimal.precision": "14"})
        if decimals == "precise"
        else _column("total", "string")
    )  # fmt: skip
    return [
        _column("id", "int64"), _column("user_id", "int64"), total,
        _column("currency", "string"), _column("status", "string"), *times,
    ]  # fmt: skip


def _source_schema() -> dict[str, Any]:
    fields = [
        _column("version", "string"), _column("connector", "string"), _column("name", "string"),
        _column("ts_ms", "int64"),
        _column("snapshot", "string", True, name="io.debezium.data.Enum", version=1,
                parameters={"allowed": "true,first,first_in_data_collection,"
                            "last_in_data_collection,last,false,incremental"},
                default="false"),
        _column("db", "string"), _column("sequence", "string", True),
        _column("ts_us", "int64", True), _column("ts_ns", "int64", True),
        _column("schema", "string"), _column("table", "string"),
        _column("txId", "int64", True), _column("lsn", "int64", True),
        _column("xmin", "int64", True),
    ]  # fmt: skip
    name = "io.debezium.connector.postgresql.Source"
    return {"type": "struct", "fields": fields, "optional": False, "name": name, "version": 1,
            "field": "source"}  # fmt: skip


def value_schema(prefix: str, entity: Entity, decimals: DecimalMode) -> dict[str, Any]:
    """The Connect schema of a change event's value, as the JSON converter writes it."""
    name = f"{prefix}.public.{_TABLES[entity]}"
    row = {"type": "struct", "fields": _columns(entity, decimals), "optional": True,
           "name": f"{name}.Value"}  # fmt: skip
    block = {"type": "struct", "optional": True, "name": "event.block", "version": 1,
             "field": "transaction", "fields": [
                 _column("id", "string"), _column("total_order", "int64"),
                 _column("data_collection_order", "int64")]}  # fmt: skip
    return {
        "type": "struct",
        "fields": [
            {**row, "field": "before"}, {**row, "field": "after"}, _source_schema(), block,
            _column("op", "string"), _column("ts_ms", "int64", True),
            _column("ts_us", "int64", True), _column("ts_ns", "int64", True),
        ],
        "optional": False,
        "name": f"{name}.Envelope",
        "version": 2,
    }  # fmt: skip


def key_schema(prefix: str, entity: Entity) -> dict[str, Any]:
    return {"type": "struct", "fields": [_column("id", "int64")], "optional": False,
            "name": f"{prefix}.public.{_TABLES[entity]}.Key"}  # fmt: skip


def unscaled(amount: Decimal, scale: int = 2) -> str:
    """A Connect Decimal's value: the unscaled integer as big-endian two's-complement
    bytes (the fewest that hold it), base64."""
    number = int(amount.scaleb(scale))
    size = max(1, (number.bit_length() + 8) // 8)  # + 8: room for the sign bit
    return base64.b64encode(number.to_bytes(size, "big", signed=True)).decode()


def _epoch_ms(text: str) -> int:
    moment = datetime.fromisoformat(text)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


class DebeziumEncoder:
    """Writes native envelopes as the connector's (key, value) records: the `lsn` and
    `tx_id` of each change are given, since the envelope has no WAL position."""

    def __init__(
        self, *, prefix: str = "dbz", schemas: bool = True, decimals: DecimalMode = "precise"
    ) -> None:
        self.prefix = prefix
        self.schemas = schemas
        self.decimals = decimals
        self._values = {e: value_schema(prefix, e, decimals) for e in _TABLES}
        self._keys = {e: key_schema(prefix, e) for e in _TABLES}

    def key(self, entity: Entity, entity_id: int) -> bytes:
        payload = {"id": entity_id}
        if self.schemas:
            return orjson.dumps({"schema": self._keys[entity], "payload": payload})
        return orjson.dumps(payload)

    def encode(
        self,
        envelope: dict[str, Any],
        *,
        lsn: int,
        tx_id: int,
        op: Op | None = None,
        last_commit_lsn: int | None = None,
    ) -> tuple[bytes, bytes]:
        """`envelope` as the connector's record; `op` defaults to `u` for an upsert (`c`
        and `r` are the caller's to say) and `d` for a delete."""
        entity: Entity = envelope["entity"]
        data = envelope["data"]
        chosen: Op = op or ("d" if envelope["op"] == "delete" else "u")
        committed = _epoch_ms(envelope["occurred_at"].replace("Z", "+00:00"))
        row = self._row(entity, data) if chosen != "d" else None
        before = None
        if chosen == "d":  # the default replica identity: only the key is real
            columns = [c["field"] for c in _columns(entity, self.decimals)]
            before = {c: _FILLER.get(c) for c in columns} | {"id": data["id"]}
        snapshot = "true" if chosen == "r" else "false"
        sequence = orjson.dumps(
            [None if last_commit_lsn is None else str(last_commit_lsn), str(lsn)]
        ).decode()
        payload = {
            "before": before,
            "after": row,
            "source": {
                "version": "3.6.1.Final", "connector": "postgresql", "name": self.prefix,
                "ts_ms": committed, "snapshot": snapshot, "db": "source",
                "sequence": sequence, "ts_us": committed * 1000, "ts_ns": committed * 10**6,
                "schema": "public", "table": _TABLES[entity], "txId": tx_id, "lsn": lsn,
                "xmin": None,
            },
            "transaction": None,
            "op": chosen,
            "ts_ms": committed + 5,
            "ts_us": (committed + 5) * 1000,
            "ts_ns": (committed + 5) * 10**6,
        }  # fmt: skip
        key = self.key(entity, data["id"])
        if self.schemas:
            return key, orjson.dumps({"schema": self._values[entity], "payload": payload})
        return key, orjson.dumps(payload)

    def tombstone(self, entity: Entity, entity_id: int) -> tuple[bytes, None]:
        """The record the connector writes after a delete (for log compaction)."""
        return self.key(entity, entity_id), None

    def _row(self, entity: Entity, data: dict[str, Any]) -> dict[str, Any]:
        row = dict(data)
        if entity == "user":
            row.setdefault("country", None)
        else:
            total = Decimal(str(row["total"])).quantize(Decimal("0.01"))
            row["total"] = unscaled(total) if self.decimals == "precise" else f"{total}"
        return row

    def from_native(self, value: bytes) -> tuple[bytes, bytes] | None:
        """A native envelope's record as the connector would have written the change, its
        `version` standing for the WAL position (and the transaction); None for a value
        that is no envelope (not JSON, or not an object with data, op and version): such
        bytes stay as they are."""
        try:
            envelope = orjson.loads(value)
            version = int(envelope["version"])
            if envelope["entity"] not in _TABLES or envelope["op"] not in ("upsert", "delete"):
                return None
            return self.encode(envelope, lsn=version, tx_id=version)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, ArithmeticError):
            return None
