"""The generated traffic: reproducible, valid in the native envelope, a history the source
could have had, and an expected state that follows from the events alone."""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from sync_service.events.change import Change, DeadLetter
from sync_service.ops.traffic import (
    Event,
    ExpectedState,
    Traffic,
    canonical_row,
    checksum_of,
)
from sync_service.pipeline.decode import Limits, decode

LIMITS = Limits(
    max_bytes=1_048_576, max_depth=8, dead_letter_value_bytes=65_536, dead_letter_key_bytes=1024
)
PARTITIONS = 6


@dataclass(frozen=True)
class History:
    events: list[Event]
    decoded: list[Change | DeadLetter]
    expected: ExpectedState


def decode_event(event: Event, offset: int = 0) -> Change | DeadLetter:
    topic = f"cdc.{event.entity}s"
    return decode(entity=event.entity, topic=topic, partition=event.partition, offset=offset,
                  key=event.key, value=event.value, limits=LIMITS)  # fmt: skip


def generate(seed: int, n: int, **rates: Any) -> History:
    traffic = Traffic(seed, partitions=PARTITIONS, **rates)
    events = list(traffic.events(n))
    decoded = [decode_event(e, i) for i, e in enumerate(events)]
    return History(events, decoded, traffic.expected())


@pytest.fixture(scope="module")
def history() -> History:
    """A busy history: every kind of disorder at well above the default rates."""
    return generate(3, 12_000, duplicate_rate=0.03, out_of_order_rate=0.05, bad_rate=0.01)


def distinct_changes(history: History) -> list[Change]:
    """The source changes, each once (a duplicate repeats its event id)."""
    seen: set[Any] = set()
    changes = []
    for item in history.decoded:
        if isinstance(item, Change) and item.event_id not in seen:
            seen.add(item.event_id)
            changes.append(item)
    return changes


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not() -> None:
    def run(seed: int) -> list[tuple[Any, ...]]:
        traffic = Traffic(seed, bad_rate=0.01)
        return [(e.entity, e.key, e.value, e.partition, e.bad) for e in traffic.events(3_000)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_exactly_n_events_and_the_counts_add_up(history: History) -> None:
    expected = history.expected
    assert len(history.events) == expected.events == 12_000
    assert expected.changes + expected.duplicates + expected.dead_letters == expected.events
    assert expected.changes == len(distinct_changes(history))
    assert expected.dead_letters == sum(1 for e in history.events if e.bad)
    assert 0 < expected.late < expected.changes
    assert expected.applied_at_least == expected.changes - expected.late
    assert len(expected.users) + len(expected.orders) == len(
        {(c.entity, c.id) for c in distinct_changes(history)}
    )


def test_good_events_decode_and_bad_ones_become_dead_letters(history: History) -> None:
    kinds = set()
    for event, item in zip(history.events, history.decoded, strict=True):
        if event.bad:
            assert isinstance(item, DeadLetter)
            kinds.add(item.kind)
        else:
            assert isinstance(item, Change), item
            assert (item.entity, item.id, item.version) == (event.entity, event.id, event.version)
    assert kinds == {"not_json", "invalid", "wrong_entity"}


def test_duplicates_are_byte_identical_resends_of_earlier_events(history: History) -> None:
    first_value: dict[Any, bytes] = {}
    duplicates = 0
    for event, item in zip(history.events, history.decoded, strict=True):
        if isinstance(item, Change):
            if item.event_id in first_value:
                duplicates += 1
                assert event.value == first_value[item.event_id]
            first_value[item.event_id] = event.value
    assert duplicates == history.expected.duplicates > 0


def test_an_entity_stays_on_one_partition_chosen_by_its_key(history: History) -> None:
    for event in history.events:
        assert event.partition == zlib.crc32(event.key) % PARTITIONS


def test_versions_rise_per_entity_except_a_late_change_right_after_its_successor(
    history: History,
) -> None:
    delivered: dict[tuple[str, int], list[int]] = defaultdict(list)
    for change in distinct_changes(history):
        delivered[(change.entity, change.id)].append(change.version)
    late = 0
    for versions in delivered.values():
        assert sorted(versions) == list(range(1, len(versions) + 1))
        for i in range(1, len(versions)):
            if versions[i] < versions[i - 1]:
                late += 1
                assert versions[i] == versions[i - 1] - 1
                assert versions[i - 1] == max(versions[: i + 1])
    assert late == history.expected.late


def test_no_late_or_repeated_events_when_their_rates_are_zero() -> None:
    calm = generate(4, 3_000, duplicate_rate=0.0, out_of_order_rate=0.0)
    last: dict[tuple[str, int], int] = {}
    for item in calm.decoded:
        assert isinstance(item, Change)
        assert item.version == last.get((item.entity, item.id), 0) + 1
        last[(item.entity, item.id)] = item.version
    assert (calm.expected.late, calm.expected.duplicates, calm.expected.dead_letters) == (0, 0, 0)


def test_the_source_history_keeps_the_source_rules_at_every_step(history: History) -> None:
    """Replayed in source order (every change has its own time), live emails are unique,
    an order's user exists when the order is placed, and an order keeps its user."""
    changes = sorted(distinct_changes(history), key=lambda c: c.occurred_at)
    assert len({c.occurred_at for c in changes}) == len(changes)
    holder: dict[str, int] = {}
    email_of: dict[int, str] = {}
    users_seen: set[int] = set()
    live_users: set[int] = set()
    user_of_order: dict[int, int] = {}
    reused = 0
    ever_held: set[str] = set()
    for change in changes:
        if change.entity == "user":
            old = email_of.pop(change.id, None)
            if old is not None:
                del holder[old]
            if change.op == "delete":
                live_users.discard(change.id)
                continue
            assert change.row is not None
            email = change.row["email"]
            assert email not in holder, f"{email} held by {holder.get(email)} and {change.id}"
            if email in ever_held and old != email:
                reused += 1
            holder[email] = change.id
            email_of[change.id] = email
            ever_held.add(email)
            users_seen.add(change.id)
            live_users.add(change.id)
        elif change.row is not None:
            user_id = change.row["user_id"]
            if change.id not in user_of_order:
                assert user_id in live_users, f"order {change.id} placed for absent {user_id}"
            assert user_of_order.setdefault(change.id, user_id) == user_id
    assert reused > 0  # emails given up by one user are taken by another


def test_the_expected_state_is_each_entitys_highest_version(history: History) -> None:
    by_entity: dict[tuple[str, int], list[Change]] = defaultdict(list)
    for change in distinct_changes(history):
        by_entity[(change.entity, change.id)].append(change)
    final: dict[str, dict[int, str]] = {"user": {}, "order": {}}
    deletes = 0
    for (entity, entity_id), changes in by_entity.items():
        changes.sort(key=lambda c: c.version)
        last = changes[-1]
        upserts = [c for c in changes if c.row is not None]
        row: dict[str, Any] = {**upserts[-1].row, "version": last.version}  # type: ignore[dict-item]
        row["deleted_at"] = last.occurred_at if last.op == "delete" else None
        deletes += last.op == "delete"
        final[entity][entity_id] = canonical_row(entity, row)  # type: ignore[arg-type]
    users = [final["user"][i] for i in sorted(final["user"])]
    orders = [final["order"][i] for i in sorted(final["order"])]
    assert (list(history.expected.users), list(history.expected.orders)) == (users, orders)
    assert history.expected.checksum() == checksum_of(users, orders)
    assert deletes > 0
    low, high = history.expected.id_range
    assert low == 1
    assert high == max(len(users), len(orders))


def test_histories_with_different_id_bases_share_no_ids_emails_or_event_ids() -> None:
    def identities(base: int) -> tuple[set[int], set[str], set[Any]]:
        traffic = Traffic(1, id_base=base)
        changes = [c for e in traffic.events(2_000) if isinstance(c := decode_event(e), Change)]
        low, high = traffic.expected().id_range
        assert all(low <= c.id <= high for c in changes)
        emails = {c.row["email"] for c in changes if c.entity == "user" and c.row is not None}
        return {c.id for c in changes}, emails, {c.event_id for c in changes}

    ids_a, emails_a, event_ids_a = identities(0)
    ids_b, emails_b, event_ids_b = identities(10**9)
    assert min(len(ids_a), len(emails_a), len(event_ids_a)) > 0
    assert not ids_a & ids_b
    assert not emails_a & emails_b
    assert not event_ids_a & event_ids_b


def test_one_traffic_makes_one_history() -> None:
    traffic = Traffic(1)
    events = traffic.events(10)
    with pytest.raises(RuntimeError):
        traffic.expected()
    list(events)
    with pytest.raises(RuntimeError):
        list(traffic.events(10))


def test_canonical_rows_spell_out_every_type() -> None:
    created = datetime(2026, 1, 2, 4, 4, 5, 123000, tzinfo=timezone(timedelta(hours=1)))
    user = {
        "id": 42, "email": "zoe.muller1@example.com", "name": "Zoë Müller", "active": False,
        "country": None, "created_at": created, "updated_at": "2026-01-02T03:04:05.120Z",
        "version": 7, "deleted_at": None,
    }  # fmt: skip
    assert canonical_row("user", user) == (
        "42|zoe.muller1@example.com|Zoë Müller|false|\\N|2026-01-02T03:04:05.123000Z"
        "|2026-01-02T03:04:05.120000Z|7|\\N"
    )
    order = {
        "id": 9, "user_id": 42, "total": Decimal("5.5"), "currency": "EUR",
        "status": "refunded", "created_at": "2026-01-02T03:04:05+00:00",
        "updated_at": datetime(2026, 1, 3, tzinfo=UTC), "version": 3,
        "deleted_at": "2026-01-04T00:00:00.001Z",
    }  # fmt: skip
    assert canonical_row("order", order) == (
        "9|42|5.50|EUR|refunded|2026-01-02T03:04:05.000000Z|2026-01-03T00:00:00.000000Z|3"
        "|2026-01-04T00:00:00.001000Z"
    )
    assert canonical_row("order", {**order, "total": "120.00"}).split("|")[2] == "120.00"
