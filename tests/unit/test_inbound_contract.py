"""The published inbound schemas are the models' own, and they agree with the models.

contracts/inbound/ must equal what `sync_service.events.schemas` renders; an envelope that
the model accepts (or rejects) is accepted (or rejected) by the schema as well.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from sync_service.events.inbound import ORDER_ENVELOPE, USER_ENVELOPE
from sync_service.events.schemas import CONTRACTS_DIR, INBOUND, REGENERATE, render
from tests.factories import envelope, order_data, user_data

# CONTRACT.md section 1, verbatim.
CONTRACT_EXAMPLE: dict[str, Any] = {
    "event_id": "2b1f0c7e-8a55-4c1e-9d3e-6f1a2b3c4d5e",
    "entity": "user",
    "op": "upsert",
    "version": 17,
    "occurred_at": "2026-11-24T10:00:00.123Z",
    "data": {
        "id": 42,
        "email": "ada@example.com",
        "name": "Ada",
        "active": True,
        "country": "GB",
        "created_at": "2026-01-02T03:04:05Z",
        "updated_at": "2026-11-24T10:00:00.123Z",
    },
}

VALID = {
    "user.schema.json": [
        CONTRACT_EXAMPLE,
        envelope("user", 3, user_data(7, country=None)),
        envelope("user", 4, {"id": 7}, op="delete"),
        envelope("user", 5, {**user_data(7), "added_later": [1, 2]}),  # unknown: ignored
    ],
    "order.schema.json": [
        envelope("order", 0, order_data(1, 7, total="12.50")),
        envelope("order", 1, order_data(1, 7, total=12)),
        envelope("order", 2, {"id": 1}, op="delete"),
    ],
}
INVALID = {
    "user.schema.json": [
        {**CONTRACT_EXAMPLE, "op": "merge"},
        {**CONTRACT_EXAMPLE, "entity": "order"},
        {**CONTRACT_EXAMPLE, "version": -1},
        {**CONTRACT_EXAMPLE, "event_id": "not-a-uuid"},
        envelope("user", 1, user_data(0)),
        envelope("user", 1, user_data(7, active="yes")),
        envelope("user", 1, user_data(7, country="gb")),
        envelope("user", 1, {"id": 7}),  # an upsert needs the whole row
        envelope("user", 1, {"email": "a@example.com"}, op="delete"),
    ],
    "order.schema.json": [
        envelope("order", 1, order_data(1, 7, currency="eur")),
        envelope("order", 1, order_data(1, 7, status="lost")),
        envelope("order", 1, order_data(1, 7), op="upsert") | {"entity": "user"},
        envelope("order", 1, {"id": "1"}, op="delete"),
    ],
}
INVALID_CASES = [
    *((name, event) for name, events in INVALID.items() for event in events),
    ("order.schema.json", envelope("order", 1, order_data(1, 7, total=-1))),
]
ADAPTERS = {name: adapter for name, (adapter, _) in INBOUND.items()}


def _committed(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CONTRACTS_DIR / name).read_text(encoding="utf-8"))
    return loaded


@pytest.mark.parametrize("name", sorted(INBOUND))
def test_committed_schema_is_what_the_models_generate(name: str) -> None:
    path = CONTRACTS_DIR / name
    committed = path.read_text(encoding="utf-8") if path.exists() else None
    assert committed == render(name), (
        f"contracts/inbound/{name} differs from the models: regenerate it with `{REGENERATE}`"
        " and commit the result (and say in contracts/README.md whether the change is compatible)"
    )


def test_the_contract_example_is_a_user_upsert() -> None:
    parsed = USER_ENVELOPE.validate_json(json.dumps(CONTRACT_EXAMPLE))
    assert parsed["op"] == "upsert"
    assert (parsed["data"]["id"], parsed["version"], parsed["data"]["email"]) == (
        42,
        17,
        "ada@example.com",
    )
    with pytest.raises(ValidationError):
        ORDER_ENVELOPE.validate_json(json.dumps(CONTRACT_EXAMPLE))


def test_money_is_exact_in_the_model() -> None:
    event = envelope("order", 1, order_data(1, 7, total="0.10"))
    parsed = ORDER_ENVELOPE.validate_json(json.dumps(event))
    assert parsed["op"] == "upsert"
    assert str(parsed["data"]["total"]) == "0.10"


@pytest.mark.parametrize(("name", "event"), [(n, e) for n, es in VALID.items() for e in es])
def test_the_model_accepts_what_the_schema_accepts(name: str, event: dict[str, Any]) -> None:
    ADAPTERS[name].validate_json(json.dumps(event))
    _validator(name).validate(event)


@pytest.mark.parametrize(("name", "event"), INVALID_CASES)
def test_the_model_rejects_what_the_schema_rejects(name: str, event: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ADAPTERS[name].validate_json(json.dumps(event))
    assert not _validator(name).is_valid(event)


@pytest.mark.parametrize("name", sorted(INBOUND))
def test_committed_schema_is_valid_draft_2020_12(name: str) -> None:

    jsonschema.Draft202012Validator.check_schema(_committed(name))


def _validator(name: str) -> Any:
    """A validator of the committed file; formats (uuid, email) are checked too."""

    validator = jsonschema.Draft202012Validator
    return validator(_committed(name), format_checker=validator.FORMAT_CHECKER)
