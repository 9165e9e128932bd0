"""Native envelopes for tests: valid by default, every field overridable."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

T0 = "2026-01-02T03:04:05Z"


def user_data(user_id: int, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": user_id,
        "email": f"user{user_id}@example.com",
        "name": f"User {user_id}",
        "active": True,
        "country": "GB",
        "created_at": T0,
        "updated_at": T0,
    }
    data.update(overrides)
    return data


def order_data(order_id: int, user_id: int, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": order_id,
        "user_id": user_id,
        "total": "10.00",
        "currency": "EUR",
        "status": "pending",
        "created_at": T0,
        "updated_at": T0,
    }
    data.update(overrides)
    return data


def envelope(
    entity: str,
    version: int,
    data: dict[str, Any],
    *,
    op: str = "upsert",
    event_id: str | None = None,
    occurred_at: str = "2026-11-24T10:00:00.123Z",
) -> dict[str, Any]:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "entity": entity,
        "op": op,
        "version": version,
        "occurred_at": occurred_at,
        "data": data,
    }


def user_event(user_id: int, version: int, **overrides: Any) -> dict[str, Any]:
    return envelope("user", version, user_data(user_id, **overrides))


def order_event(order_id: int, user_id: int, version: int, **overrides: Any) -> dict[str, Any]:
    return envelope("order", version, order_data(order_id, user_id, **overrides))


def delete_event(entity: str, entity_id: int, version: int) -> dict[str, Any]:
    return envelope(entity, version, {"id": entity_id}, op="delete")


def encode(value: dict[str, Any]) -> bytes:
    return orjson.dumps(value)


def key_of(value: dict[str, Any]) -> bytes:
    return str(value["data"]["id"]).encode()
