"""Render, ahead of the batch's transaction, what a change writes that no stored row can
change: an upsert's row after it applies, and its outbox row but for the transaction id.

The batch writer runs one transaction at a time, and the consumer decodes the next batch
while it does; rendering the outbox rows there (a third of a batch's Python in the
transaction, measured) takes them off the writer's path. Whether a change applies, waits
or is stale is still decided in the transaction, from the stored rows (`plan`): a
rendered row is only used for a change that applies with exactly the rendered row.

Invariant: `plan` gives an upsert that applies the row `{**change.row, "version":
change.version, "deleted_at": None}`, whatever was stored; so its outbound event is a
function of the change alone. A delete's row keeps the stored columns: never rendered.
"""

from __future__ import annotations

from typing import NamedTuple

import orjson

from sync_service.events.change import Change, Entity
from sync_service.events.outbound import downstream_event_text, event_type, outbound_value
from sync_service.pipeline.plan import Row

OutboxTail = tuple[Entity, str, str, str, int, str]
"""An outbox row without its first column, the transaction id: `aggregate_type`,
`aggregate_id`, `event_type`, `event_id`, `version`, `payload`."""


class Rendered(NamedTuple):
    """A change, the row it leaves if it applies, and that row's outbox row (a named
    tuple: one is made per consumed upsert)."""

    change: Change
    row: Row
    tail: OutboxTail


def outbox_tail(change: Change, row: Row) -> OutboxTail:
    """The outbox row of `change` leaving `row`, in the outbox's column order after
    `txid`."""
    event_id = downstream_event_text(change.event_id)
    kind = event_type(change)
    aggregate_id = str(change.id)  # each computed once, for its column and the payload
    value = outbound_value(change, row, event_id, kind, aggregate_id)
    payload = orjson.dumps(value, default=str).decode()
    return (change.entity, aggregate_id, kind, event_id, change.version, payload)


def render(change: Change) -> Rendered | None:
    """`change`'s row and outbox row should it apply; None for a delete (its row depends
    on the stored one)."""
    data = change.row
    if data is None:
        return None
    row = {**data, "version": change.version, "deleted_at": None}
    return Rendered(change, row, outbox_tail(change, row))


def rendered_tail(rendered: Rendered | None, change: Change, row: Row) -> OutboxTail:
    """The outbox row of `change` applied as `row`: the rendered one when it was rendered
    from this very change and the same row, else rendered now."""
    if rendered is not None and rendered.change is change and rendered.row == row:
        return rendered.tail
    return outbox_tail(change, row)
