"""The operators' commands against the real Kafka and PostgreSQL: the offsets report,
replays on a live service, and the dead-letter store (listing and re-driving)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.errors import UserError
from sync_service.ops.dlq import list_dead_letters, redrive, render
from sync_service.ops.offsets import read_offsets
from sync_service.ops.replay import replay
from sync_service.pipeline.batch import Batch, TopicPartition
from sync_service.pipeline.write import BatchWriter
from tests.factories import delete_event, encode, key_of, order_event, user_event
from tests.integration.harness import (
    Message,
    create_topics,
    positions_reached,
    produce,
    rows,
    running,
    scalar,
    wait_until,
)

Placed = tuple[int, int]  # partition, offset
NOTE = "a running consumer picks this up on its next batch"


async def produce_at(
    settings: Settings, topic: str, events: Iterable[dict[str, Any]], when: datetime
) -> list[Placed]:
    """Send envelopes stamped with `when`; returns where each one landed."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        stamp = int(when.timestamp() * 1000)
        futures = [
            await producer.send(topic, encode(e), key=key_of(e), timestamp_ms=stamp) for e in events
        ]
        placed = []
        for future in futures:
            sent = await future
            placed.append((sent.partition, sent.offset))
        return placed
    finally:
        await producer.stop()


def stale_total() -> float:
    """Changes the in-process consumer found stale so far (both entities)."""
    return sum(
        REGISTRY.get_sample_value("sync_changes_stale_total", {"entity": e}) or 0.0
        for e in ("user", "order")
    )


async def state(engine: AsyncEngine) -> tuple[Any, ...]:
    """Everything a replay must leave exactly as it was."""
    return (
        await rows(engine, "SELECT * FROM users ORDER BY id"),
        await rows(engine, "SELECT * FROM orders ORDER BY id"),
        await rows(engine, "SELECT id, event_id, version FROM outbox ORDER BY id"),
        await rows(engine, "SELECT * FROM pending_changes"),
        await rows(engine, "SELECT id FROM dead_letters"),
    )


async def add_dead_letter(
    engine: AsyncEngine,
    topic: str,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    *,
    value_size: int | None = None,
) -> int:
    """A dead letter as an earlier version of the service would have stored it."""
    async with engine.begin() as connection:
        inserted = await connection.execute(
            text(
                'INSERT INTO dead_letters (topic, partition, "offset", key, value, value_size,'
                " kind, reason) VALUES (:t, 0, :o, :k, :v, :s, 'invalid', 'rejected earlier')"
                " RETURNING id"
            ),
            {
                "t": topic,
                "o": offset,
                "k": key,
                "v": value,
                "s": len(value or b"") if value_size is None else value_size,
            },
        )
        return int(inserted.scalar_one())


async def test_offsets_report_positions_end_offsets_lag_and_backlogs(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=2)
    await produce(settings, settings.users_topic, [user_event(i, 1) for i in range(1, 9)])
    # One order waits for user 99; one record is not JSON. Both keys are b"1": one
    # partition of the orders topic gets them, the other stays empty.
    orders: list[dict[str, Any] | Message] = [order_event(1, 99, 1), (b"1", b"{nope")]
    await produce(settings, settings.orders_topic, orders)
    async with running(settings):
        await wait_until(lambda: positions_reached(engine, settings, 10), what="all consumed")

    report = (await read_offsets(settings)).as_json()
    parts = report["partitions"]
    assert [(p["topic"], p["partition"]) for p in parts] == [
        (t, p) for t in (settings.users_topic, settings.orders_topic) for p in (0, 1)
    ]
    ends = {(p["topic"], p["partition"]): p["end"] for p in parts}
    assert sum(e for (t, _), e in ends.items() if t == settings.users_topic) == 8
    assert sorted(e for (t, _), e in ends.items() if t == settings.orders_topic) == [0, 2]
    for p in parts:  # consumed to the end; a partition never written has no position
        assert p["beginning"] == 0
        assert p["position"] == (p["end"] or None)
        assert p["lag"] == 0
    assert report["group"] == settings.group_id
    assert report["lag"] == 0
    assert report["waiting"]["changes"] == 1
    assert report["waiting"]["oldest_age_s"] >= 0
    assert report["dead_letters"] == {"not_redriven": 1}
    assert report["outbox"]["backlog"] == 8  # no relay ran

    # With the service stopped, more records arrive: the lag is exactly those.
    placed = await produce_at(
        settings,
        settings.users_topic,
        [user_event(i, 2) for i in (1, 2, 3)],
        datetime.now(UTC),
    )
    later = await read_offsets(settings)
    lags = {(p.topic, p.partition): p.lag for p in later.partitions}
    for partition in (0, 1):
        landed = sum(1 for p, _ in placed if p == partition)
        assert lags[(settings.users_topic, partition)] == landed
    assert later.lag == 3

    lines = later.render().splitlines()
    assert lines[0] == f"consumer group {settings.group_id}"
    assert lines[1].split() == ["topic", "partition", "position", "end", "lag"]
    assert [line.split() for line in lines[2:6]] == [
        [p.topic, str(p.partition), str(p.position or "-"), str(p.bounds.end), str(p.lag)]
        for p in later.partitions
    ]
    assert lines[6] == "total lag: 3"
    assert lines[7].startswith("waiting changes: 1 (oldest ")
    assert lines[8] == "dead letters not re-driven: 1"
    assert lines[9].startswith("outbox backlog: 8 (oldest ")


async def test_replay_from_an_offset_and_from_a_time_reapplies_without_changing_anything(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=2)
    now = datetime.now(UTC)
    early = now - timedelta(minutes=30)
    between = now - timedelta(minutes=25)
    late = now - timedelta(minutes=20)
    first_users = [
        user_event(1, 1, email="a@example.com"),
        user_event(2, 1, email="b@example.com"),
        user_event(1, 2, email="c@example.com"),  # frees a@example.com
        user_event(3, 1),
        delete_event("user", 3, 2),
    ]
    first_orders = [order_event(10, 1, 1), order_event(10, 1, 2, status="paid")]
    then_users = [
        user_event(2, 2, email="a@example.com"),  # takes the freed email
        user_event(1, 3, email="c@example.com", name="Ada"),
        user_event(4, 1),
    ]
    then_orders = [order_event(11, 4, 1), delete_event("order", 10, 3)]
    placed = {
        settings.users_topic: (
            await produce_at(settings, settings.users_topic, first_users, early),
            await produce_at(settings, settings.users_topic, then_users, late),
        ),
        settings.orders_topic: (
            await produce_at(settings, settings.orders_topic, first_orders, early),
            await produce_at(settings, settings.orders_topic, then_orders, late),
        ),
    }
    total = 12
    redelivered = then_users[-1]  # produced again after each replay: the last record to read

    async def settled(records: int) -> None:
        async def done() -> bool:
            pending = await scalar(engine, "SELECT count(*) FROM pending_changes")
            return pending == 0 and await positions_reached(engine, settings, records)

        await wait_until(done, what=f"{records} records consumed, nothing waiting")

    async with running(settings):
        await settled(total)
        before = await state(engine)
        assert [r[:3] for r in before[0]] == [
            (1, "c@example.com", "Ada"),
            (2, "a@example.com", "User 2"),
            (3, "user3@example.com", "User 3"),
            (4, "user4@example.com", "User 4"),
        ]
        deleted = "SELECT id, version, deleted_at IS NOT NULL FROM {} ORDER BY id"
        assert await rows(engine, deleted.format("users")) == [
            (1, 3, False),
            (2, 2, False),
            (3, 2, True),
            (4, 1, False),
        ]
        assert await rows(engine, deleted.format("orders")) == [(10, 3, True), (11, 1, False)]
        assert len(before[2]) == total  # one outbox row per applied change

        # From offset 0 on every partition: every record comes again, and is stale.
        stale_before = stale_total()
        for topic in (settings.users_topic, settings.orders_topic):
            for partition in (0, 1):
                end = await _position(engine, settings, topic, partition)
                was = "none" if end is None else end  # a partition that got no record
                said = await replay(settings, topic, partition, 0, None)
                assert said == f"{topic}[{partition}]: position {was} -> 0; {NOTE}"
        await produce(settings, settings.users_topic, [redelivered])
        await settled(total + 1)
        assert await state(engine) == before
        assert stale_total() - stale_before == total + 1

        # From a time between the two groups: each partition goes back to its first
        # record of the later group (to its end where it got none of them).
        stale_before = stale_total()
        replayed = 0
        for topic, (first, then) in placed.items():
            for partition in (0, 1):
                end = await _position(engine, settings, topic, partition)
                later = [o for p, o in then if p == partition]
                target = min(later) if later else end
                assert target == sum(1 for p, _ in first if p == partition)
                replayed += end - target
                said = await replay(settings, topic, partition, None, between)
                assert said == f"{topic}[{partition}]: position {end} -> {target}; {NOTE}"
        assert replayed == len(then_users) + len(then_orders) + 1
        await produce(settings, settings.users_topic, [redelivered])
        await settled(total + 2)
        assert await state(engine) == before
        assert stale_total() - stale_before == replayed + 1


async def _position(engine: AsyncEngine, settings: Settings, topic: str, partition: int) -> Any:
    return await scalar(
        engine,
        "SELECT next_offset FROM consumer_offsets WHERE group_id = :g AND topic = :t"
        " AND partition = :p",
        g=settings.group_id,
        t=topic,
        p=partition,
    )


async def test_replay_checks_the_topic_the_partition_and_the_offset(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=1)
    users = settings.users_topic
    five_minutes_ago = datetime.now(UTC) - timedelta(minutes=5)
    await produce_at(settings, users, [user_event(i, 1) for i in (1, 2, 3)], five_minutes_ago)
    with pytest.raises(UserError, match=r"^unknown topic 'nope': replay works on "):
        await replay(settings, "nope", 0, 0, None)
    no_partition = rf"^{users} has partitions 0 to 0; there is no partition 1$"
    with pytest.raises(UserError, match=no_partition):
        await replay(settings, users, 1, 0, None)
    outside = rf"^offset 4 is outside {users}\[0\]: it can be replayed from offset 0 to 3 "
    with pytest.raises(UserError, match=outside):
        await replay(settings, users, 0, 4, None)
    with pytest.raises(UserError, match="exactly one of"):
        await replay(settings, users, 0, None, None)
    assert await rows(engine, "SELECT * FROM consumer_offsets") == []

    # The end itself is a valid position (nothing to replay), and so is a time after
    # the last record; a time before the first record is the beginning.
    assert await replay(settings, users, 0, 3, None) == f"{users}[0]: position none -> 3; {NOTE}"
    assert await replay(settings, users, 0, None, datetime(2000, 1, 1)) == (
        f"{users}[0]: position 3 -> 0; {NOTE}"
    )
    in_an_hour = datetime.now(UTC) + timedelta(hours=1)
    assert await replay(settings, users, 0, None, in_an_hour) == (
        f"{users}[0]: position 0 -> 3; {NOTE}"
    )
    stored = "SELECT group_id, topic, partition, next_offset FROM consumer_offsets"
    assert await rows(engine, stored) == [(settings.group_id, users, 0, 3)]


async def test_dlq_list_shows_where_each_bad_message_came_from_and_why(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=1)
    bad_email = user_event(3, 1, email="not-an-address")
    on_wrong_topic = order_event(6, 1, 1)
    users: list[dict[str, Any] | Message] = [
        user_event(1, 1),
        (b"2", b"{not json"),
        bad_email,
        (None, encode(user_event(4, 1))),
        (b"6", encode(on_wrong_topic)),
    ]
    orders: list[dict[str, Any] | Message] = [(b"5", b""), order_event(7, 1, 1)]
    await produce(settings, settings.users_topic, users)
    await produce(settings, settings.orders_topic, orders)
    async with running(settings):
        await wait_until(lambda: positions_reached(engine, settings, 7), what="all consumed")

    letters = await list_dead_letters(settings, limit=50, include_redriven=False)
    u, o = settings.users_topic, settings.orders_topic
    assert {(d.topic, d.partition, d.offset, d.key, d.kind) for d in letters} == {
        (u, 0, 1, b"2", "not_json"),
        (u, 0, 2, b"3", "invalid"),
        (u, 0, 3, None, "bad_key"),
        (u, 0, 4, b"6", "wrong_entity"),
        (o, 0, 0, b"5", "empty"),
    }
    reasons = {(d.topic, d.offset): d.reason for d in letters}
    assert reasons[(u, 1)].startswith("not JSON: ")
    assert reasons[(u, 2)].startswith("data.email: ")
    assert reasons[(u, 3)] == "missing key: expected b'4'"
    assert reasons[(u, 4)] == f"entity 'order' on topic {u}, which carries 'user'"
    assert reasons[(o, 0)].startswith("empty value")
    assert [d.id for d in letters] == sorted((d.id for d in letters), reverse=True)

    newest = await list_dead_letters(settings, limit=2, include_redriven=False)
    assert [d.id for d in newest] == [d.id for d in letters[:2]]
    wrong = next(d for d in letters if d.kind == "wrong_entity")
    raw = encode(on_wrong_topic)
    assert {k: v for k, v in wrong.as_json().items() if k != "created_at"} == {
        "id": wrong.id,
        "topic": u,
        "partition": 0,
        "offset": 4,
        "key": "6",
        "key_size": 1,
        "key_kept": 1,
        "value_preview": raw.decode()[:199] + "…",
        "value_size": len(raw),
        "value_kept": len(raw),
        "kind": "wrong_entity",
        "reason": reasons[(u, 4)],
        "redriven_at": None,
        "redrive_result": None,
    }
    listing = render(letters).splitlines()
    assert len(listing) == 5
    for line, letter in zip(listing, letters, strict=True):
        assert line.startswith(f"#{letter.id}  {letter.topic}[0]@{letter.offset}  key=")
        assert line.endswith(f": {letter.reason}")
    assert await rows(engine, "SELECT id FROM users") == [(1,)]


async def test_redrive_applies_what_is_now_valid_and_keeps_the_rest_listed(
    settings: Settings, engine: AsyncEngine
) -> None:
    u, o = settings.users_topic, settings.orders_topic
    user = user_event(9, 1)
    order = order_event(5, 9, 1)  # refers to the user re-driven with it
    orphan = order_event(6, 77, 1)  # user 77 has not arrived: it waits
    valid_user = await add_dead_letter(engine, u, 10, b"9", encode(user))
    valid_order = await add_dead_letter(engine, o, 20, b"5", encode(order))
    waits = await add_dead_letter(engine, o, 21, b"6", encode(orphan))
    not_json = await add_dead_letter(engine, u, 11, b"7", b"{nope")
    truncated = await add_dead_letter(engine, u, 12, b"8", encode(user)[:10], value_size=400)

    said = await redrive(settings, None)
    assert said == (
        "re-drove 5: 3 applied (1 of them waiting for a user or an email), "
        "2 still not applicable (see `sync-service dlq list`)"
    )
    assert await rows(engine, "SELECT id, email, version FROM users") == [
        (9, "user9@example.com", 1)
    ]
    assert await rows(engine, "SELECT id, user_id, version FROM orders") == [(5, 9, 1)]
    pending = 'SELECT entity, entity_id, topic, partition, "offset", reason FROM pending_changes'
    assert await rows(engine, pending) == [("order", 6, o, 0, 21, "user 77 has not arrived yet")]
    outbox = await rows(engine, "SELECT event_type, aggregate_id, payload FROM outbox ORDER BY id")
    assert [(t, a) for t, a, _ in outbox] == [("user.upserted", "9"), ("order.upserted", "5")]
    assert [p["source"] for _, _, p in outbox] == [
        {"topic": u, "partition": 0, "offset": 10, "event_id": user["event_id"]},
        {"topic": o, "partition": 0, "offset": 20, "event_id": order["event_id"]},
    ]
    marks = await rows(
        engine, "SELECT id, redriven_at IS NOT NULL, redrive_result FROM dead_letters ORDER BY id"
    )
    cut = "cannot re-drive: only 10 of its 400 bytes were kept (SYNC_DEAD_LETTER_VALUE_BYTES)"
    assert marks == [
        (valid_user, True, "applied"),
        (valid_order, True, "applied"),
        (waits, True, "applied"),
        (not_json, False, marks[3][2]),
        (truncated, False, cut),
    ]
    assert marks[3][2].startswith("still invalid: not JSON: ")

    listed = await list_dead_letters(settings, limit=50, include_redriven=False)
    assert [d.id for d in listed] == [truncated, not_json]
    assert render(listed).splitlines()[1] == f"    last re-drive: {cut}"
    everything = await list_dead_letters(settings, limit=50, include_redriven=True)
    assert [d.id for d in everything] == [truncated, not_json, waits, valid_order, valid_user]

    # Again: only the two left are tried; nothing is applied twice.
    assert await redrive(settings, None) == (
        "re-drove 2: 0 applied, 2 still not applicable (see `sync-service dlq list`)"
    )
    assert await redrive(settings, [valid_user]) == (
        "no dead letters to re-drive; 1 skipped (applied by an earlier re-drive)"
    )
    with pytest.raises(UserError, match=r"^no dead letter with id 404$"):
        await redrive(settings, [not_json, 404])
    assert len(await rows(engine, "SELECT id FROM outbox")) == 2
    assert len(await rows(engine, "SELECT id FROM dead_letters WHERE redriven_at IS NULL")) == 2


async def test_a_redriven_change_takes_its_waiting_older_versions_along(
    settings: Settings, engine: AsyncEngine
) -> None:
    """User 9's v2 waits for an email user 8 holds; its v3, which moves on to a free
    email, comes back from the dead-letter store. v2 must not be skipped: v2 and v3 apply
    together, and each is published, in order."""
    await create_topics(settings, partitions=1)
    u = settings.users_topic
    first = [user_event(8, 1, email="x@example.com"), user_event(9, 1, email="y@example.com")]
    await produce(settings, u, first)
    async with running(settings):
        await wait_until(lambda: positions_reached(engine, settings, 2), what="consumed")
        await produce(settings, u, [user_event(9, 2, email="x@example.com")])
        await wait_until(lambda: positions_reached(engine, settings, 3), what="consumed")
        waiting = "SELECT entity_id, version FROM pending_changes"
        assert await rows(engine, waiting) == [(9, 2)]
        v3 = user_event(9, 3, email="z@example.com")
        letter = await add_dead_letter(engine, u, 2_000, b"9", encode(v3))

        said = await redrive(settings, [letter])
        assert said == "re-drove 1: 1 applied, 0 still not applicable"
        assert await rows(engine, waiting) == []
    assert await rows(engine, "SELECT id, email, version FROM users ORDER BY id") == [
        (8, "x@example.com", 1),
        (9, "z@example.com", 3),
    ]
    published = "SELECT version FROM outbox WHERE aggregate_id = '9' ORDER BY id"
    assert await rows(engine, published) == [(1,), (2,), (3,)]


async def test_a_redrive_that_fails_after_writing_leaves_nothing_behind(
    settings: Settings, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's changes and the marks are one transaction: the writer's own commit
    must not make its rows visible before the letters are marked."""

    class FailsAfterWriting(BatchWriter):
        async def write(self, batch: Batch, expected: Mapping[TopicPartition, int | None]) -> Any:
            await super().write(batch, expected)
            raise RuntimeError("the process died here")

    monkeypatch.setattr("sync_service.ops.dlq.BatchWriter", FailsAfterWriting)
    letter = await add_dead_letter(engine, settings.users_topic, 3, b"9", encode(user_event(9, 1)))
    with pytest.raises(RuntimeError, match="the process died here"):
        await redrive(settings, None)
    assert await rows(engine, "SELECT id FROM users") == []
    assert await rows(engine, "SELECT id FROM outbox") == []
    assert await rows(engine, "SELECT id, redriven_at, redrive_result FROM dead_letters") == [
        (letter, None, None)
    ]
