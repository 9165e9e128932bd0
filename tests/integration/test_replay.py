"""`sync-service replay` against the real Kafka and PostgreSQL: bounded ranges on a running
service, whole topics, dry runs that write nothing, and every refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.admin import RecordsToDelete
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.kafka import admin
from sync_service.ops.audit import list_actions, render
from sync_service.ops.dryrun import dry_run
from sync_service.ops.offsets import read_offsets
from sync_service.ops.replay import ReplayRequest, replay_range
from tests.factories import order_event, user_event
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
from tests.integration.test_cli import cli
from tests.integration.test_ops import produce_at, stale_total

TABLES = (
    "SELECT id, email, version, deleted_at FROM users ORDER BY id",
    "SELECT id, user_id, total, version, deleted_at FROM orders ORDER BY id",
    "SELECT event_id FROM outbox ORDER BY id",
    "SELECT entity, entity_id, version FROM pending_changes ORDER BY 1, 2, 3",
    "SELECT topic, partition, next_offset, replay_end, resume_offset FROM consumer_offsets",
    "SELECT id FROM operator_actions",
)


async def snapshot(engine: AsyncEngine) -> list[Any]:
    return [await rows(engine, sql) for sql in TABLES]


async def test_a_bounded_replay_rereads_its_range_only_and_the_consumer_goes_on(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=1)
    users = settings.users_topic
    await produce(settings, users, [user_event(i, 1) for i in range(1, 9)])  # offsets 0-7
    async with running(settings):
        await wait_until(lambda: positions_reached(engine, settings, 8), what="consumed")
        # Rows lost in the target: 3 and 4 are inside the range [2, 5), 6 is after it
        # (and the outbox was published and pruned, as a relay does).
        async with engine.begin() as connection:
            await connection.execute(text("DELETE FROM users WHERE id IN (3, 4, 6)"))
            await connection.execute(text("DELETE FROM outbox"))
        request = ReplayRequest(users, [0], from_offset=2, to_offset=5)
        # The dry run foresees what the replay then does: users 3 and 4 apply, 5 is stale.
        foreseen = (await dry_run(settings, request)).as_json()["partitions"]
        assert foreseen == [
            {
                "partition": 0, "from_offset": 2, "to_offset": 5, "records": 3,
                "entities": {"user": {"applied": 2, "stale": 1, "waiting": 0, "dead_letters": 0}},
            }
        ]  # fmt: skip
        [done] = await replay_range(settings, request)
        assert done["line"] == (
            f"{users}[0]: position 8 -> 2, replaying to 5, then back to 8; "
            "a running consumer picks this up on its next batch"
        )
        # Traffic after the replay: the consumer goes on from 8 and reads it once.
        await produce(settings, users, [user_event(9, 1), user_event(1, 2)])

        async def resumed() -> bool:
            stored = await rows(
                engine, "SELECT next_offset, replay_end, resume_offset FROM consumer_offsets"
            )
            return stored == [(10, None, None)]

        await wait_until(resumed, what="the replay ended and the new records were read")
    assert await rows(engine, "SELECT id, version FROM users ORDER BY id") == [
        (1, 2), (2, 1), (3, 1), (4, 1), (5, 1), (7, 1), (8, 1), (9, 1),
    ]  # fmt: skip
    # One outbox row per applied change: 3 and 4 again, then 9 and 1's v2.
    outbox = await rows(engine, "SELECT aggregate_id, version FROM outbox ORDER BY id")
    assert outbox == [("3", 1), ("4", 1), ("9", 1), ("1", 2)]
    [(action, arguments, ok)] = await rows(
        engine, "SELECT action, arguments, ok FROM operator_actions"
    )
    assert (action, ok) == ("replay", True)
    assert arguments["to_offset"] == 5


async def test_a_replay_of_every_partition_from_a_time_to_a_time(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=2)
    users = settings.users_topic
    now = datetime.now(UTC)
    groups = []
    for version, minutes in ((1, 30), (2, 20), (3, 10)):
        events = [user_event(i, version) for i in range(1, 13)]
        groups.append(await produce_at(settings, users, events, now - timedelta(minutes=minutes)))
    counts = [{p: sum(1 for q, _ in g if q == p) for p in (0, 1)} for g in groups]
    assert all(c[p] for c in counts for p in (0, 1)), "12 keys land on both partitions"
    async with running(settings):
        await wait_until(lambda: positions_reached(engine, settings, 36), what="consumed")
    since, until = now - timedelta(minutes=25), now - timedelta(minutes=15)
    request = ReplayRequest(users, None, from_time=since, to_time=until)
    done = await replay_range(settings, request)
    assert [d["partition"] for d in done] == [0, 1]
    listed = render(await list_actions(settings, limit=5)).splitlines()
    assert listed[0].endswith(
        f"  replay from_time={since.isoformat()} partitions=all"
        f" to_time={until.isoformat()} topic={users}"
    )
    assert listed[1:] == [f"    ok: {done[0]['line']}", f"      {done[1]['line']}"]
    for d in done:
        first, middle, last = (c[d["partition"]] for c in counts)
        assert (d["position_before"], d["position_after"]) == (first + middle + last, first)
        assert (d["replay_end"], d["resume_offset"]) == (first + middle, first + middle + last)
    # `offsets` shows the replays under way, and counts as lag only what is left to read.
    report = await read_offsets(settings)
    users_parts = [p for p in report.as_json()["partitions"] if p["topic"] == users]
    assert [(p["lag"], p["replay_end"]) for p in users_parts] == [
        (counts[1][p], counts[0][p] + counts[1][p]) for p in (0, 1)
    ]
    assert [line for line in report.render().splitlines() if "replay" in line] == [
        f"replay under way: {users}[{d['partition']}] to offset {d['replay_end']}, then on"
        f" from {d['resume_offset']}"
        for d in done
    ]
    stale_before = stale_total()
    async with running(settings):
        await wait_until(lambda: _no_replay_left(engine), what="the replays ended")
        await wait_until(lambda: positions_reached(engine, settings, 36), what="resumed")
    # Exactly the middle group was read again (all stale), nothing before or after it.
    assert stale_total() - stale_before == 12
    assert await rows(engine, "SELECT DISTINCT version FROM users") == [(3,)]
    assert await scalar(engine, "SELECT sum(next_offset) FROM consumer_offsets") == 36


async def _no_replay_left(engine: AsyncEngine) -> bool:
    left = await scalar(
        engine, "SELECT count(*) FROM consumer_offsets WHERE replay_end IS NOT NULL"
    )
    return int(left) == 0


async def test_a_dry_run_reports_per_partition_and_writes_nothing(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=2)
    u, o = settings.users_topic, settings.orders_topic
    users: list[dict[str, Any] | Message] = [
        *(user_event(i, 1) for i in range(1, 5)),
        user_event(2, 2),
        (b"5", b"{not json"),
    ]
    orders = [order_event(10, 1, 1), order_event(11, 99, 1)]  # user 99 never comes
    await produce(settings, u, users)
    await produce(settings, o, orders)

    before = await snapshot(engine)
    report = await dry_run(settings, ReplayRequest(u, None, from_offset=0))
    assert await snapshot(engine) == before
    total = report.total()
    assert total == {"applied": 5, "stale": 0, "waiting": 0, "dead_letters": 1}
    assert sum(p.records for p in report.partitions) == 6
    # Orders are planned against the stored rows: no user has arrived in the target yet.
    orders_report = await dry_run(settings, ReplayRequest(o, None, from_offset=0))
    assert orders_report.total() == {"applied": 0, "stale": 0, "waiting": 2, "dead_letters": 0}

    async with running(settings):
        await wait_until(lambda: positions_reached(engine, settings, 8), what="consumed")
    before = await snapshot(engine)
    again = await dry_run(settings, ReplayRequest(u, None, from_offset=0))
    assert again.total() == {"applied": 0, "stale": 5, "waiting": 0, "dead_letters": 1}
    # Order 10 applied; order 11 waits in the target, and a replayed copy of it is stale.
    orders_again = await dry_run(settings, ReplayRequest(o, None, from_offset=0))
    assert orders_again.total() == {"applied": 0, "stale": 2, "waiting": 0, "dead_letters": 0}
    assert await snapshot(engine) == before

    # The same through the command line, one partition and a bounded range, as JSON.
    where = await rows(engine, "SELECT partition, next_offset FROM consumer_offsets"
                       " WHERE topic = :t ORDER BY next_offset DESC LIMIT 1", t=u)  # fmt: skip
    partition, end = where[0]
    args = ("--from-offset", "0", "--to-offset", str(end - 1), "--dry-run", "--json")
    said = await cli(settings, "replay", "--topic", u, "--partition", str(partition), *args)
    assert (said.code, said.stderr) == (0, "")
    report_json = orjson.loads(said.stdout)
    [part] = report_json["partitions"]
    assert (part["partition"], part["from_offset"], part["to_offset"]) == (partition, 0, end - 1)
    assert part["records"] == end - 1
    counts = part["entities"]["user"]
    assert sum(counts.values()) == end - 1
    assert counts["applied"] == counts["waiting"] == 0
    table = await cli(settings, "replay", "--topic", u, "--all-partitions", "--from-offset",
                      "0", "--dry-run")  # fmt: skip
    lines = table.stdout.splitlines()
    assert lines[0] == f"dry run of a replay of {u} (nothing was written)"
    assert lines[1].split() == [
        "partition", "entity", "range", "records", "applied", "stale", "waiting", "dead_letters"
    ]  # fmt: skip
    assert lines[-1].split() == ["total", "6", "0", "5", "0", "1"]
    assert await snapshot(engine) == before


async def test_replay_refuses_what_it_cannot_do_with_one_line(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=2)
    u = settings.users_topic
    placed = await produce_at(settings, u, [user_event(1, v) for v in range(1, 7)],
                              datetime.now(UTC))  # fmt: skip
    [partition] = {p for p, _ in placed}  # one key: one partition, offsets 0-5
    # Kafka no longer holds offsets 0 and 1 (as after retention).
    client = await admin(settings)
    try:
        await client.delete_records({TopicPartition(u, partition): RecordsToDelete(2)})
    finally:
        await client.close()

    tp = f"{u}[{partition}]"
    base = ("replay", "--topic", u, "--partition", str(partition))
    refused: dict[str, tuple[str, ...]] = {
        f"offset 0 is no longer held by Kafka (retention) in {tp}: it can be replayed from"
        " offset 2 to 6 (the end)": (
            *base, "--from-offset", "0"),
        f"offset 7 is outside {tp}: it can be replayed from offset 2 to 6 (the end)": (
            *base, "--from-offset", "3", "--to-offset", "7"),
        f"{tp}: the end (offset 3) is before the start (offset 4)": (
            *base, "--from-offset", "4", "--to-offset", "3", "--dry-run"),
        f"unknown topic 'cdc.nope': replay works on {u} and {settings.orders_topic}": (
            "replay", "--topic", "cdc.nope", "--all-partitions", "--from-offset", "0"),
        f"{u} has partitions 0 to 1; there is no partition 2": (
            "replay", "--topic", u, "--partition", "0", "--partition", "2", "--from-offset", "0"),
        "give exactly one of --from-offset and --from-time": (
            *base, "--from-offset", "3", "--from-time", "2026-01-01"),
        "give at most one of --to-offset and --to-time": (
            *base, "--from-offset", "3", "--to-offset", "4", "--to-time", "2026-01-01"),
        "--to-time is before --from-time: nothing would be replayed": (
            *base, "--from-time", "2026-02-01", "--to-time", "2026-01-01"),
        "give --partition P (one or more) or --all-partitions": (
            "replay", "--topic", u, "--from-offset", "3"),
        "give --partition or --all-partitions, not both": (
            *base, "--all-partitions", "--from-offset", "3"),
    }  # fmt: skip
    for message, args in refused.items():
        outcome = await cli(settings, *args)
        assert outcome.failed_with_one_line() == f"sync-service: {message}", args
        assert outcome.stdout == ""
    assert await snapshot(engine) == [[], [], [], [], [], []]

    # The log start itself is fine, and so is a bounded replay the consumer has not reached.
    ok = await cli(settings, *base, "--from-offset", "2", "--to-offset", "4", "--json")
    assert (ok.code, ok.stderr) == (0, "")
    [done] = orjson.loads(ok.stdout)["partitions"]
    assert done["line"] == (
        f"{tp}: nothing to replay (the consumer has not read it yet); position stays none"
    )
    assert await rows(engine, "SELECT action, ok FROM operator_actions") == [("replay", True)]
