"""`sync-service republish` against the real Kafka and PostgreSQL: snapshot rows for ids,
for everything in chunks, for rows changed since a time; refusals; and a re-send while
traffic flows, after which a downstream consumer ends on the newest state of every row."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.events.outbound import OutboundEvent
from sync_service.ops.republish import Selection, republish
from sync_service.relay.publish import relay_part
from tests.factories import delete_event, order_event, user_event
from tests.integration.harness import (
    count,
    create_topics,
    positions_reached,
    produce,
    rows,
    running,
    wait_until,
)
from tests.integration.relay_helpers import Downstream, create_out_topics
from tests.integration.test_cli import cli

OUTBOX = (
    "SELECT aggregate_type, aggregate_id, event_type, version, payload FROM outbox"
    " WHERE event_type LIKE '%.snapshot' ORDER BY id"
)
ROW = {
    "user": "SELECT id, email, name, active, country, created_at, updated_at, version,"
    " deleted_at FROM users WHERE id = :i",
    "order": "SELECT id, user_id, total, currency, status, created_at, updated_at, version,"
    " deleted_at FROM orders WHERE id = :i",
}


async def stored_row(engine: AsyncEngine, entity: str, entity_id: int) -> dict[str, Any]:
    """The row as JSON renders it (what a snapshot's `data` must equal)."""
    [row] = await rows(engine, ROW[entity], i=entity_id)
    return dict(orjson.loads(orjson.dumps(dict(row._mapping), default=str)))


async def test_republish_by_id_all_and_since_with_deleted_rows_and_refusals(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=1)
    users = [user_event(i, 1, updated_at=f"2026-03-0{i}T00:00:00Z") for i in range(1, 6)]
    await produce(settings, settings.users_topic, [*users, delete_event("user", 5, 2)])
    orders = [order_event(i, 1, 1) for i in range(10, 15)]
    await produce(settings, settings.orders_topic, orders)
    async with running(settings):
        await wait_until(lambda: positions_reached(engine, settings, 11), what="consumed")
    changes = await count(engine, "SELECT count(*) FROM outbox")

    said = await republish(settings, Selection("user", ids=[3, 2, 5, 3]))
    assert said == (
        "re-sent 3 users as user.snapshot (1 of them deleted) in 1 chunk; the relay publishes them"
    )
    snapshots = await rows(engine, OUTBOX)
    assert [(t, a, e, v) for t, a, e, v, _ in snapshots] == [
        ("user", "2", "user.snapshot", 1), ("user", "3", "user.snapshot", 1),
        ("user", "5", "user.snapshot", 2),
    ]  # fmt: skip
    for _, aggregate_id, _, _, payload in snapshots:
        event = OutboundEvent.model_validate(payload)
        assert (event.type, event.source) == ("user.snapshot", None)
        assert payload["data"] == await stored_row(engine, "user", int(aggregate_id))
    assert snapshots[2][4]["data"]["deleted_at"] is not None

    said = await republish(settings, Selection("order", all_=True), chunk=2)
    assert said.startswith("re-sent 5 orders as order.snapshot in 3 chunks;")
    said = await republish(settings, Selection("user", since=_at("2026-03-03")))
    assert said.startswith("re-sent 3 users as user.snapshot (1 of them deleted) in 1 chunk;")
    snapshots = await rows(engine, OUTBOX)
    assert [a for t, a, *_ in snapshots if t == "order"] == ["10", "11", "12", "13", "14"]
    assert [a for _, a, *_ in snapshots[8:]] == ["3", "4", "5"]
    assert await count(engine, "SELECT count(*) FROM outbox") == changes + 11
    ids = Counter(p["event_id"] for *_, p in snapshots)
    assert len(ids) == 11  # the same row re-sent twice is two events

    actions = await rows(engine, "SELECT action, arguments, ok, outcome FROM operator_actions")
    assert [(a, ok) for a, _, ok, _ in actions] == [("republish", True)] * 3
    assert actions[1][1] == {
        "entity": "order", "ids": None, "all": True, "since": None, "chunk": 2,
    }  # fmt: skip
    assert actions[1][3] == "re-sent 5 orders as order.snapshot in 3 chunks"

    refused = {
        "no user with id 7, 99 in the target: nothing was re-sent": (
            "--entity", "user", "--id", "99", "--id", "7", "--id", "1"),
        "give exactly one of --id N (one or more), --all and --since TS": (
            "--entity", "order", "--id", "10", "--all"),
    }  # fmt: skip
    for message, args in refused.items():
        outcome = await cli(settings, "republish", *args)
        assert outcome.failed_with_one_line() == f"sync-service: {message}"
    neither = await cli(settings, "republish", "--entity", "user")
    assert neither.failed_with_one_line().startswith("sync-service: give exactly one of")
    bad_entity = await cli(settings, "republish", "--entity", "invoice", "--all")
    bad_entity.failed_with_one_line()
    assert await count(engine, "SELECT count(*) FROM outbox") == changes + 11
    assert await count(engine, "SELECT count(*) FROM operator_actions") == 3

    ok = await cli(settings, "republish", "--entity", "order", "--id", "12")
    assert (ok.code, ok.stderr) == (0, "")
    assert ok.stdout.startswith("re-sent 1 order as order.snapshot in 1 chunk;")


def _at(day: str) -> Any:
    from datetime import UTC, datetime

    return datetime.fromisoformat(day).replace(tzinfo=UTC)


async def test_a_republish_while_traffic_flows_ends_downstream_on_the_newest_state(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=3)
    await create_out_topics(settings)
    ids = range(1, 41)
    rounds = 25
    rng = random.Random(12)

    async def traffic() -> None:
        for version in range(1, rounds + 1):
            events = [user_event(i, version, name=f"User {i} v{version}") for i in ids]
            rng.shuffle(events)
            await produce(settings, settings.users_topic, events)
            await asyncio.sleep(0.05)

    async with Downstream(settings) as downstream, running(settings, relay=relay_part):
        flowing = asyncio.create_task(traffic())
        sent = 0
        runs = 0
        while not flowing.done() or runs < 2:
            said = await republish(settings, Selection("user", all_=True), chunk=7)
            sent += int(said.split()[1])
            runs += 1
            await asyncio.sleep(0.05)
        await flowing
        await wait_until(
            lambda: positions_reached(engine, settings, len(ids) * rounds), what="consumed"
        )
        published = len(ids) * rounds + sent
        await downstream.wait_for(published, patience_s=120)
        records = await downstream.drain()

    assert runs >= 2
    snapshot_records = [r for r in records if r.value["type"] == "user.snapshot"]
    assert len(snapshot_records) == sent
    assert len(records) == published
    assert len({r.event_id for r in records}) == published  # each event exactly once
    last: dict[bytes, Any] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        last[r.key] = r
    for entity_id in ids:
        final = last[str(entity_id).encode()].value
        assert final["version"] == rounds
        assert final["data"] == await stored_row(engine, "user", entity_id)
    # Per key, versions never go back: a snapshot repeats the version before it at most.
    by_key: dict[bytes, list[int]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(r.key, []).append(int(r.value["version"]))
    for key, versions in by_key.items():
        assert versions == sorted(versions), f"{key!r}: {versions}"


async def test_a_republish_that_fails_midway_says_what_it_had_sent(
    settings: Settings, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_topics(settings, partitions=1)
    await produce(settings, settings.users_topic, [user_event(i, 1) for i in range(1, 6)])
    async with running(settings):
        await wait_until(lambda: positions_reached(engine, settings, 5), what="consumed")
    from sync_service.ops import republish as module

    real = module._write_snapshots
    calls = 0

    async def dies_on_the_second_chunk(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("the database went away")
        await real(*args)

    monkeypatch.setattr(module, "_write_snapshots", dies_on_the_second_chunk)
    try:
        await republish(settings, Selection("user", all_=True), chunk=2)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the re-send should have failed")
    assert (
        await count(engine, "SELECT count(*) FROM outbox WHERE event_type = 'user.snapshot'") == 2
    )
    assert await rows(engine, "SELECT action, ok, outcome FROM operator_actions") == [
        (
            "republish",
            False,
            "failed after re-sent 2 users as user.snapshot in 1 chunk: "
            "RuntimeError: the database went away",
        )
    ]
