"""The end of a bounded replay: the batch that reaches it leaves out its records from the
end on, and its position becomes the one the partition resumes at; other partitions and
batches short of the end are untouched."""

from __future__ import annotations

from sync_service.events.change import Change, DeadLetter
from sync_service.pipeline.batch import Batch, BatchBuilder
from sync_service.pipeline.write import _bound
from tests.unit.test_batch import letter, record

USERS, ORDERS = "cdc.users", "cdc.orders"


def built(*items: Change | DeadLetter) -> Batch:
    builder = BatchBuilder(max_events=100, max_wait_s=1)
    for item in items:
        builder.add(item, now=0.0)
    return builder.take()


def test_a_batch_short_of_the_end_is_left_as_it_is() -> None:
    batch = built(record(USERS, 0, 2), record(USERS, 0, 3))
    same, resumed = _bound(batch, {(USERS, 0): (5, 9)})
    assert same is batch
    assert resumed == {}


def test_the_batch_that_reaches_the_end_stops_there_and_resumes_at_the_old_position() -> None:
    batch = built(
        record(USERS, 0, 3), record(USERS, 0, 4), letter(USERS, 0, 5), record(USERS, 0, 6),
        record(USERS, 1, 7), record(ORDERS, 0, 8),
    )  # fmt: skip
    bounded, resumed = _bound(batch, {(USERS, 0): (5, 9), (ORDERS, 0): (20, 30)})
    assert resumed == {(USERS, 0): 9}
    kept = [(c.source.topic, c.source.partition, c.source.offset) for c in bounded.changes]
    assert kept == [(USERS, 0, 3), (USERS, 0, 4), (USERS, 1, 7), (ORDERS, 0, 8)]
    assert bounded.dead == []
    assert bounded.next_offsets == {(USERS, 0): 9, (USERS, 1): 8, (ORDERS, 0): 9}


def test_an_end_reached_exactly_keeps_the_whole_batch() -> None:
    batch = built(record(USERS, 0, 3), record(USERS, 0, 4))
    bounded, resumed = _bound(batch, {(USERS, 0): (5, 9)})
    assert len(bounded) == 2
    assert (resumed, bounded.next_offsets) == ({(USERS, 0): 9}, {(USERS, 0): 9})


def test_a_record_past_the_end_alone_still_ends_the_replay() -> None:
    """When the last offset of the range holds no record (a transaction marker), the first
    record after it is what reaches the end: it is left out, and the partition resumes."""
    batch = built(record(USERS, 0, 6))
    bounded, resumed = _bound(batch, {(USERS, 0): (5, 9)})
    assert (len(bounded), resumed) == (0, {(USERS, 0): 9})
