"""Every record decodes to exactly one `Change` or one `DeadLetter`, and decode never raises.

A dead letter names its kind and says, in one line, which field is wrong; a change holds
exactly the values of its envelope (money as an exact decimal, times with their zone).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.hostile import corpus, slow_paths
from sync_service.events.change import Change, DeadLetter, Entity, Source
from sync_service.events.inbound import OrderData, UserData, UserUpsert
from sync_service.pipeline.decode import (
    Limits,
    _nests_deeper,
    _outside_strings,
    change_from_envelope,
    decode,
    envelope_document,
)
from tests.factories import delete_event, encode, envelope, order_data, order_event, user_event

LIMITS = Limits(
    max_bytes=1_048_576, max_depth=8, dead_letter_value_bytes=65_536, dead_letter_key_bytes=1024
)
KINDS = {"empty", "oversized", "not_json", "invalid", "too_deep", "wrong_entity", "bad_key"}
TOPIC: dict[Entity, str] = {"user": "cdc.users", "order": "cdc.orders"}
EVENT_ID = "2b1f0c7e-8a55-4c1e-9d3e-6f1a2b3c4d5e"
REMOVED_FIELD = object()


def run(
    value: bytes | None,
    *,
    entity: Entity = "user",
    key: bytes | None = b"7",
    limits: Limits = LIMITS,
) -> Change | DeadLetter:
    return decode(
        entity=entity,
        topic=TOPIC[entity],
        partition=2,
        offset=40,
        key=key,
        value=value,
        limits=limits,
    )


def dead(value: bytes | None, **kwargs: Any) -> DeadLetter:
    result = run(value, **kwargs)
    assert isinstance(result, DeadLetter), result
    assert result.kind in KINDS
    assert result.reason
    assert "\n" not in result.reason
    return result


def change(value: bytes, **kwargs: Any) -> Change:
    result = run(value, **kwargs)
    assert isinstance(result, Change), result
    return result


def order_with_raw_total(raw: bytes) -> bytes:
    """An order whose `total` is the JSON text `raw`, exactly as a producer wrote it."""
    value = encode(order_event(7, 3, 1, total="TOTAL"))
    return value.replace(b'"TOTAL"', raw)


# --- what is wrong before the envelope is even read -------------------------------------


@pytest.mark.parametrize("value", [None, b""])
def test_an_empty_value_is_a_dead_letter(value: bytes | None) -> None:
    letter = dead(value)
    assert (letter.kind, letter.value, letter.value_size) == ("empty", value, 0)
    assert letter.source == Source("cdc.users", 2, 40)
    assert letter.key == b"7"


def test_an_oversized_value_is_kept_truncated_with_its_size() -> None:
    value = encode(user_event(7, 1))
    small = dataclasses.replace(LIMITS, max_bytes=64, dead_letter_value_bytes=16)
    letter = dead(value, limits=small)
    assert letter.kind == "oversized"
    assert f"{len(value)} bytes" in letter.reason
    assert "64-byte limit" in letter.reason
    assert (letter.value, letter.value_size) == (value[:16], len(value))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (
            b"{not json",
            "not JSON: unexpected character, expected a string key: line 1 column 2 (char 1)",
        ),
        (b'{"a": 1', "not JSON: unexpected end of data: line 1 column 8 (char 7)"),
        (b"\xff\xfe{}", "not UTF-8: byte 0xff at offset 0"),
        (b'{"name": "Ad\xc3\x28"}', "not UTF-8: byte 0xc3 at offset 12"),
        (b"NaN", "at character 0: NaN is not JSON (RFC 8259 has no NaN or Infinity)"),
        (
            b"{'a': 1}",
            "not JSON: unexpected character, expected a string key: line 1 column 2 (char 1)",
        ),
    ],
)
def test_what_is_not_json_is_a_dead_letter(value: bytes, reason: str) -> None:
    letter = dead(value)
    assert (letter.kind, letter.reason) == ("not_json", reason)
    assert letter.value == value


@pytest.mark.parametrize("value", [b"[1, 2]", b"42", b'"user"', b"null", b"true"])
def test_json_that_is_not_an_object_is_a_dead_letter(value: bytes) -> None:
    letter = dead(value)
    assert (letter.kind, letter.reason) == ("invalid", "the envelope must be a JSON object")


def test_json_nested_deeper_than_the_limit_is_a_dead_letter() -> None:
    nested: dict[str, Any] = {"leaf": 1}
    for _ in range(8):
        nested = {"inner": nested}
    letter = dead(encode(envelope("user", 1, {**user_data_7(), "extra": nested})))
    assert (letter.kind, letter.reason) == ("too_deep", "JSON nests deeper than 8 levels")


def test_nesting_up_to_the_limit_is_read() -> None:
    # envelope (1) > data (2) > extra (3) ... the innermost object is level 8
    nested: dict[str, Any] = {"leaf": 1}
    for _ in range(5):
        nested = {"inner": nested}
    assert change(encode(envelope("user", 1, {**user_data_7(), "extra": nested}))).id == 7


def test_an_entity_on_the_wrong_topic_is_a_dead_letter() -> None:
    letter = dead(encode(user_event(7, 1)), entity="order")
    assert letter.kind == "wrong_entity"
    assert letter.reason == "entity 'user' on topic cdc.orders, which carries 'order'"


@pytest.mark.parametrize(
    ("entity", "reason"),
    [
        (REMOVED_FIELD, "entity: Field required"),
        (None, "entity: Input should be 'user'"),
        ("customer", "entity: Input should be 'user'"),
        (["user"], "entity: Input should be 'user'"),
    ],
)
def test_an_envelope_without_a_known_entity_is_invalid(entity: Any, reason: str) -> None:
    value = user_event(7, 1)
    if entity is REMOVED_FIELD:
        del value["entity"]
    else:
        value["entity"] = entity
    letter = dead(encode(value))
    assert (letter.kind, letter.reason) == ("invalid", reason)


def test_an_envelope_of_nothing_but_nulls_is_invalid_and_says_what_it_lacks() -> None:
    letter = dead(encode(dict.fromkeys(user_event(7, 1))))
    assert (letter.kind, letter.reason) == (
        "invalid",
        "op: Input should be one of 'upsert', 'delete', not None",
    )
    nulls = {**user_event(7, 1), "data": dict.fromkeys(user_data_7())}
    letter = dead(encode(nulls))
    assert letter.kind == "invalid"
    assert letter.reason.startswith("data.id: Input should be a valid integer; data.email: ")


# --- hostile input: each kind of fault labelled as contracts/README.md says ----------------


def test_nesting_deeper_than_the_parser_goes_is_too_deep_not_unreadable() -> None:
    # orjson stops at 1,024 levels; the message is still well-formed JSON, just too deep.
    for levels in (1_025, 100_000):
        deep = b"[" * levels + b"]" * levels
        for value in (deep, encode(user_event(7, 1))[:-1] + b',"deep":' + deep + b"}"):
            letter = dead(value)
            assert (letter.kind, letter.reason) == ("too_deep", "JSON nests deeper than 8 levels")
    assert dead(b"[" * 1_000_000).kind == "too_deep"  # nor does it need to be complete


def test_brackets_inside_strings_are_not_nesting() -> None:
    # escaped quotes and backslashes do not end a string early
    text = '[[[[[[[[[[[\\"\\\\[[[[[[[[[['
    value = encode(user_event(7, 1)).replace(b'"op"', f'"s":"{text}","x":NaN,"op"'.encode())
    letter = dead(value)
    assert (letter.kind, letter.reason) == (
        "not_json",
        "x: NaN is not JSON (RFC 8259 has no NaN or Infinity)",
    )


@pytest.mark.parametrize(
    ("field", "raw", "reason"),
    [
        (
            b'"version":1',
            b"9" * 1_000_000,
            "version: number too large: 99999999999999999999... (1,000,000 characters)",
        ),
        (
            b'"version":1',
            b"-" + b"9" * 400,
            "version: number too large: -9999999999999999999... (401 characters)",
        ),
        (b'"id":7', b"1e999", "id: number too large: 1e999"),
    ],
)
def test_a_number_no_field_can_hold_is_invalid(field: bytes, raw: bytes, reason: str) -> None:
    value = encode(user_event(7, 1)).replace(field, field.split(b":")[0] + b":" + raw)
    letter = dead(value)
    assert (letter.kind, letter.reason) == ("invalid", reason)


def test_a_long_key_is_kept_capped_with_its_size() -> None:
    key = b"7" * 1_048_576
    letter = dead(encode(user_event(7, 1)), key=key)
    assert letter.kind == "bad_key"
    assert letter.reason == f"key {'7' * 40!r}... (1,048,576 bytes) does not match data.id 7"
    assert (letter.key, letter.key_size) == (key[: LIMITS.dead_letter_key_bytes], len(key))
    small = dead(b"{", key=b"1234", limits=dataclasses.replace(LIMITS, dead_letter_key_bytes=2))
    assert (small.key, small.key_size) == (b"12", 4)
    assert dead(b"{", key=None).key_size == 0


def nesting(node: Any) -> int:
    """How deep `node` nests (a scalar 0, an empty container 1): the reference."""
    if isinstance(node, dict):
        return 1 + max(map(nesting, node.values()), default=0)
    if isinstance(node, list):
        return 1 + max(map(nesting, node), default=0)
    return 0


deep_values = st.recursive(
    st.none() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=4), inner, max_size=3)
    ),
    max_leaves=30,
)


@given(node=deep_values, limit=st.integers(2, 12))
def test_the_depth_scan_agrees_with_the_parsed_depth(node: Any, limit: int) -> None:
    # strings full of brackets, quotes and backslashes, which are no nesting
    raw = json.dumps(node).encode()
    assert _nests_deeper(_outside_strings(raw), limit) == (nesting(node) > limit)


def open_depth(text: str) -> int:
    """The deepest that `text` (JSON, perhaps cut short) goes, read a character at a time:
    the reference for messages that are not whole."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


@given(node=deep_values, keep=st.floats(0.05, 1.0))
def test_a_message_cut_short_is_too_deep_when_what_is_there_is(node: Any, keep: float) -> None:
    text = json.dumps({"x": [node]})
    cut = text[: max(1, int(len(text) * keep))]
    result = run(cut.encode())
    assert isinstance(result, DeadLetter)
    assert (result.kind == "too_deep") == (open_depth(cut) > LIMITS.max_depth), result


def test_every_hostile_message_of_the_fault_suite_gets_its_kind_quickly() -> None:
    # A regression guard against a check that grows faster than the message: a scan
    # that is quadratic in the size takes minutes here, not a second.
    for message in [*corpus(), *slow_paths()]:
        started = time.thread_time()
        result = run(message.value, key=message.key)
        spent = time.thread_time() - started
        assert isinstance(result, DeadLetter), message.name
        assert (message.name, result.kind) == (message.name, message.kind)
        assert "\n" not in result.reason
        assert len(result.reason) < 200, result.reason
        assert spent < 1.0, (message.name, spent)


# --- fields that break the contract -----------------------------------------------------


def user_data_7(**overrides: Any) -> dict[str, Any]:
    return user_event(7, 1, **overrides)["data"]  # type: ignore[no-any-return]


INVALID_USERS: list[tuple[str, dict[str, Any], str]] = [
    ("bad email", user_event(7, 1, email="not-an-email"), "data.email"),
    ("email without domain", user_event(7, 1, email="ada@"), "data.email"),
    (
        "email over 255",
        user_event(7, 1, email=f"{'a' * 64}@{'b' * 63}.{'c' * 63}.{'d' * 60}.com"),
        "data.email",
    ),
    ("empty name", user_event(7, 1, name=""), "data.name"),
    ("name too long", user_event(7, 1, name="n" * 256), "data.name"),
    ("name holding U+0000", user_event(7, 1, name="a\x00b"), "data.name"),
    ("active as text", user_event(7, 1, active="yes"), "data.active"),
    ("country lowercase", user_event(7, 1, country="gb"), "data.country"),
    (
        "created_at without zone",
        user_event(7, 1, created_at="2026-01-02T03:04:05"),
        "data.created_at",
    ),
    ("id 0", user_event(0, 1), "data.id"),
    ("id negative", user_event(-7, 1), "data.id"),
    ("id as text", user_event(7, 1, id="7"), "data.id"),
    (
        "missing email",
        envelope("user", 1, {k: v for k, v in user_data_7().items() if k != "email"}),
        "data.email",
    ),
    ("upsert with only an id", envelope("user", 1, {"id": 7}), "data.email"),
    ("version negative", {**user_event(7, 1), "version": -1}, "version"),
    ("version bool", {**user_event(7, 1), "version": True}, "version"),
    ("version as text", {**user_event(7, 1), "version": "3"}, "version"),
    ("version float", {**user_event(7, 1), "version": 3.0}, "version"),
    (
        "occurred_at without zone",
        {**user_event(7, 1), "occurred_at": "2026-11-24T10:00:00"},
        "occurred_at",
    ),
    ("occurred_at as a number", {**user_event(7, 1), "occurred_at": 1_795_000_000}, "occurred_at"),
    ("occurred_at not a time", {**user_event(7, 1), "occurred_at": "yesterday"}, "occurred_at"),
    ("event_id not a UUID", {**user_event(7, 1), "event_id": "42"}, "event_id"),
    ("unknown op", {**user_event(7, 1), "op": "merge"}, "op"),
    ("no op", {k: v for k, v in user_event(7, 1).items() if k != "op"}, "op"),
    ("no data", {k: v for k, v in user_event(7, 1).items() if k != "data"}, "data"),
    ("delete of id 0", delete_event("user", 0, 1), "data.id"),
]


@pytest.mark.parametrize(
    ("case", "value", "field"), INVALID_USERS, ids=[c[0] for c in INVALID_USERS]
)
def test_an_invalid_user_is_a_dead_letter_that_names_the_field(
    case: str, value: dict[str, Any], field: str
) -> None:
    letter = dead(encode(value))
    assert letter.kind == "invalid", case
    assert letter.reason.startswith(f"{field}:") or f"; {field}:" in letter.reason, letter.reason


INVALID_ORDERS: list[tuple[str, bytes, str]] = [
    ("total with 3 decimals", encode(order_event(7, 3, 1, total="12.345")), "data.total"),
    ("total negative", encode(order_event(7, 3, 1, total="-1.00")), "data.total"),
    ("total not a number", encode(order_event(7, 3, 1, total="ten")), "data.total"),
    ("total NaN", encode(order_event(7, 3, 1, total="NaN")), "data.total"),
    ("total Infinity", encode(order_event(7, 3, 1, total="Infinity")), "data.total"),
    ("total too large", encode(order_event(7, 3, 1, total="1000000000000.00")), "data.total"),
    ("total as bool", encode(order_event(7, 3, 1, total=True)), "data.total"),
    ("total number with 3 decimals", order_with_raw_total(b"12.345"), "data.total"),
    ("total number not exact", order_with_raw_total(b"19.999999999999999999"), "data.total"),
    ("total number negative", order_with_raw_total(b"-0.01"), "data.total"),
    ("currency lowercase", encode(order_event(7, 3, 1, currency="eur")), "data.currency"),
    ("currency too long", encode(order_event(7, 3, 1, currency="EURO")), "data.currency"),
    ("unknown status", encode(order_event(7, 3, 1, status="lost")), "data.status"),
    ("user_id 0", encode(order_event(7, 0, 1)), "data.user_id"),
    (
        "updated_at as a number",
        encode(order_event(7, 3, 1, updated_at=1_795_000_000)),
        "data.updated_at",
    ),
]


@pytest.mark.parametrize(
    ("case", "value", "field"), INVALID_ORDERS, ids=[c[0] for c in INVALID_ORDERS]
)
def test_an_invalid_order_is_a_dead_letter_that_names_the_field(
    case: str, value: bytes, field: str
) -> None:
    letter = dead(value, entity="order")
    assert letter.kind == "invalid", case
    assert letter.reason.startswith(f"{field}:"), letter.reason


def test_a_reason_names_several_wrong_fields_and_counts_the_rest() -> None:
    value = user_event(7, 1, email="x", name="", active="no", country="gb", created_at=1)
    reason = dead(encode(value)).reason
    assert reason.endswith(" (+2 more)"), reason
    fields = [part.split(":")[0] for part in reason.removesuffix(" (+2 more)").split("; ")]
    assert fields == ["data.email", "data.name", "data.active"]


# --- the key -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (None, "missing key: expected b'7'"),
        (b"8", "key '8' does not match data.id 7"),
        (b" 7", "key ' 7' does not match data.id 7"),
        (b"07", "key '07' does not match data.id 7"),
        (b"\xff", "key '\ufffd' does not match data.id 7"),
    ],
)
def test_a_key_that_is_not_the_id_is_a_dead_letter(key: bytes | None, reason: str) -> None:
    letter = dead(encode(user_event(7, 1)), key=key)
    assert (letter.kind, letter.reason, letter.key) == ("bad_key", reason, key)


# --- what is valid becomes a change, exactly ----------------------------------------------


def test_a_user_upsert_becomes_a_change_with_exact_values() -> None:
    value = envelope(
        "user",
        17,
        user_data_7(country=None, updated_at="2026-11-24T11:00:00.123+01:00"),
        event_id=EVENT_ID,
        occurred_at="2026-11-24T10:00:00.123Z",
    )
    got = change(encode(value))
    assert (got.entity, got.id, got.version, got.op) == ("user", 7, 17, "upsert")
    assert got.event_id == uuid.UUID(EVENT_ID)
    assert got.occurred_at == datetime(2026, 11, 24, 10, 0, 0, 123000, tzinfo=UTC)
    assert got.source == Source("cdc.users", 2, 40)
    assert got.row == {
        "id": 7,
        "email": "user7@example.com",
        "name": "User 7",
        "active": True,
        "country": None,
        "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "updated_at": datetime(2026, 11, 24, 10, 0, 0, 123000, tzinfo=UTC),
    }
    assert got.row["updated_at"].utcoffset().total_seconds() == 3600  # the zone is kept


def test_an_order_upsert_becomes_a_change_with_exact_money() -> None:
    got = change(encode(order_event(7, 3, 4, total="12.50", status="paid")), entity="order")
    assert got.row == {
        "id": 7,
        "user_id": 3,
        "total": Decimal("12.50"),
        "currency": "EUR",
        "status": "paid",
        "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "updated_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    }
    assert (got.entity, got.id, got.version, got.op) == ("order", 7, 4, "upsert")


@pytest.mark.parametrize(
    ("raw", "total"),
    [
        (b"12.5", Decimal("12.50")),
        (b"12", Decimal("12.00")),
        (b"0", Decimal("0.00")),
        (b"99999999999.99", Decimal("99999999999.99")),
        (b"1e1", Decimal("10.00")),
    ],
)
def test_a_total_as_an_exact_json_number_is_accepted(raw: bytes, total: Decimal) -> None:
    assert change(order_with_raw_total(raw), entity="order").row["total"] == total  # type: ignore[index]


@pytest.mark.parametrize(
    ("raw", "shown"), [(b"12.5", "12.50"), (b'"12.5"', "12.50"), (b"12", "12.00"), (b'"7"', "7.00")]
)
def test_a_total_has_two_places_as_stored(raw: bytes, shown: str) -> None:
    # numeric(14,2) stores 12.50, and the outbox's `data` is "the row as stored": the
    # decoded value must already have its two places, not print as "12.5".
    total = change(order_with_raw_total(raw), entity="order").row["total"]  # type: ignore[index]
    assert str(total) == shown


def test_a_delete_becomes_a_change_without_row() -> None:
    value = {**delete_event("order", 7, 9), "event_id": EVENT_ID}
    got = change(encode(value), entity="order")
    assert (got.entity, got.id, got.version, got.op, got.row) == ("order", 7, 9, "delete", None)
    assert got.event_id == uuid.UUID(EVENT_ID)


def test_a_delete_may_carry_the_last_row() -> None:
    got = change(encode(envelope("user", 3, user_data_7(), op="delete")))
    assert (got.op, got.row) == ("delete", None)


def test_unknown_fields_are_ignored_and_version_zero_is_valid() -> None:
    value = {**user_event(7, 0), "trace": {"id": "x"}}
    value["data"] = {**value["data"], "added_later": [1, 2]}
    got = change(encode(value))
    assert got.version == 0
    assert got.row is not None
    assert "added_later" not in got.row


@pytest.mark.parametrize(
    ("value", "total"),
    [
        (order_with_raw_total(b"12.340000000000000000"), Decimal("12.34")),  # zeros: exact
        (order_with_raw_total(b"1.2e1"), Decimal("12.00")),
        (order_with_raw_total(b"1234567890.25"), Decimal("1234567890.25")),
        # `"total"` also elsewhere: the total is read again, and is exact
        (order_with_raw_total(b"5.5").replace(b'"op"', b'"note":"total","op"'), Decimal("5.50")),
    ],
)
def test_a_total_read_again_as_a_decimal_is_kept_when_exact(value: bytes, total: Decimal) -> None:
    assert change(value, entity="order").row["total"] == total  # type: ignore[index]


@pytest.mark.parametrize(
    "value",
    [
        order_with_raw_total(b"1e-400"),  # 0.0 as a float
        order_with_raw_total(b"0.1000000000000000055511151231257827"),  # 0.1 as a float
        # the key spelled with an escape, so that a search for it finds nothing
        order_with_raw_total(b"19.999999999999999999").replace(b'"total"', b'"tot\\u0061l"'),
    ],
)
def test_a_total_that_a_float_would_round_is_a_dead_letter(value: bytes) -> None:
    letter = dead(value, entity="order")
    assert letter.kind == "invalid"
    assert letter.reason.startswith("data.total:"), letter.reason


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_anywhere_are_not_json(literal: bytes) -> None:
    value = encode(user_event(7, 1)).replace(b'"op"', b'"extra":' + literal + b',"op"')
    assert dead(value).kind == "not_json"


def without(data: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != field}


def test_a_waiting_change_is_rebuilt_from_its_stored_envelope() -> None:
    for got in (
        change(encode(envelope("user", 4, user_data_7(country=None)))),
        change(encode(envelope("user", 5, without(user_data_7(), "country")))),
        change(order_with_raw_total(b"12.5"), entity="order"),
        change(encode(delete_event("order", 7, 9)), entity="order"),
    ):
        assert got.row is None or got.entity == "order" or "country" in got.row
        stored = json.loads(json.dumps(envelope_document(got)))  # as the jsonb column holds it
        assert change_from_envelope(got.entity, stored, got.source) == got


def test_a_float_elsewhere_in_data_does_not_turn_money_into_a_float() -> None:
    value = order_with_raw_total(b"12.25").replace(b'"user_id":3', b'"user_id":3,"score":0.1')
    assert change(value, entity="order").row["total"] == Decimal("12.25")  # type: ignore[index]


# --- nothing raises -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
keys = st.none() | st.binary(max_size=6) | st.integers(-5, 50).map(lambda i: str(i).encode())


def check_outcome(
    result: Change | DeadLetter, value: bytes | None, key: bytes | None = None
) -> None:
    if isinstance(result, DeadLetter):
        assert result.kind in KINDS
        assert result.reason
        assert "\n" not in result.reason
        assert result.value == (value[: LIMITS.dead_letter_value_bytes] if value else value)
        assert result.value_size == len(value or b"")
        assert result.key == (key[: LIMITS.dead_letter_key_bytes] if key else key)
        assert result.key_size == len(key or b"")
    else:
        assert isinstance(result, Change)
        assert result.op == "delete" or result.row is not None


@given(
    value=st.none() | st.binary(max_size=300), key=keys, entity=st.sampled_from(["user", "order"])
)
def test_arbitrary_bytes_never_raise(
    value: bytes | None, key: bytes | None, entity: Entity
) -> None:
    check_outcome(run(value, entity=entity, key=key), value, key)


@given(obj=st.dictionaries(st.text(max_size=12), json_values, max_size=8), key=keys)
def test_arbitrary_json_objects_never_raise(obj: dict[str, Any], key: bytes | None) -> None:
    value = json.dumps(obj).encode()  # json, not orjson: NaN, Infinity and huge ints too
    check_outcome(run(value, key=key), value, key)


REMOVED = object()
"""Stands for a field taken out of the envelope."""
FIELDS = sorted(
    {*UserUpsert.__annotations__, *UserData.__annotations__, *OrderData.__annotations__}
)


@given(
    entity=st.sampled_from(["user", "order"]),
    op=st.sampled_from(["upsert", "delete"]),
    at_data=st.booleans(),
    field=st.sampled_from(FIELDS),
    replacement=st.just(REMOVED) | json_values,
    key=keys,
)
def test_a_valid_envelope_with_any_field_replaced_never_raises(
    entity: Entity, op: str, at_data: bool, field: str, replacement: Any, key: bytes | None
) -> None:
    data = user_data_7() if entity == "user" else order_data(7, 3)
    value = envelope(entity, 5, data if op == "upsert" else {"id": 7}, op=op)
    target = value["data"] if at_data else value
    if replacement is REMOVED:
        target.pop(field, None)
    else:
        target[field] = replacement
    raw = json.dumps(value).encode()
    check_outcome(run(raw, entity=entity, key=key), raw, key)
