"""A dead letter as a Kafka record on `SYNC_DLQ_TOPIC`: the original key and (kept) value,
the original headers, and the reason and origin in `dlq.*` headers.

It travels through the outbox: the batch that stores a dead letter also writes an outbox
row of aggregate type `dead_letter` (its payload carries the bytes as base64), and the
relay publishes it in its Kafka transactions like any other row, so each dead letter is
on the topic exactly once, in commit order, with no producer in the consumer.
"""

from __future__ import annotations

from base64 import b64decode, b64encode
from typing import Any
from uuid import UUID, uuid5

import orjson

from sync_service.events.change import DeadLetter

DEAD_LETTER = "dead_letter"
"""The outbox rows' aggregate type and event type."""
_NAMESPACE = UUID("6f2b8f0e-6d0c-5b7e-9a51-2f3c0d1e4a77")
HEADER_PREFIX = "dlq."


def event_id(topic: str, partition: int, offset: int) -> UUID:
    """The same record always gets the same id (a replay stores no second letter)."""
    return uuid5(_NAMESPACE, f"{topic}/{partition}/{offset}")


def outbox_payload(letter: DeadLetter) -> str:
    """The outbox row's JSON payload: everything the record on the topic is made of."""
    source = letter.source
    document: dict[str, Any] = {
        "topic": source.topic,
        "partition": source.partition,
        "offset": source.offset,
        "kind": letter.kind,
        "reason": letter.reason,
        "value_size": letter.value_size,
        "key": _b64(letter.key),
        "value": _b64(letter.value),
        "headers": [[name, _b64(value)] for name, value in letter.headers],
    }
    return orjson.dumps(document).decode()


def to_message(
    dlq_topic: str, payload: bytes, event_id_text: bytes
) -> tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The record published for an outbox row of type `dead_letter`: topic, key, value,
    headers (the original ones first, then `dlq.topic`, `dlq.partition`, `dlq.offset`,
    `dlq.kind`, `dlq.reason`, `dlq.value_size`, and `event_type` / `event_id`)."""
    document = orjson.loads(payload)
    headers = [(str(name), _bytes(value) or b"") for name, value in document["headers"]]
    for field in ("topic", "partition", "offset", "kind", "reason", "value_size"):
        headers.append((HEADER_PREFIX + field, str(document[field]).encode()))
    headers += [("event_type", DEAD_LETTER.encode()), ("event_id", event_id_text)]
    return dlq_topic, _bytes(document["key"]), _bytes(document["value"]), headers


def _b64(value: bytes | None) -> str | None:
    return None if value is None else b64encode(value).decode()


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else b64decode(value)
