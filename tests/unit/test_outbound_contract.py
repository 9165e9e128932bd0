"""The published outbound schema is the model's own, and what the writer stores as a payload
(which the relay publishes byte for byte) is a valid outbound event.

contracts/outbound/event.schema.json must equal what `sync_service.relay.schemas` renders;
regenerate it with `python -m sync_service.relay.schemas`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from sync_service.events.change import Source
from sync_service.events.outbound import (
    OutboundEvent,
    downstream_event_id,
    outbound_value,
    snapshot_event_id,
    snapshot_value,
)
from sync_service.pipeline.decode import change_from_envelope
from sync_service.relay.schemas import CONTRACTS_DIR, EVENT_SCHEMA, REGENERATE, render
from tests.factories import delete_event, order_event, user_event


def test_committed_schema_is_what_the_model_generates() -> None:
    path = CONTRACTS_DIR / EVENT_SCHEMA
    committed = path.read_text(encoding="utf-8") if path.exists() else None
    assert committed == render(), (
        f"contracts/outbound/{EVENT_SCHEMA} differs from OutboundEvent: regenerate it with"
        f" `{REGENERATE}` and say in contracts/outbound/README.md whether consumers must change"
    )


def _payload(envelope: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A payload as the writer stores it, back from its JSON."""
    change = change_from_envelope(envelope["entity"], envelope, Source("cdc.x", 2, 40))
    return dict(orjson.loads(orjson.dumps(outbound_value(change, row), default=str)))


PAYLOADS = [
    _payload(user_event(42, 17), {"id": 42, "email": "a@example.com", "version": 17}),
    _payload(order_event(7, 42, 3, total="12.50"), {"id": 7, "total": "12.50", "version": 3}),
    _payload(delete_event("order", 7, 4), {"id": 7, "version": 4, "deleted_at": "2026-11-24"}),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=["user", "order", "delete"])
def test_a_stored_payload_is_a_valid_outbound_event(payload: dict[str, Any]) -> None:
    event = OutboundEvent.model_validate(payload)
    assert event.source is not None
    assert event.event_id == downstream_event_id(event.source.event_id)
    assert (event.source.topic, event.source.partition, event.source.offset) == ("cdc.x", 2, 40)
    assert event.aggregate_id == str(event.data["id"])
    _validator().validate(payload)


@pytest.mark.parametrize(
    "broken",
    [
        {"type": "user.merged"},
        {"event_id": "not-a-uuid"},
        {"surprise": True},
        {"source": {"topic": "cdc.x", "partition": 0, "offset": 1}},
    ],
)
def test_the_schema_and_the_model_reject_the_same_broken_events(broken: dict[str, Any]) -> None:
    payload = {**PAYLOADS[0], **broken}
    with pytest.raises(ValidationError):
        OutboundEvent.model_validate(payload)
    assert not _validator().is_valid(payload)


def test_the_contract_names_every_field_of_the_value() -> None:
    schema = json.loads(render())
    assert set(schema["required"]) == {
        "event_id", "type", "aggregate_id", "version", "occurred_at", "data", "source",
    }  # fmt: skip
    assert set(schema["properties"]["type"]["enum"]) == {
        "user.upserted", "user.deleted", "order.upserted", "order.deleted",
        "user.snapshot", "order.snapshot",
    }  # fmt: skip


def test_a_snapshot_is_a_valid_outbound_event_without_a_source() -> None:
    row = {
        "id": 7, "user_id": 42, "total": Decimal("12.50"), "currency": "EUR", "status": "paid",
        "created_at": datetime(2026, 1, 2, tzinfo=UTC),
        "updated_at": datetime(2026, 1, 3, tzinfo=UTC), "version": 3, "deleted_at": None,
    }  # fmt: skip
    event_id = snapshot_event_id(12, "order", 7, 3)
    value = snapshot_value("order", row, event_id, datetime(2026, 12, 5, tzinfo=UTC))
    payload = orjson.loads(orjson.dumps(value, default=str))
    event = OutboundEvent.model_validate(payload)
    assert (event.type, event.aggregate_id, event.version, event.source) == (
        "order.snapshot", "7", 3, None,
    )  # fmt: skip
    assert payload["data"]["total"] == "12.50"
    assert snapshot_event_id(12, "order", 7, 3) == event_id != snapshot_event_id(13, "order", 7, 3)
    _validator().validate(payload)


def _validator() -> Any:
    """A validator of the committed file, formats (uuid, date-time) included."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency")
    validator = jsonschema.Draft202012Validator
    committed = json.loads((CONTRACTS_DIR / EVENT_SCHEMA).read_text(encoding="utf-8"))
    return validator(committed, format_checker=validator.FORMAT_CHECKER)
