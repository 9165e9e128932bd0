"""The service's own view of one validated change, and of one message it could not use.

A `Change` is immutable and carries where it came from, so that every row, outbox event
and dead letter can name its source record. `Change` and `Source` are named tuples: one
of each is made per consumed record, and a tuple is built several times faster than a
frozen dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from uuid import UUID

if TYPE_CHECKING:
    from sync_service.events.inbound import Envelope

Entity = Literal["user", "order"]
Op = Literal["upsert", "delete"]
DeadLetterKind = Literal[
    "empty", "oversized", "too_deep", "not_json", "invalid", "wrong_entity", "bad_key",
    "unsupported_op", "unsupported_source",
]  # fmt: skip
"""What is wrong with a dead letter, as contracts/README.md lists the kinds (the last two
only in the Debezium input)."""


class Source(NamedTuple):
    """The Kafka record a change was read from."""

    topic: str
    partition: int
    offset: int


class Change(NamedTuple):
    """One source change of one entity: `row` holds the data columns of an upsert."""

    entity: Entity
    id: int
    version: int
    op: Op
    event_id: UUID
    occurred_at: datetime
    row: dict[str, Any] | None
    source: Source
    envelope: Envelope
    """The validated envelope, stored (as JSON) should the change have to wait."""
    snapshot: bool = False
    """A snapshot read (Debezium's `op` `r`): the row as the source held it, not a change
    made in the source; one equal to the stored live row changes nothing."""


class Skipped(NamedTuple):
    """A record that holds no change by design (a tombstone after a delete): only its
    position advances."""

    source: Source
    kind: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that cannot be applied, and why; it is stored, never dropped. `key` and
    `value` are their first bytes up to the dead-letter caps; the sizes are whole."""

    source: Source
    key: bytes | None
    value: bytes | None
    value_size: int
    kind: DeadLetterKind
    reason: str
    key_size: int
    headers: tuple[tuple[str, bytes | None], ...] = ()
    """The record's Kafka headers, in order (set by the consumer: decoding needs none)."""
