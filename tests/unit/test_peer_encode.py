"""Native envelopes become the peer's Debezium change events without losing a value."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from bench.peer.database import expected_state
from bench.peer.encode import decode_money, encode_for_peer, in_version_order, money
from tests.factories import delete_event, encode, order_event, user_event


def _decoded(event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    key, value = encode_for_peer(encode(event))
    return orjson.loads(key), orjson.loads(value)


def _fields(schema: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    struct = next(f for f in schema["fields"] if f["field"] == name)
    return {f["field"]: f for f in struct["fields"]}


def test_an_order_upsert_keeps_every_value_exact() -> None:
    event = order_event(7, 3, 12, total="123456789012.34", updated_at="2026-11-24T10:00:00.5+02:00")

    key, value = _decoded(event)

    assert key["payload"] == {"id": 7}
    assert key["schema"]["fields"] == [{"field": "id", "type": "int64", "optional": False}]
    assert value["schema"]["name"] == "peer.orders.Envelope"
    payload = value["payload"]
    assert (payload["op"], payload["before"]) == ("u", None)
    after = payload["after"]
    assert decode_money(after.pop("total")) == Decimal("123456789012.34")
    expected = {k: v for k, v in event["data"].items() if k != "total"}
    assert after == {**expected, "version": 12}
    fields = _fields(value["schema"], "after")
    assert list(fields) == [*event["data"], "version"]
    assert fields["total"]["name"] == "org.apache.kafka.connect.data.Decimal"
    assert fields["total"]["parameters"]["scale"] == "2"
    assert fields["updated_at"]["name"] == "io.debezium.time.ZonedTimestamp"


def test_a_user_delete_carries_the_key_and_version_only() -> None:
    key, value = _decoded(delete_event("user", 42, 9))

    assert key["payload"] == {"id": 42}
    assert value["schema"]["name"] == "peer.users.Envelope"
    assert value["payload"] == {"before": {"id": 42, "version": 9}, "after": None, "op": "d"}
    assert {n for n, f in _fields(value["schema"], "before").items() if not f["optional"]} == {
        "id",
        "version",
    }


@pytest.mark.parametrize(
    ("total", "exact"),
    [("0", "0.00"), ("10.5", "10.50"), (0.1, "0.10"), (999999999999.99, "999999999999.99")],
)
def test_money_is_connect_decimal_with_scale_two(total: str | float, exact: str) -> None:
    assert str(decode_money(money(total))) == exact


def test_money_with_more_places_than_the_column_is_refused() -> None:
    with pytest.raises(ValueError, match="decimal places"):
        money("1.005")


def test_version_order_keeps_each_keys_slots_and_every_duplicate() -> None:
    events = [("a", 2), ("b", 1), ("a", 1), ("a", 2), ("b", 3), ("b", 2)]

    ordered = in_version_order(events, key=lambda e: e[0], version=lambda e: e[1])

    assert ordered == [("a", 1), ("b", 1), ("a", 2), ("a", 2), ("b", 2), ("b", 3)]


def test_the_expected_state_is_each_entitys_highest_version_without_deleted_ones() -> None:
    events = [
        user_event(1, 2, name="Two"),
        user_event(1, 1, name="One"),  # late and older: ignored
        user_event(2, 1),
        delete_event("user", 2, 2),
        order_event(5, 1, 3, total="7.10"),
    ]

    state = expected_state(encode(e) for e in events)

    assert set(state.rows["user"]) == {1}
    assert state.rows["user"][1][2] == "Two"
    assert state.rows["user"][1][-1] == 2
    (order,) = state.rows["order"].values()
    assert order[2] == Decimal("7.10")
    assert order[5] == datetime.fromisoformat(events[-1]["data"]["created_at"])
