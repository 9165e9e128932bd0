"""Debezium's PostgreSQL change events decode to the `Change` the native decoder yields, or
to a dead letter that names what is wrong; a tombstone is skipped, never dead-lettered.

Every op, both converter modes (with and without schemas), each decimal and time mode, a
key that disagrees with the row, a truncate, a logical message and another connector.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync_service.config import Settings, unknown_variables
from sync_service.events.change import Change, DeadLetter, Entity, Skipped, Source
from sync_service.events.debezium import DebeziumEncoder, DecimalMode, Op, unscaled
from sync_service.pipeline import decode_debezium
from sync_service.pipeline.decode import (
    Limits,
    change_from_envelope,
    decoder_for,
    envelope_document,
)
from sync_service.pipeline.decode import decode as decode_native
from sync_service.pipeline.decode_debezium import decode
from tests.factories import delete_event, order_event, user_event

LIMITS = Limits(
    max_bytes=1_048_576, max_depth=8, dead_letter_value_bytes=65_536, dead_letter_key_bytes=1024
)
TOPIC: dict[Entity, str] = {"user": "dbz.public.users", "order": "dbz.public.orders"}
LSN = 2**40 + 12_345


def run(entity: Entity, key: bytes | None, value: bytes | None) -> Change | DeadLetter | Skipped:
    return decode(
        entity=entity, topic=TOPIC[entity], partition=1, offset=9, key=key, value=value,
        limits=LIMITS,
    )  # fmt: skip


def change(entity: Entity, record: tuple[bytes | None, bytes | None]) -> Change:
    result = run(entity, *record)
    assert isinstance(result, Change), result
    return result


def dead(entity: Entity, record: tuple[bytes | None, bytes | None], kind: str) -> DeadLetter:
    result = run(entity, *record)
    assert isinstance(result, DeadLetter), result
    assert result.kind == kind, result.reason
    assert result.reason
    assert "\n" not in result.reason
    assert (result.key, result.value) == record  # kept whole, to be re-driven
    return result


def edit(record: tuple[bytes, bytes], change: Any) -> tuple[bytes, bytes]:
    """`record` with its payload (wrapped or not) changed by `change(payload)`."""
    document = orjson.loads(record[1])
    payload = document["payload"] if "schema" in document else document
    change(payload)
    return record[0], orjson.dumps(document)


ENCODERS = [
    DebeziumEncoder(schemas=True, decimals="precise"),
    DebeziumEncoder(schemas=False, decimals="precise"),
    DebeziumEncoder(schemas=True, decimals="string"),
    DebeziumEncoder(schemas=False, decimals="string"),
]
IDS = ["schemas-precise", "plain-precise", "schemas-string", "plain-string"]


# --- every op, both converter modes, both exact decimal modes ---------------------------


@pytest.mark.parametrize("encoder", ENCODERS, ids=IDS)
@pytest.mark.parametrize("op", ["c", "u"])
def test_an_insert_or_update_is_the_native_upsert_at_its_lsn(
    encoder: DebeziumEncoder, op: Op
) -> None:
    cases: list[tuple[dict[str, Any], Entity]] = [
        (user_event(7, 1), "user"),
        (order_event(8, 7, 1), "order"),
    ]
    for envelope, entity in cases:
        got = change(entity, encoder.encode(envelope, lsn=LSN, tx_id=901, op=op))
        native = decode_native(
            entity=entity, topic=TOPIC[entity], partition=1, offset=9,
            key=str(envelope["data"]["id"]).encode(), value=orjson.dumps(envelope), limits=LIMITS,
        )  # fmt: skip
        assert isinstance(native, Change)
        assert (got.entity, got.id, got.op, got.row, got.occurred_at) == (
            native.entity, native.id, native.op, native.row, native.occurred_at,
        )  # fmt: skip
        assert got.version == LSN
        assert got.source == Source(TOPIC[entity], 1, 9)


@pytest.mark.parametrize("encoder", ENCODERS, ids=IDS)
def test_a_snapshot_read_is_an_upsert_at_the_snapshots_lsn(encoder: DebeziumEncoder) -> None:
    got = change("user", encoder.encode(user_event(7, 1), lsn=LSN, tx_id=900, op="r"))
    assert (got.op, got.version, got.snapshot) == ("upsert", LSN, True)
    streamed = change("user", encoder.encode(user_event(7, 1), lsn=LSN + 8, tx_id=901, op="u"))
    assert (streamed.version, streamed.snapshot) == (LSN + 8, False)


@pytest.mark.parametrize("encoder", ENCODERS, ids=IDS)
def test_a_delete_is_soft_at_the_commit_time_and_reads_only_the_id(
    encoder: DebeziumEncoder,
) -> None:
    envelope = delete_event("order", 8, 3)
    envelope["occurred_at"] = "2026-03-04T05:06:07.891Z"
    got = change("order", encoder.encode(envelope, lsn=LSN, tx_id=902))
    assert (got.op, got.id, got.version, got.row) == ("delete", 8, LSN, None)
    assert got.occurred_at == datetime(2026, 3, 4, 5, 6, 7, 891_000, tzinfo=UTC)
    assert got.envelope["data"] == {"id": 8}  # the filler of `before` is never read


def test_a_delete_without_before_takes_its_id_from_the_key() -> None:
    record = DebeziumEncoder().encode(delete_event("user", 7, 3), lsn=LSN, tx_id=1)
    got = change("user", edit(record, lambda p: p.update(before=None)))
    assert (got.op, got.id) == ("delete", 7)


@pytest.mark.parametrize("schemas", [True, False])
def test_a_tombstone_is_skipped_not_dead_lettered(schemas: bool) -> None:
    key, value = DebeziumEncoder(schemas=schemas).tombstone("user", 7)
    assert run("user", key, value) == Skipped(Source(TOPIC["user"], 1, 9), "tombstone")
    wrapped = orjson.dumps({"schema": None, "payload": None})
    assert run("user", key, wrapped) == Skipped(Source(TOPIC["user"], 1, 9), "tombstone")


# --- what is not a row change ------------------------------------------------------------


def test_a_truncate_is_a_dead_letter_that_names_it() -> None:
    record = DebeziumEncoder().encode(user_event(7, 1), lsn=LSN, tx_id=1)
    truncate = edit(record, lambda p: p.update(op="t", before=None, after=None))
    letter = dead("user", truncate, "unsupported_op")
    assert "TRUNCATE of public.users" in letter.reason


def test_a_logical_message_and_an_unknown_op_are_dead_letters_that_name_them() -> None:
    record = DebeziumEncoder(schemas=False).encode(user_event(7, 1), lsn=LSN, tx_id=1)
    message = edit(record, lambda p: p.update(op="m", after=None, message={"prefix": "audit"}))
    assert (
        "logical decoding message, prefix 'audit'" in dead("user", message, "unsupported_op").reason
    )
    unknown = edit(record, lambda p: p.update(op="x"))
    assert "op 'x'" in dead("user", unknown, "unsupported_op").reason


def test_another_connectors_message_is_a_dead_letter() -> None:
    record = DebeziumEncoder().encode(user_event(7, 1), lsn=LSN, tx_id=1)
    mysql = edit(record, lambda p: p["source"].update(connector="mysql"))
    assert "'mysql' connector" in dead("user", mysql, "unsupported_source").reason


def test_a_native_envelope_is_not_a_debezium_event() -> None:
    value = orjson.dumps(user_event(7, 1))
    assert "no `source` block" in dead("user", (b'{"id": 7}', value), "invalid").reason


# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("schemas", [True, False])
def test_a_key_that_disagrees_with_the_row_is_a_dead_letter(schemas: bool) -> None:
    encoder = DebeziumEncoder(schemas=schemas)
    _, value = encoder.encode(user_event(7, 1), lsn=LSN, tx_id=1)
    letter = dead("user", (encoder.key("user", 8), value), "bad_key")
    assert "key id 8 does not match the row's id 7" in letter.reason
    dead("user", (None, value), "bad_key")
    dead("user", (b"7", value), "bad_key")  # the native key is not Debezium's
    dead("user", (b'{"id": "7"}', value), "bad_key")


def test_ids_up_to_the_largest_bigint_are_exact() -> None:
    big = 2**63 - 1
    got = change("order", DebeziumEncoder().encode(order_event(big, big - 1, 1), lsn=LSN, tx_id=1))
    assert (got.id, got.row and got.row["user_id"]) == (big, big - 1)
    too_big = DebeziumEncoder().encode(order_event(big, 1, 1), lsn=LSN, tx_id=1)
    too_big = edit(too_big, lambda p: p["after"].update(id=2**63))
    dead("order", (b'{"id": 9223372036854775808}', too_big[1]), "invalid")


# --- values: money, times, columns -----------------------------------------------------


@pytest.mark.parametrize("total", ["0.00", "0.01", "12.34", "127.99", "128.00", "99999999.99",
                                   "999999999999.99"])  # fmt: skip
@pytest.mark.parametrize("encoder", ENCODERS, ids=IDS)
def test_money_stays_exact(encoder: DebeziumEncoder, total: str) -> None:
    got = change("order", encoder.encode(order_event(8, 7, 1, total=total), lsn=LSN, tx_id=1))
    assert got.row is not None
    assert got.row["total"] == Decimal(total)
    assert str(got.row["total"]) == total


def test_the_connectors_own_bytes_for_12_34_without_schema_read_at_the_columns_scale() -> None:
    assert unscaled(Decimal("12.34")) == "BNI="  # as the connector writes it
    record = DebeziumEncoder(schemas=False).encode(order_event(8, 7, 1), lsn=LSN, tx_id=1)
    got = change("order", edit(record, lambda p: p["after"].update(total="BNI=")))
    assert got.row is not None
    assert str(got.row["total"]) == "12.34"


def test_the_schemas_scale_decides_when_there_is_one() -> None:
    record = DebeziumEncoder().encode(order_event(8, 7, 1), lsn=LSN, tx_id=1)
    document = orjson.loads(record[1])
    total = next(f for f in document["schema"]["fields"][1]["fields"] if f["field"] == "total")
    total["parameters"]["scale"] = "4"
    document["payload"]["after"]["total"] = unscaled(Decimal("12.3400"), 4)
    got = change("order", (record[0], orjson.dumps(document)))
    assert got.row is not None
    assert str(got.row["total"]) == "12.34"
    document["payload"]["after"]["total"] = unscaled(Decimal("12.3456"), 4)
    assert "total" in dead("order", (record[0], orjson.dumps(document)), "invalid").reason


@pytest.mark.parametrize("schemas", [True, False])
def test_money_as_a_double_is_refused(schemas: bool) -> None:
    record = DebeziumEncoder(schemas=schemas, decimals="string").encode(
        order_event(8, 7, 1), lsn=LSN, tx_id=1
    )
    document = orjson.loads(record[1])
    if schemas:
        total = next(f for f in document["schema"]["fields"][1]["fields"] if f["field"] == "total")
        total["type"] = "double"
        document["payload"]["after"]["total"] = 12.34
    else:
        document["after"]["total"] = 12.34
    letter = dead("order", (record[0], orjson.dumps(document)), "invalid")
    assert "decimal.handling.mode=double" in letter.reason


def test_negative_money_is_refused_in_both_exact_modes() -> None:
    modes: list[DecimalMode] = ["precise", "string"]
    for decimals in modes:
        record = DebeziumEncoder(decimals=decimals).encode(order_event(8, 7, 1), lsn=LSN, tx_id=1)
        value = unscaled(Decimal("-1.00")) if decimals == "precise" else "-1.00"
        negative = edit(record, lambda p, v=value: p["after"].update(total=v))
        dead("order", negative, "invalid")


@pytest.mark.parametrize("encoder", ENCODERS, ids=IDS)
def test_a_name_holding_u0000_is_refused(encoder: DebeziumEncoder) -> None:
    # PostgreSQL's text cannot hold U+0000: the row could never be written. A record of
    # the same shape first, so that the shorter path is tried too.
    change("user", encoder.encode(user_event(6, 1), lsn=LSN, tx_id=1))
    record = encoder.encode(user_event(7, 1), lsn=LSN, tx_id=1)
    bad = edit(record, lambda p: p["after"].update(name="a\x00b"))
    assert "U+0000" in dead("user", bad, "invalid").reason


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("io.debezium.time.MicroTimestamp", 1_767_323_045_123_456,
         datetime(2026, 1, 2, 3, 4, 5, 123_456, tzinfo=UTC)),
        ("io.debezium.time.Timestamp", 1_767_323_045_123,
         datetime(2026, 1, 2, 3, 4, 5, 123_000, tzinfo=UTC)),
        ("org.apache.kafka.connect.data.Timestamp", 1_767_323_045_123,
         datetime(2026, 1, 2, 3, 4, 5, 123_000, tzinfo=UTC)),
        ("io.debezium.time.NanoTimestamp", 1_767_323_045_123_456_789,
         datetime(2026, 1, 2, 3, 4, 5, 123_456, tzinfo=UTC)),
    ],
)  # fmt: skip
def test_a_timestamp_as_an_epoch_number_is_read_in_the_unit_its_schema_names(
    name: str, value: int, expected: datetime
) -> None:
    record = DebeziumEncoder().encode(user_event(7, 1), lsn=LSN, tx_id=1)
    document = orjson.loads(record[1])
    column = next(
        f for f in document["schema"]["fields"][1]["fields"] if f["field"] == "created_at"
    )
    column.update(type="int64", name=name)
    document["payload"]["after"]["created_at"] = value
    got = change("user", (record[0], orjson.dumps(document)))
    assert got.row is not None
    assert got.row["created_at"] == expected


def test_a_timestamptz_is_read_from_its_iso_string_to_the_microsecond() -> None:
    record = DebeziumEncoder(schemas=False).encode(user_event(7, 1), lsn=LSN, tx_id=1)
    precise = edit(record, lambda p: p["after"].update(updated_at="2026-05-06T07:08:09.123456Z"))
    got = change("user", precise)
    assert got.row is not None
    assert got.row["updated_at"] == datetime(2026, 5, 6, 7, 8, 9, 123_456, tzinfo=UTC)


def test_an_epoch_number_without_its_schema_is_refused_not_guessed() -> None:
    record = DebeziumEncoder(schemas=False).encode(user_event(7, 1), lsn=LSN, tx_id=1)
    bare = edit(record, lambda p: p["after"].update(created_at=1_767_323_045_123_456))
    assert "names its unit" in dead("user", bare, "invalid").reason


def test_a_time_without_a_zone_is_refused() -> None:
    record = DebeziumEncoder(schemas=False).encode(user_event(7, 1), lsn=LSN, tx_id=1)
    naive = edit(record, lambda p: p["after"].update(created_at="2026-01-02T03:04:05"))
    assert "created_at" in dead("user", naive, "invalid").reason


def test_columns_the_target_lacks_are_ignored_and_a_missing_one_is_a_dead_letter() -> None:
    record = DebeziumEncoder(schemas=False).encode(user_event(7, 1), lsn=LSN, tx_id=1)
    extra = edit(record, lambda p: p["after"].update(nickname="ada", score=3))
    got = change("user", extra)
    assert got.row is not None
    assert "nickname" not in got.row
    missing = edit(record, lambda p: p["after"].pop("email"))
    assert "data.email" in dead("user", missing, "invalid").reason


def test_nulls_and_booleans_come_through() -> None:
    record = DebeziumEncoder().encode(user_event(7, 1, country=None, active=False), lsn=1, tx_id=1)
    got = change("user", record)
    assert got.row is not None
    assert (got.row["country"], got.row["active"]) == (None, False)


# --- identity, limits, storage --------------------------------------------------------


def test_a_resent_change_has_the_same_event_id_and_version() -> None:
    """A connector restart re-sends from its last flushed offset: same lsn and txId, new
    envelope ts_ms; the change must be recognised as the same one."""
    encoder = DebeziumEncoder()
    first = change("user", encoder.encode(user_event(7, 1), lsn=LSN, tx_id=5))
    resent = edit(
        encoder.encode(user_event(7, 1), lsn=LSN, tx_id=5), lambda p: p.update(ts_ms=p["ts_ms"] + 9)
    )
    again = change("user", resent)
    assert (again.event_id, again.version) == (first.event_id, first.version)
    other = change("user", encoder.encode(user_event(7, 1), lsn=LSN + 1, tx_id=5))
    assert other.event_id != first.event_id


def test_a_schema_wrapped_value_fits_the_default_caps() -> None:
    settings = Settings()
    key, value = DebeziumEncoder().encode(order_event(8, 7, 1), lsn=LSN, tx_id=1)
    assert 3000 < len(value) < settings.max_message_bytes
    limits = Limits(settings.max_message_bytes, settings.max_json_depth, 65_536, 1024)
    assert isinstance(
        decode(entity="order", topic="t", partition=0, offset=0, key=key, value=value,
               limits=limits),
        Change,
    )  # fmt: skip
    shallow = Limits(settings.max_message_bytes, 6, 65_536, 1024)
    letter = decode(entity="order", topic="t", partition=0, offset=0, key=key, value=value,
                    limits=shallow)  # fmt: skip
    assert isinstance(letter, DeadLetter)
    assert letter.kind == "too_deep"


def test_a_payload_nesting_too_deep_is_too_deep_whether_its_schema_was_seen_or_not() -> None:
    settings = Settings()
    limits = Limits(settings.max_message_bytes, settings.max_json_depth, 65_536, 1024)
    encoder = DebeziumEncoder()
    key, value = encoder.encode(user_event(11, 1), lsn=LSN, tx_id=1)
    deep = value.replace(b'"after":{', b'"after":{"extra":' + b"[" * 9 + b"1" + b"]" * 9 + b",")
    braces = value.replace(b'"after":{', b'"after":{"extra":"' + b"{[" * 20 + b'",')
    decode_debezium._KNOWN_SCHEMAS.clear()
    for seen in (False, True):  # the first decode of a schema parses it whole, later ones not
        if seen:
            decode(entity="user", topic="t", partition=0, offset=0, key=key, value=value,
                   limits=limits)  # fmt: skip
        letter = decode(entity="user", topic="t", partition=0, offset=1, key=key, value=deep,
                        limits=limits)  # fmt: skip
        assert isinstance(letter, DeadLetter), letter
        assert letter.kind == "too_deep"
        # Brackets inside a string are no nesting.
        kept = decode(entity="user", topic="t", partition=0, offset=2, key=key, value=braces,
                      limits=limits)  # fmt: skip
        assert isinstance(kept, Change), kept


def test_a_change_stored_while_it_waits_comes_back_the_same() -> None:
    got = change("order", DebeziumEncoder().encode(order_event(8, 7, 1), lsn=LSN, tx_id=1))
    stored = orjson.loads(orjson.dumps(envelope_document(got)))
    assert change_from_envelope("order", stored, got.source) == got


def test_not_json_and_empty_are_dead_letters() -> None:
    dead("user", (b'{"id": 7}', b"{nope"), "not_json")
    dead("user", (b'{"id": 7}', b""), "empty")
    assert base64.b64decode("BNI=") == (1234).to_bytes(2, "big")


# --- the setting ---------------------------------------------------------------------------


def test_the_format_setting_chooses_the_decoder_and_refuses_a_misspelling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert decoder_for(Settings().inbound_format) is decode_native
    monkeypatch.setenv("SYNC_INBOUND_FORMAT", "debezium")
    assert decoder_for(Settings().inbound_format) is decode
    monkeypatch.setenv("SYNC_INBOUND_FORMAT", "debezum")
    with pytest.raises(ValueError, match="'native' or 'debezium'"):
        Settings()


def test_unknown_sync_variables_are_named() -> None:
    environ = {"SYNC_INBOUND_FORMAT": "x", "SYNC_INBOUND_FROMAT": "x", "PATH": "/bin",
               "sync_group_id": "g", "SYNC_BATCH_MAX_EVENT": "1"}  # fmt: skip
    assert unknown_variables(environ) == ["SYNC_BATCH_MAX_EVENT", "SYNC_INBOUND_FROMAT"]


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(alphabet='[]{}"\\ab', max_size=8)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(key=JSON, payload=JSON, wrapped=st.booleans())
def test_decode_never_raises(key: Any, payload: Any, wrapped: bool) -> None:
    value = orjson.dumps({"schema": None, "payload": payload} if wrapped else payload)
    result = run("user", orjson.dumps(key), value)
    assert isinstance(result, Change | DeadLetter | Skipped)


@given(op=st.sampled_from(["c", "u", "r", "d"]), source=JSON, after=JSON, before=JSON)
def test_decode_never_raises_on_a_mangled_event(
    op: str, source: Any, after: Any, before: Any
) -> None:
    record = DebeziumEncoder(schemas=False).encode(user_event(7, 1), lsn=LSN, tx_id=1)
    for field, value in (("source", source), ("after", after), ("before", before)):
        mangled = edit(record, lambda p, f=field, v=value: p.update({f: v, "op": op}))
        assert isinstance(run("user", *mangled), Change | DeadLetter | Skipped)


def test_a_native_envelope_written_as_the_connector_would_decodes_to_the_same_change() -> None:
    encoder = DebeziumEncoder(schemas=False)
    for envelope, entity in [
        (order_event(8, 7, 12), "order"),
        (delete_event("user", 7, 13), "user"),
    ]:
        record = encoder.from_native(orjson.dumps(envelope))
        assert record is not None
        got = change(entity, record)  # type: ignore[arg-type]
        assert (got.id, got.version, got.op) == (
            envelope["data"]["id"],
            envelope["version"],
            envelope["op"],
        )
    assert encoder.from_native(b"\x00not json") is None
    assert encoder.from_native(b'{"entity": "user"}') is None


def _tree_depth(node: Any) -> int:
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
    if children is None:
        return 0
    return 1 + max((_tree_depth(c) for c in children), default=0)


@given(document=JSON, limit=st.integers(1, 6))
def test_the_depth_check_on_the_raw_bytes_agrees_with_the_parsed_tree(
    document: Any, limit: int
) -> None:
    from sync_service.pipeline.decode_debezium import _depth

    raw = orjson.dumps(document)
    assert (_depth(raw, limit) > limit) == (_tree_depth(document) > limit)


def test_a_key_with_a_richer_schema_is_read_within_the_depth_cap() -> None:
    key, value = DebeziumEncoder().encode(user_event(7, 1), lsn=LSN, tx_id=1)
    document = orjson.loads(key)
    document["schema"]["fields"][0]["parameters"] = {"__debezium.source.column.type": "INT8"}
    got = change("user", (orjson.dumps(document), value))
    assert got.id == 7


def test_a_known_schema_decodes_as_a_new_one_does() -> None:
    """Values whose schema's bytes were seen before have only their payload parsed; the
    outcome is the same as reading them whole."""

    encoder = DebeziumEncoder()
    records = [
        encoder.encode(order_event(8, 7, 1), lsn=LSN, tx_id=1),
        encoder.encode(order_event(9, 7, 1, total="0.01"), lsn=LSN + 1, tx_id=1),
        encoder.encode(delete_event("order", 8, 2), lsn=LSN + 2, tx_id=2),
    ]
    key, value = records[0]
    bent = value[:-1] + b',"extra":1}'  # not the converter's shape: read whole
    schema_at = value.index(b'"parameters":{') + len(b'"parameters":{')
    forged = value[:schema_at] + b'"x":"y","payload":"z",' + value[schema_at:]
    records += [(key, bent), (key, forged)]
    decode_debezium._KNOWN_SCHEMAS.clear()
    first = [run("order", *r) for r in records]
    assert decode_debezium._KNOWN_SCHEMAS  # the order schema is known now
    again = [run("order", *r) for r in records]
    assert again == first
    assert [type(r).__name__ for r in first] == [
        "Change",
        "Change",
        "Change",
        "DeadLetter",
        "Change",
    ]


@pytest.mark.parametrize("name", ["", "db/public.users/42/c/7/123", "bäse/ünïcode/1/u/None/5"])
def test_the_event_id_is_the_uuid5_of_the_change_position(name: str) -> None:
    assert decode_debezium._event_id(name) == uuid.uuid5(decode_debezium._EVENT_IDS, name)


def full(entity: Entity, record: tuple[bytes | None, bytes | None]) -> Any:
    """What `decode` makes of `record` read whole, without the usual-upsert path."""
    usual = decode_debezium._usual_upsert
    decode_debezium._usual_upsert = lambda *_: None
    try:
        return run(entity, *record)
    finally:
        decode_debezium._usual_upsert = usual


def same(entity: Entity, record: tuple[bytes | None, bytes | None]) -> Any:
    """`record` decodes to the same result, to the repr (money's places, times' zones,
    the row's column order), with the usual-upsert path as without it."""
    got = run(entity, *record)
    assert repr(got) == repr(full(entity, record))
    return got


@pytest.mark.parametrize("encoder", ENCODERS, ids=IDS)
@pytest.mark.parametrize("op", ["c", "u", "r"])
def test_a_usual_upsert_takes_the_short_path_to_the_same_change(
    encoder: DebeziumEncoder, op: Op
) -> None:
    records: list[tuple[Entity, tuple[bytes, bytes]]] = [
        ("user", encoder.encode(user_event(7, 1), lsn=LSN, tx_id=3, op=op)),
        ("user", encoder.encode(user_event(8, 1, country=None), lsn=LSN, tx_id=3, op=op)),
        ("order", encoder.encode(order_event(9, 7, 1, total="12.5"), lsn=LSN, tx_id=3, op=op)),
        ("order", encoder.encode(order_event(10, 7, 1, total="0"), lsn=LSN + 1, tx_id=4, op=op)),
    ]
    for entity, record in records:
        same(entity, record)  # the first of each entity teaches the key's and schema's shape
        short = decode_debezium._usual_upsert(entity, Source(TOPIC[entity], 1, 9), *record, 8)
        assert short is not None, record
        assert repr(short) == repr(full(entity, record))


@pytest.mark.parametrize("schemas", [True, False], ids=["schemas", "plain"])
def test_records_off_the_usual_shape_decode_as_they_did(schemas: bool) -> None:
    encoder = DebeziumEncoder(schemas=schemas)
    key, value = encoder.encode(order_event(9, 7, 1), lsn=LSN, tx_id=3)
    same("order", (key, value))
    at = value.index(b'"op":')
    cases = [
        value[:at] + b'"x":NaN,' + value[at:],  # not JSON: pydantic-core alone would skip it
        value[:at] + b'"x":1e999,' + value[at:],
        value[:at] + b'"x":[[[[[[[[1]]]]]]]],' + value[at:],  # too deep
        value.replace(b'"txId":3', b'"txId":3.0'),  # a float in the event id's text
        value.replace(b'"txId":3', b'"txId":true'),
        value.replace(b'"db":"source"', b'"db":["source"]'),
        value.replace(b'"lsn":', b'"lsn":-'),
        value.replace(b'"connector":"postgresql"', b'"connector":"mysql"'),
        value.replace(b"T03:04:05Z", b"T03:04:05"),  # no zone
        value.replace(b'"currency":"EUR"', b'"currency":"eur"'),
    ]
    for bent in cases:
        assert bent != value
        assert isinstance(same("order", (key, bent)), DeadLetter | Change)
    keys = [b"9", b'{"id":10}', key.replace(b'"id":9', b'"id":9.0'), None, key[:-1] + b" }"]
    assert [type(same("order", (k, value))).__name__ for k in keys] == [
        *["DeadLetter"] * 4,
        "Change",  # JSON all the same, read whole
    ]


@given(
    op=st.sampled_from(["c", "u", "r", "d", "x"]),
    field=st.sampled_from(
        ["id", "email", "name", "active", "country", "created_at", "total", "user_id", "status"]
    ),
    value=JSON,
    origin=st.sampled_from(["db", "txId", "lsn", "ts_ms", "table"]),
    mark=JSON,
)
def test_a_mangled_upsert_decodes_the_same_by_either_path(
    op: str, field: str, value: Any, origin: str, mark: Any
) -> None:
    for entity, envelope in (("user", user_event(7, 1)), ("order", order_event(9, 7, 1))):
        for schemas in (True, False):
            record = DebeziumEncoder(schemas=schemas).encode(envelope, lsn=LSN, tx_id=3)
            same(entity, record)  # type: ignore[arg-type]
            mangled = edit(record, lambda p: (
                p.update({"op": op}), p["after"].update({field: value}),
                p["source"].update({origin: mark}),
            ))  # fmt: skip
            same(entity, mangled)  # type: ignore[arg-type]


def test_a_key_seen_before_is_still_held_to_the_caps() -> None:
    """A key whose shape is known is taken as the connector's only within the same depth
    and size caps as any other key."""
    encoder = DebeziumEncoder()
    plain = DebeziumEncoder(schemas=False)
    key, _ = encoder.encode(user_event(7, 1), lsn=LSN, tx_id=3)
    _, value = plain.encode(user_event(7, 1), lsn=LSN, tx_id=3)  # 2 levels; the key 4
    assert isinstance(same("user", (key, value)), Change)
    shallow = decode(
        entity="user", topic=TOPIC["user"], partition=1, offset=9, key=key, value=value,
        limits=replace(LIMITS, max_depth=3),
    )  # fmt: skip
    assert isinstance(shallow, DeadLetter)
    assert shallow.kind == "too_deep"

    document = orjson.loads(key)
    document["schema"]["name"] += "x" * (decode_debezium.MAX_KEY_BYTES - len(key))
    longest = orjson.dumps(document)  # the longest key the decoder reads
    assert len(longest) == decode_debezium.MAX_KEY_BYTES
    assert isinstance(same("user", (longest, value)), Change)
    big_id = 10**18
    _, big_value = plain.encode(user_event(big_id, 1), lsn=LSN, tx_id=3)
    over = longest.replace(b'{"id":7}}', b'{"id":%d}}' % big_id)
    assert isinstance(same("user", (over, big_value)), DeadLetter)
