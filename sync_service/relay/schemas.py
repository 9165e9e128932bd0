"""The JSON Schema of the outbound event value, generated from `OutboundEvent`.

contracts/outbound/event.schema.json is exactly `render()`, byte for byte; a test fails
on drift. Regenerate it with `python -m sync_service.relay.schemas`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sync_service.events.outbound import OutboundEvent

REGENERATE = "python -m sync_service.relay.schemas"
CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "contracts" / "outbound"
EVENT_SCHEMA = "event.schema.json"
_DESCRIPTION = (
    "The value of one message on the downstream topics (SYNC_OUT_USERS_TOPIC, default"
    " sync.users; SYNC_OUT_ORDERS_TOPIC, default sync.orders): one applied change, or a"
    " snapshot of a row's current state (`*.snapshot`, source null). The key"
    " is `aggregate_id` as UTF-8; headers `event_type` and `event_id` repeat `type` and"
    " `event_id`. Ordering and delivery rules are in contracts/outbound/README.md."
)


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of an outbound event, as the relay publishes it."""
    return {
        **OutboundEvent.model_json_schema(mode="serialization"),
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:sync-service:outbound:event",
        "title": "sync-service outbound event",
        "description": _DESCRIPTION,
    }


def render() -> str:
    """The file's exact text: sorted keys and a two-space indent, so that output is stable."""
    return json.dumps(schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(directory: Path = CONTRACTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / EVENT_SCHEMA
    path.write_text(render(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write(Path(sys.argv[1]) if len(sys.argv) > 1 else CONTRACTS_DIR)}")
