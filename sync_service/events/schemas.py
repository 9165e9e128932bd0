"""JSON Schemas of the inbound envelopes, generated from the Pydantic models in `inbound`.

The files in contracts/inbound/ are exactly `render(name)`, byte for byte; a test fails on
drift. Regenerate them with `python -m sync_service.events.schemas`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from sync_service.events.inbound import ORDER_ENVELOPE, USER_ENVELOPE

REGENERATE = "python -m sync_service.events.schemas"
CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "contracts" / "inbound"

_RULES = "Rules no schema can express (key, version order, topic) are in contracts/README.md."
INBOUND: dict[str, tuple[TypeAdapter[Any], str]] = {
    "user.schema.json": (
        USER_ENVELOPE,
        "One change of one user, on the user changes topic (SYNC_USERS_TOPIC, default"
        " cdc.users): an upsert carries the whole row, a delete at least its id. " + _RULES,
    ),
    "order.schema.json": (
        ORDER_ENVELOPE,
        "One change of one order, on the order changes topic (SYNC_ORDERS_TOPIC, default"
        " cdc.orders): an upsert carries the whole row, a delete at least its id. " + _RULES,
    ),
}


def schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one inbound envelope, as the model validates it."""
    adapter, description = INBOUND[name]
    entity = name.split(".", 1)[0]
    return {
        **adapter.json_schema(mode="validation"),
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:sync-service:inbound:{entity}",
        "title": f"sync-service inbound {entity} change",
        "description": description,
    }


def render(name: str) -> str:
    """The file's exact text: sorted keys and a two-space indent, so that output is stable."""
    return json.dumps(schema(name), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(directory: Path = CONTRACTS_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in INBOUND:
        path = directory / name
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else CONTRACTS_DIR):
        print(f"wrote {path}")
