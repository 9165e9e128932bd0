"""CONTRACT sections 1 to 3 against the real Kafka and PostgreSQL: each rule is a stream
of events and the table state it must end in."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from tests.factories import delete_event, encode, envelope, order_event, user_data, user_event
from tests.integration.harness import (
    count,
    create_topics,
    positions_reached,
    produce,
    rows,
    running,
    scalar,
    wait_until,
)


async def _consume(settings: Settings, engine: AsyncEngine, total: int) -> None:
    """Run the service until the stored positions cover `total` records."""
    async with running(settings):
        await wait_until(lambda: positions_reached(engine, settings, total), what="positions")


async def _settle(settings: Settings, engine: AsyncEngine, what: str) -> None:
    """Run the service until no change waits any more."""
    async with running(settings):

        async def settled() -> bool:
            return await count(engine, "SELECT count(*) FROM pending_changes") == 0

        await wait_until(settled, what=what)


async def test_out_of_order_and_duplicate_versions_end_at_the_highest(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings)
    v3 = user_event(1, 3, name="Three")
    events = [user_event(1, 1, name="One"), v3, user_event(1, 2, name="Two"), v3, v3]
    await produce(settings, settings.users_topic, events)
    await _consume(settings, engine, len(events))
    assert await rows(engine, "SELECT id, name, version FROM users") == [(1, "Three", 3)]
    # The copies of v3 are duplicates. v2 came late: it is stale if v3 was already stored,
    # and applies between v1 and v3 if all three landed in one batch; either way the
    # published versions rise strictly and end at v3.
    published = [v for (v,) in await rows(engine, "SELECT version FROM outbox ORDER BY id")]
    assert published in ([1, 3], [1, 2, 3])


async def test_replayed_stream_changes_nothing(settings: Settings, engine: AsyncEngine) -> None:
    await create_topics(settings)
    events = [user_event(1, 1), user_event(1, 2, name="B"), delete_event("user", 1, 3)]
    await produce(settings, settings.users_topic, events)
    await _consume(settings, engine, 3)
    before = await rows(engine, "SELECT * FROM users")
    await produce(settings, settings.users_topic, events)  # redelivered, same event ids
    await _consume(settings, engine, 6)
    assert await rows(engine, "SELECT * FROM users") == before
    assert await scalar(engine, "SELECT count(*) FROM outbox") == 3


async def test_delete_keeps_the_row_and_a_late_older_upsert_cannot_revive_it(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings)
    events = [user_event(5, 1), delete_event("user", 5, 2), user_event(5, 1)]
    await produce(settings, settings.users_topic, events)
    await _consume(settings, engine, 3)
    [(version, deleted, email)] = await rows(
        engine, "SELECT version, deleted_at IS NOT NULL, email FROM users WHERE id = 5"
    )
    assert (version, deleted, email) == (2, True, "user5@example.com")


async def test_delete_of_an_unknown_id_leaves_a_tombstone(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings)
    await produce(settings, settings.orders_topic, [delete_event("order", 9, 4)])
    await _consume(settings, engine, 1)
    await produce(settings, settings.orders_topic, [order_event(9, 1, 3)])  # late and older
    await _consume(settings, engine, 2)
    assert await rows(
        engine, "SELECT id, version, deleted_at IS NOT NULL, user_id FROM orders"
    ) == [(9, 4, True, None)]
    assert await scalar(engine, "SELECT count(*) FROM pending_changes") == 0


async def test_a_deleted_order_whose_user_is_unseen_waits_for_the_user(
    settings: Settings, engine: AsyncEngine
) -> None:
    """The tombstone keeps the order's last user_id, which must reference a users row."""
    await create_topics(settings)
    await produce(
        settings, settings.orders_topic, [order_event(9, 1, 3), delete_event("order", 9, 4)]
    )
    await _consume(settings, engine, 2)
    assert await scalar(engine, "SELECT count(*) FROM orders") == 0
    await produce(settings, settings.users_topic, [user_event(1, 1)])
    async with running(settings):

        async def applied() -> bool:
            return await count(engine, "SELECT count(*) FROM orders") == 1

        await wait_until(applied, what="the tombstone to apply")
    assert await rows(
        engine, "SELECT id, version, deleted_at IS NOT NULL, user_id FROM orders"
    ) == [(9, 4, True, 1)]


async def test_email_reused_after_delete_and_after_a_move_across_partitions(
    settings: Settings, engine: AsyncEngine
) -> None:
    """Source: u1 takes a@, u1 is deleted, u2 takes a@; u3 takes b@, moves to c@, u4 takes
    b@. Delivered with the newcomers first: they wait, then apply."""
    await create_topics(settings, partitions=4)
    await produce(
        settings,
        settings.users_topic,
        [user_event(1, 1, email="a@example.com"), user_event(3, 1, email="b@example.com")],
    )
    await _consume(settings, engine, 2)
    await produce(
        settings,
        settings.users_topic,
        [user_event(2, 1, email="a@example.com"), user_event(4, 1, email="b@example.com")],
    )
    await _consume(settings, engine, 4)
    assert sorted(await rows(engine, "SELECT entity_id FROM pending_changes")) == [(2,), (4,)]
    await produce(
        settings,
        settings.users_topic,
        [delete_event("user", 1, 2), user_event(3, 2, email="c@example.com")],
    )
    await _settle(settings, engine, "waiting users to apply")
    assert await rows(
        engine, "SELECT id, email FROM users WHERE deleted_at IS NULL ORDER BY id"
    ) == [(2, "a@example.com"), (3, "c@example.com"), (4, "b@example.com")]


async def test_email_swap_between_two_users(settings: Settings, engine: AsyncEngine) -> None:
    """A source with a deferred unique rule swaps two emails in one transaction."""
    await create_topics(settings)
    await produce(
        settings,
        settings.users_topic,
        [user_event(1, 1, email="x@example.com"), user_event(2, 1, email="y@example.com")],
    )
    await _consume(settings, engine, 2)
    await produce(
        settings,
        settings.users_topic,
        [user_event(1, 2, email="y@example.com"), user_event(2, 2, email="x@example.com")],
    )
    await _consume(settings, engine, 4)
    await _settle(settings, engine, "the swap to apply")
    assert await rows(engine, "SELECT id, email, version FROM users ORDER BY id") == [
        (1, "y@example.com", 2),
        (2, "x@example.com", 2),
    ]


async def test_orders_and_users_in_any_arrival_order(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings)
    orders = [order_event(i, 100 + i % 5, 1) for i in range(1, 21)]
    orders += [order_event(i, 100 + i % 5, 2, status="paid") for i in range(1, 21)]
    await produce(settings, settings.orders_topic, orders)
    await _consume(settings, engine, len(orders))
    assert await scalar(engine, "SELECT count(*) FROM orders") == 0
    assert await scalar(engine, "SELECT count(*) FROM pending_changes") == 40
    await produce(settings, settings.users_topic, [user_event(100 + i, 1) for i in range(5)])
    await _settle(settings, engine, "waiting orders to apply")
    assert (
        await scalar(engine, "SELECT count(*) FROM orders WHERE status = 'paid' AND version = 2")
        == 20
    )
    # Every change of every order is published, in version order per order.
    published = await rows(
        engine,
        "SELECT aggregate_id, array_agg(version ORDER BY id) FROM outbox"
        " WHERE aggregate_type = 'order' GROUP BY aggregate_id",
    )
    assert len(published) == 20
    assert all(versions == [1, 2] for _, versions in published)


async def test_each_kind_of_bad_message_is_dead_lettered_and_the_partition_moves_on(
    settings: Settings, engine: AsyncEngine
) -> None:
    settings = settings.model_copy(
        update={"max_message_bytes": 4096, "dead_letter_value_bytes": 1024}
    )
    await create_topics(settings, partitions=1)
    oversized = encode(user_event(2, 1, name="x" * 200)) + b" " * settings.max_message_bytes
    deep: dict[str, object] = {}
    node = deep
    for _ in range(20):
        node["n"] = {}
        node = node["n"]  # type: ignore[assignment]
    bad = [
        (b"2", b"{not json"),
        (b"2", b"[1, 2]"),
        (b"2", encode(envelope("order", 1, user_data(2)))),
        (b"2", encode(user_event(2, 1, email="not-an-email"))),
        (b"3", encode(user_event(2, 1))),
        (None, encode(user_event(2, 1))),
        (b"2", encode({**user_event(2, 1), "deep": deep})),
        (b"2", oversized),
        (b"2", None),
    ]
    good = user_event(2, 1)
    await produce(settings, settings.users_topic, [*bad, good])
    await _consume(settings, engine, len(bad) + 1)
    kinds = await rows(
        engine, 'SELECT "offset", kind, key, value_size FROM dead_letters ORDER BY "offset"'
    )
    assert [k for _, k, _, _ in kinds] == [
        "not_json",
        "invalid",
        "wrong_entity",
        "invalid",
        "bad_key",
        "bad_key",
        "too_deep",
        "oversized",
        "empty",
    ]
    assert [o for o, _, _, _ in kinds] == list(range(len(bad)))
    assert kinds[0][2] == b"2"
    assert kinds[7][3] == len(oversized)
    assert await rows(engine, "SELECT id, version FROM users") == [(2, 1)]
    stored = await rows(engine, "SELECT value FROM dead_letters WHERE kind = 'oversized'")
    assert len(stored[0][0]) == settings.dead_letter_value_bytes


async def test_money_is_exact(settings: Settings, engine: AsyncEngine) -> None:
    await create_topics(settings)
    await produce(settings, settings.users_topic, [user_event(1, 1)])
    raw_number = (
        b"1",
        encode(order_event(1, 1, 1, total="0")).replace(b'"total":"0"', b'"total":12345678901.37'),
    )
    await produce(settings, settings.orders_topic, [raw_number, order_event(2, 1, 1, total="0.10")])
    await _consume(settings, engine, 3)
    assert await rows(engine, "SELECT id, total::text FROM orders ORDER BY id") == [
        (1, "12345678901.37"),
        (2, "0.10"),
    ]
