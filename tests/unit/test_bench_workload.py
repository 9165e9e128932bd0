"""The benchmark's workload: the final rows and outbox rows rebuilt from the events are
exactly what the generator expects, as the machine's-limit load needs them."""

from __future__ import annotations

import uuid
from collections import Counter

import orjson

from bench.workload import Topics, Workload, event_ids, final_state
from sync_service.ops.traffic import canonical_row, checksum_of
from sync_service.pipeline.plan import COLUMNS

TOPICS = Topics("cdc.users", "cdc.orders")


def test_final_state_is_the_expected_one_with_one_outbox_row_per_change() -> None:
    workload = Workload.generate(3_000, seed=5, partitions=4)
    x = workload.expected

    final = final_state(workload, TOPICS)

    users = [canonical_row("user", dict(zip(COLUMNS["user"], r, strict=True))) for r in final.users]
    orders = [canonical_row("order", dict(zip(COLUMNS["order"], r, strict=True)))
              for r in final.orders]  # fmt: skip
    assert checksum_of(users, orders) == x.checksum()
    assert len(final.outbox) == x.changes  # every distinct change, duplicates once
    keys = Counter((row[0], row[1], row[4]) for row in final.outbox)
    assert max(keys.values()) == 1  # (aggregate_type, aggregate_id, version) is unique
    assert len({row[3] for row in final.outbox}) == x.changes  # downstream event ids


def test_outbox_payloads_carry_the_row_after_the_change() -> None:
    workload = Workload.generate(2_000, seed=9, partitions=3)

    final = final_state(workload, TOPICS)

    deletes = [row for row in final.outbox if row[2].endswith(".deleted")]
    assert deletes, "the workload has deletes"
    for aggregate_type, aggregate_id, _, event_id, version, payload in deletes:
        value = orjson.loads(payload)
        assert value["event_id"] == str(event_id)
        assert (value["aggregate_id"], value["version"]) == (aggregate_id, version)
        assert value["data"]["deleted_at"] is not None
        # a tombstone keeps the last known columns, as the service writes it
        kept = "email" if aggregate_type == "user" else "status"
        assert value["data"][kept] is not None


def test_event_ids_are_none_only_for_messages_meant_to_be_dead_lettered() -> None:
    workload = Workload.generate(5_000, seed=3, partitions=2)

    ids = event_ids(workload.events)

    assert [i is None for i in ids] == [e.bad for e in workload.events]
    assert all(uuid.UUID(i) for i in ids if i is not None)
    assert sum(e.bad for e in workload.events) == workload.expected.dead_letters > 0
