"""A batch is due when full or when its oldest record has waited long enough, and it
carries, per partition, the offset after its last record: never more, never less.
"""

from __future__ import annotations

from sync_service.events.change import Change, DeadLetter, Source
from sync_service.pipeline.batch import BatchBuilder
from tests.factories import user_event
from tests.unit.fakes import decoded

USERS, ORDERS = "cdc.users", "cdc.orders"


def record(topic: str, partition: int, offset: int) -> Change:
    # The topic a change was read from is all the builder looks at, whatever its entity.
    change = decoded(user_event(offset + 1, 1), partition=partition, offset=offset)
    return change._replace(source=Source(topic, partition, offset))


def letter(topic: str, partition: int, offset: int) -> DeadLetter:
    return DeadLetter(
        Source(topic, partition, offset), b"1", b"{", 1, "not_json", "bad", key_size=1
    )


def test_an_empty_builder_is_never_due() -> None:
    builder = BatchBuilder(max_events=2, max_wait_s=0.5)
    assert (len(builder), builder.full(), builder.due(now=1e9)) == (0, False, False)


def test_a_batch_is_due_once_its_oldest_record_has_waited_max_wait() -> None:
    builder = BatchBuilder(max_events=100, max_wait_s=0.5)
    builder.add(record(USERS, 0, 0), now=10.0)
    builder.add(record(USERS, 0, 1), now=10.4)  # a later record does not restart the clock
    assert not builder.due(now=10.49)
    assert builder.due(now=10.5)
    assert not builder.full()


def test_a_batch_is_due_when_full_counting_dead_letters() -> None:
    builder = BatchBuilder(max_events=3, max_wait_s=60)
    builder.add(record(USERS, 0, 0), now=0)
    builder.add(letter(USERS, 0, 1), now=0)
    assert not builder.full()
    assert not builder.due(now=0)
    builder.add(record(ORDERS, 1, 7), now=0)
    assert (len(builder), builder.full(), builder.due(now=0)) == (3, True, True)


def test_take_hands_over_the_batch_and_starts_an_empty_one() -> None:
    builder = BatchBuilder(max_events=10, max_wait_s=1)
    changes = [record(USERS, 0, 0), record(ORDERS, 2, 5)]
    dead = letter(USERS, 0, 1)
    builder.add(changes[0], now=3.0)
    builder.add(dead, now=3.1)
    builder.add(changes[1], now=3.2)
    batch = builder.take()
    assert (batch.changes, batch.dead, batch.opened_at, len(batch)) == (changes, [dead], 3.0, 3)
    assert (len(builder), builder.due(now=100)) == (0, False)
    assert builder.take().next_offsets == {}
    builder.add(record(USERS, 0, 2), now=50.0)
    assert builder.take().opened_at == 50.0  # the next batch's clock starts at its own record


def test_next_offsets_are_last_offset_plus_one_per_partition() -> None:
    builder = BatchBuilder(max_events=100, max_wait_s=1)
    items: list[Change | DeadLetter] = [
        record(USERS, 0, 10),
        record(USERS, 1, 3),
        letter(USERS, 0, 11),  # a dead letter moves its partition on too
        record(ORDERS, 0, 7),
        record(USERS, 0, 12),
    ]
    for item in items:
        builder.add(item, now=0)
    assert builder.take().next_offsets == {(USERS, 0): 13, (USERS, 1): 4, (ORDERS, 0): 8}


def test_next_offsets_keep_the_highest_when_an_earlier_offset_comes_later() -> None:
    builder = BatchBuilder(max_events=100, max_wait_s=1)
    builder.add(record(USERS, 0, 9), now=0)
    builder.add(record(USERS, 0, 4), now=0)  # re-read after a rewind within the batch
    assert builder.take().next_offsets == {(USERS, 0): 10}


def test_drop_forgets_the_revoked_partitions_and_keeps_the_rest_as_they_were() -> None:
    builder = BatchBuilder(max_events=100, max_wait_s=1.0)
    kept = [record(USERS, 0, 5), record(ORDERS, 1, 2), record(USERS, 0, 6)]
    kept_dead = letter(ORDERS, 1, 3)
    builder.add(kept[0], now=20.0)
    builder.add(record(USERS, 1, 8), now=20.2)
    builder.add(kept[1], now=20.3)
    builder.add(kept_dead, now=20.3)
    builder.add(letter(USERS, 1, 9), now=20.4)
    builder.add(kept[2], now=20.5)

    builder.drop({(USERS, 1), (ORDERS, 5)})

    assert len(builder) == 4
    assert not builder.due(now=20.99)
    assert builder.due(now=21.0)  # still timed from the oldest kept record
    batch = builder.take()
    assert (batch.changes, batch.dead, batch.opened_at) == (kept, [kept_dead], 20.0)
    assert batch.next_offsets == {(USERS, 0): 7, (ORDERS, 1): 4}


def test_dropping_every_partition_leaves_nothing_due() -> None:
    builder = BatchBuilder(max_events=1, max_wait_s=0)
    builder.add(record(USERS, 0, 0), now=0)
    builder.drop({(USERS, 0)})
    assert (len(builder), builder.full(), builder.due(now=1e9)) == (0, False, False)
    assert builder.take().next_offsets == {}
