"""The rows the Quix Streams peer gives its sinks, from our native envelopes (standard
library only: imported by the application in its own virtualenv, and by the tests)."""

from __future__ import annotations

from typing import Any


class SqlNull:
    """A field's NULL that the sink keeps (it drops fields whose value is None); the
    application adapts it to SQL NULL for psycopg2."""


NULL = SqlNull()


def upsert_row(event: dict[str, Any]) -> dict[str, Any]:
    """The row an upsert leaves: its data with its version, every column present."""
    row = {name: NULL if value is None else value for name, value in event["data"].items()}
    row["version"] = event["version"]
    return row


def delete_row(event: dict[str, Any]) -> dict[str, Any]:
    """A soft delete: only the key, the version and `deleted_at` are written."""
    return {"id": event["data"]["id"], "version": event["version"],
            "deleted_at": event["occurred_at"]}  # fmt: skip
