"""Upserts are rendered as they are batched, ahead of the transaction; the writer uses a
rendered outbox row only for the very change and row it was rendered from.
"""

from __future__ import annotations

import orjson

from sync_service.events.outbound import downstream_event_text
from sync_service.pipeline.batch import BatchBuilder
from sync_service.pipeline.plan import plan
from sync_service.pipeline.render import outbox_tail, render, rendered_tail
from sync_service.pipeline.write import _outbox_rows
from tests.factories import delete_event, order_event, user_event
from tests.unit.fakes import decoded


def test_an_upsert_is_rendered_as_plan_applies_it_and_a_delete_is_not() -> None:
    upsert, gone = decoded(user_event(1, 3)), decoded(delete_event("user", 1, 4))
    rendered = render(upsert)
    assert rendered is not None
    assert render(gone) is None
    (applied,) = plan([upsert], [], {"user": {}, "order": {}}).applied
    assert rendered.row == applied.row
    assert rendered.tail == outbox_tail(upsert, applied.row)
    entity, aggregate_id, kind, event_id, version, payload = rendered.tail
    assert (entity, aggregate_id, kind, version) == ("user", "1", "user.upserted", 3)
    assert event_id == downstream_event_text(upsert.event_id)
    assert orjson.loads(payload)["data"]["version"] == 3


def test_the_builder_renders_the_upserts_it_takes_in() -> None:
    builder = BatchBuilder(max_events=10, max_wait_s=1)
    changes = [
        decoded(order_event(5, 1, 1), offset=0),
        decoded(delete_event("order", 5, 2), offset=1),
    ]
    for change in changes:
        builder.add(change, now=0.0)
    batch = builder.take()
    assert [r.change for r in batch.rendered.values()] == [changes[0]]
    assert batch.rendered[id(changes[0])].change is changes[0]


def test_a_rendered_row_is_used_only_for_its_own_change_and_row() -> None:
    upsert = decoded(user_event(1, 3))
    rendered = render(upsert)
    assert rendered is not None
    assert rendered_tail(rendered, upsert, dict(rendered.row)) is rendered.tail
    # An equal change that is another object (a re-read copy) is rendered afresh.
    twin = upsert._replace()
    assert rendered_tail(rendered, twin, rendered.row) is not rendered.tail
    # The same change leaving another row: the row it leaves is what is published.
    other = {**rendered.row, "name": "someone else"}
    tail = rendered_tail(rendered, upsert, other)
    assert orjson.loads(tail[-1])["data"]["name"] == "someone else"
    assert tail == outbox_tail(upsert, other)


async def test_outbox_rows_are_the_same_rendered_ahead_or_in_the_transaction() -> None:
    builder = BatchBuilder(max_events=10, max_wait_s=1)
    changes = [
        decoded(user_event(1, 1), offset=0),
        decoded(user_event(1, 2, name="Second"), offset=1),
        decoded(delete_event("user", 1, 3), offset=2),
    ]
    for change in changes:
        builder.add(change, now=0.0)
    batch = builder.take()
    applied = plan(batch.changes, [], {"user": {}, "order": {}}).applied
    ahead = await _outbox_rows(applied, 42, batch.rendered)
    now = await _outbox_rows(applied, 42, {})
    assert ahead == now
    assert [row[0] for row in ahead] == [42, 42, 42]
    assert [row[3] for row in ahead] == ["user.upserted", "user.upserted", "user.deleted"]
