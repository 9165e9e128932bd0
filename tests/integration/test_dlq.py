"""The dead-letter commands against the real Kafka and PostgreSQL, through the installed
`sync-service`: show (headers and binary kept and shown safely), redrive by kind and by
reason in chunks, purge (and its refusals), and the dead-letter guard (it pauses a broken
partition, not a healthy one; the pause survives a restart; resume reads on)."""

from __future__ import annotations

import asyncio
import os
import pty
from base64 import b64decode
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.ops.dlq import redrive
from tests.factories import encode, key_of, user_event
from tests.integration.harness import (
    as_environment,
    count,
    create_topics,
    rows,
    running,
    scalar,
    wait_until,
)
from tests.integration.test_cli import EXECUTABLE, Outcome, cli
from tests.integration.test_health import _free_port
from tests.integration.test_ops import add_dead_letter

ACTIONS = "SELECT action, arguments, ok, outcome FROM operator_actions ORDER BY id"
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


async def produce_to(settings: Settings, partition: int, records: Iterable[Record]) -> None:
    """Send `records` to one partition of the users topic, in order, and wait."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(
                settings.users_topic, value=v, key=k, partition=partition, headers=h or None
            )
            for k, v, h in records
        ]
        await producer.flush()
        for future in futures:
            await future
    finally:
        await producer.stop()


def good(user_ids: Iterable[int], version: int = 1) -> list[Record]:
    return [(key_of(e), encode(e), []) for e in (user_event(i, version) for i in user_ids)]


def garbage(n: int) -> list[Record]:
    return [(b"1", b"\x00garbage %d" % i, []) for i in range(n)]


async def position(engine: AsyncEngine, settings: Settings, partition: int) -> int | None:
    stored = await scalar(
        engine,
        "SELECT next_offset FROM consumer_offsets WHERE group_id = :g AND topic = :t"
        " AND partition = :p",
        g=settings.group_id,
        t=settings.users_topic,
        p=partition,
    )
    return None if stored is None else int(stored)


async def cli_with_input(settings: Settings, *args: str, answer: bytes | None) -> Outcome:
    """`sync-service *args` with a terminal on stdin that types `answer` (None: no
    terminal, stdin at end of file)."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    variables.update(as_environment(settings))
    terminal, child_end = pty.openpty() if answer is not None else (None, None)
    process = await asyncio.create_subprocess_exec(
        str(EXECUTABLE),
        *args,
        env=variables,
        stdin=child_end if child_end is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if terminal is not None and child_end is not None and answer is not None:
        os.close(child_end)
        os.write(terminal, answer)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if terminal is not None:
            os.close(terminal)
    assert process.returncode is not None
    return Outcome(process.returncode, stdout.decode(), stderr.decode())


async def test_show_keeps_headers_and_shows_binary_safely(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=1)
    binary = b"\x1b[31m\x00\xff{"  # an escape sequence must never reach the terminal
    headers = [("trace-id", b"abc-123"), ("blob", b"\x00\x01\xfe"), ("trace-id", b"again")]
    nul = [("nul\x00name", b"v")]  # PostgreSQL cannot store U+0000 in the jsonb
    records: list[Record] = [(b"7", binary, headers), (b"8", b"{not json", []), (b"9", b"{", nul)]
    await produce_to(settings, 0, records)
    async with running(settings):
        await wait_until(lambda: _letters(engine, 3), what="three dead letters")
    first, second, third = (
        row[0] for row in await rows(engine, "SELECT id FROM dead_letters ORDER BY id")
    )

    shown = await cli(settings, "dlq", "show", str(first))
    assert (shown.code, shown.stderr) == (0, "")
    assert "\x1b" not in shown.stdout
    assert "\x00" not in shown.stdout
    lines = shown.stdout.splitlines()
    assert lines[0] == f"dead letter #{first}"
    assert lines[1].startswith(f"origin:    {settings.users_topic}[0]@0")
    assert lines[2] == "kind:      not_json"
    assert "key:       '7'" in lines
    assert "headers:   'trace-id': 'abc-123'" in lines
    assert "           'blob': (binary, 3 bytes) 0001fe" in lines
    assert "           'trace-id': 'again'" in lines
    assert f"value:     {len(binary)} bytes, binary (hex):" in lines
    assert lines[-1] == "00000000  1b 5b 33 31 6d 00 ff 7b" + " " * 24 + "  |.[31m..{|"

    as_json = orjson.loads((await cli(settings, "dlq", "show", str(first), "--json")).stdout)
    assert as_json["origin"] == {"topic": settings.users_topic, "partition": 0, "offset": 0}
    assert b64decode(as_json["value"]["base64"]) == binary
    assert as_json["value"]["text"] is None
    assert [(h["name"], b64decode(h["value"]["base64"])) for h in as_json["headers"]] == headers
    assert as_json["key"] == {"text": "7", "base64": "Nw==", "size": 1}

    text = await cli(settings, "dlq", "show", str(second))
    assert "headers:   (none)" in text.stdout.splitlines()
    assert text.stdout.endswith("UTF-8 text:\n{not json\n")

    replaced = await cli(settings, "dlq", "show", str(third))
    assert "headers:   'nul\ufffdname': 'v'" in replaced.stdout.splitlines()

    missing = await cli(settings, "dlq", "show", "4040")
    assert missing.failed_with_one_line() == "sync-service: no dead letter with id 4040"
    not_a_number = await cli(settings, "dlq", "show", "x")
    assert not_a_number.failed_with_one_line().startswith("sync-service: Invalid value for 'ID'")


async def _letters(engine: AsyncEngine, n: int) -> bool:
    return await count(engine, "SELECT count(*) FROM dead_letters") >= n


async def test_redrive_by_kind_and_by_reason_in_chunks(
    settings: Settings, engine: AsyncEngine
) -> None:
    u = settings.users_topic
    valid = [await add_dead_letter(engine, u, i, str(i).encode(), encode(user_event(i, 1)))
             for i in range(1, 6)]  # fmt: skip
    broken = await add_dead_letter(engine, u, 9, b"9", b"{")
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE dead_letters SET kind = 'not_json', reason = 'not UTF-8 JSON: x'"
                 " WHERE id = ANY(:ids)"),
            {"ids": [valid[0], valid[1], broken]},
        )  # fmt: skip

    by_kind = await redrive(settings, None, kind="not_json", chunk=2)
    assert by_kind == (
        "re-drove 3: 2 applied, 1 still not applicable (see `sync-service dlq list`); "
        "in 2 transactions"
    )
    assert await rows(engine, "SELECT id FROM users ORDER BY id") == [(1,), (2,)]

    by_reason = await cli(settings, "dlq", "redrive", "--reason-contains", "rejected earl")
    assert (by_reason.code, by_reason.stderr) == (0, "")
    assert by_reason.stdout == "re-drove 3: 3 applied, 0 still not applicable\n"
    assert await rows(engine, "SELECT id FROM users ORDER BY id") == [(i,) for i in range(1, 6)]
    left = "SELECT id FROM dead_letters WHERE redriven_at IS NULL"
    assert await rows(engine, left) == [(broken,)]

    nothing = await cli(settings, "dlq", "redrive", "--reason-contains", "no such words")
    assert nothing.stdout == "no dead letters to re-drive\n"
    typo = await cli(settings, "dlq", "redrive", "--kind", "not-json")
    assert typo.failed_with_one_line() == (
        "sync-service: no dead letter of kind 'not-json' (kinds stored: invalid, not_json)"
    )
    # One row per re-drive that changed something, its outcome what the operator saw.
    assert await rows(engine, ACTIONS) == [
        ("dlq redrive", {"ids": None, "kind": "not_json", "reason_contains": None}, True,
         by_kind),
        ("dlq redrive", {"ids": None, "kind": None, "reason_contains": "rejected earl"}, True,
         by_reason.stdout.strip()),
    ]  # fmt: skip


async def test_redrive_of_a_large_store_goes_in_bounded_chunks(
    settings: Settings, engine: AsyncEngine
) -> None:
    """1,200 letters, 500 per transaction: three transactions, every letter applied once."""
    u = settings.users_topic
    async with engine.begin() as connection:
        await connection.execute(
            text(
                'INSERT INTO dead_letters (topic, partition, "offset", key, value, value_size,'
                " kind, reason) VALUES (:t, 0, :o, :k, :v, :s, 'invalid', 'rejected earlier')"
            ),
            [
                {"t": u, "o": i, "k": str(i).encode(), "v": encode(user_event(i, 1)),
                 "s": len(encode(user_event(i, 1)))}
                for i in range(1, 1201)
            ],
        )  # fmt: skip
    said = await redrive(settings, None)
    assert said == "re-drove 1200: 1200 applied, 0 still not applicable; in 3 transactions"
    assert await count(engine, "SELECT count(*) FROM users") == 1200
    assert await count(engine, "SELECT count(*) FROM outbox") == 1200
    assert await count(engine, "SELECT count(*) FROM dead_letters WHERE redriven_at IS NULL") == 0
    assert await rows(engine, "SELECT action, outcome FROM operator_actions") == [
        ("dlq redrive", said)
    ]


async def test_purge_asks_refuses_and_deletes_only_what_was_selected(
    settings: Settings, engine: AsyncEngine
) -> None:
    u = settings.users_topic
    ids = [await add_dead_letter(engine, u, i, b"1", b"{") for i in range(6)]
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE dead_letters SET kind = 'empty' WHERE id = ANY(:ids)"), {"ids": ids[4:]}
        )
        await connection.execute(
            text("UPDATE dead_letters SET created_at = now() - interval '3 days'"
                 " WHERE id = ANY(:ids)"),
            {"ids": ids[:2]},
        )  # fmt: skip
    total = "SELECT count(*) FROM dead_letters"

    # No terminal and no --yes: refused, nothing deleted.
    refused = await cli_with_input(settings, "dlq", "purge", str(ids[0]), answer=None)
    assert refused.failed_with_one_line() == (
        f"sync-service: not purging 1 dead letter (id {ids[0]}; 1 never re-driven) without "
        "confirmation: rerun with --yes"
    )
    assert refused.code == 2
    # A terminal, and the operator says no; then yes.
    declined = await cli_with_input(settings, "dlq", "purge", str(ids[0]), answer=b"n\n")
    assert declined.failed_with_one_line() == "sync-service: nothing purged"
    assert await count(engine, total) == 6
    confirmed = await cli_with_input(settings, "dlq", "purge", str(ids[0]), answer=b"y\n")
    assert confirmed.code == 0, confirmed
    assert "delete 1 dead letter" in confirmed.stdout
    assert confirmed.stdout.endswith(f"purged 1 dead letter (id {ids[0]})\n")
    assert await count(engine, total) == 5

    cutoff = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S%z")
    before = await cli(settings, "dlq", "purge", "--before", cutoff, "--yes")
    assert (before.code, before.stderr) == (0, "")
    assert before.stdout.startswith("purged 1 dead letter (stored before ")
    by_kind = await cli(settings, "dlq", "purge", "--kind", "empty", "--yes")
    assert by_kind.stdout == "purged 2 dead letters (of kind empty)\n"
    assert await rows(engine, "SELECT id FROM dead_letters ORDER BY id") == [(ids[2],), (ids[3],)]

    for args, said in [
        ((), "say which dead letters to purge: IDs, --before TS or --kind K"),
        ((str(ids[2]), "--kind", "invalid"), "give dead-letter IDs or --before/--kind, not both"),
        (("4040", "--yes"), "no dead letter with id 4040"),
        (("--kind", "nope", "--yes"), "no dead letter of kind 'nope' (kinds stored: invalid)"),
        (("--before", "yesterday"), "Invalid value for '--before'"),
    ]:
        outcome = await cli(settings, "dlq", "purge", *args)
        assert outcome.failed_with_one_line().startswith(f"sync-service: {said}"), args
    assert await count(engine, total) == 2
    none_left = await cli(settings, "dlq", "purge", "--before", "2000-01-01", "--yes")
    assert none_left.stdout == "no dead letters to purge (stored before 2000-01-01T00:00:00)\n"
    # Only the three purges that deleted something are recorded, with what they deleted.
    actions = await rows(engine, ACTIONS)
    assert [(a, args["ids"], args["kind"], ok, outcome) for a, args, ok, outcome in actions] == [
        ("dlq purge", [ids[0]], None, True, f"purged 1 dead letter (id {ids[0]})"),
        ("dlq purge", None, None, True, before.stdout.strip()),
        ("dlq purge", None, "empty", True, "purged 2 dead letters (of kind empty)"),
    ]
    assert actions[1][1]["before"] is not None


async def test_purge_keeps_a_letter_stored_after_the_count(
    settings: Settings, engine: AsyncEngine
) -> None:
    from sync_service.ops.dlq import Selection
    from sync_service.ops.purge import preview, purge

    u = settings.users_topic
    await add_dead_letter(engine, u, 1, b"1", b"{")
    selection = Selection(kind="invalid")
    shown = await preview(settings, selection)
    assert (shown.count, shown.not_redriven) == (1, 1)
    later = await add_dead_letter(engine, u, 2, b"1", b"{")  # arrives while the operator reads
    assert await purge(settings, selection, shown, chunk=1) == (
        "purged 1 dead letter (of kind invalid)"
    )
    assert await rows(engine, "SELECT id FROM dead_letters") == [(later,)]


async def test_a_purge_in_chunks_records_what_each_chunk_deleted(
    settings: Settings, engine: AsyncEngine
) -> None:
    from sync_service.ops.dlq import Selection
    from sync_service.ops.purge import preview, purge

    for offset in range(5):
        await add_dead_letter(engine, settings.users_topic, offset, b"1", b"{")
    selection = Selection(kind="invalid")
    said = await purge(settings, selection, await preview(settings, selection), chunk=2)
    assert said == "purged 5 dead letters (of kind invalid) in 3 transactions"
    assert await count(engine, "SELECT count(*) FROM dead_letters") == 0
    [(action, arguments, ok, outcome)] = await rows(engine, ACTIONS)
    assert (action, arguments["kind"], ok, outcome) == ("dlq purge", "invalid", True, said)


def guarded_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"dlq_window": 50, "dlq_max_ratio": 0.5, "http_port": _free_port()}
    )


def guarded_metric(settings: Settings, partition: int) -> float | None:
    return REGISTRY.get_sample_value(
        "sync_partition_guarded", {"topic": settings.users_topic, "partition": str(partition)}
    )


async def readyz(settings: Settings) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{settings.http_port}/readyz") as response,
    ):
        return response.status, await response.json()


async def test_the_guard_pauses_a_broken_partition_until_it_is_resumed(
    settings: Settings, engine: AsyncEngine
) -> None:
    """Partition 0 turns to garbage; 1 and 2 stay healthy. Only 0 stops, at the batch
    that tipped its window over the ratio; it stays stopped across a restart; once
    resumed it reads on from where it stopped, and the letters that tripped the guard do
    not trip it again."""
    settings = guarded_settings(settings)
    await create_topics(settings, partitions=3)
    await produce_to(settings, 0, good(range(1, 11)))
    await produce_to(settings, 1, good(range(101, 111)))
    async with running(settings):
        await wait_until(lambda: _at(engine, settings, {0: 10, 1: 10}), what="healthy start")
        await produce_to(settings, 0, garbage(40))
        guard = (
            'SELECT paused_at IS NOT NULL, dead, "window", kind, window_from'
            " FROM partition_guards WHERE group_id = :g AND topic = :t AND partition = 0"
        )

        async def tripped() -> bool:
            found = await rows(engine, guard, g=settings.group_id, t=settings.users_topic)
            return bool(found) and found[0][0]

        await wait_until(tripped, what="the guard to pause partition 0")
        [(_, dead, window, kind, window_from)] = await rows(
            engine, guard, g=settings.group_id, t=settings.users_topic
        )
        assert (window, kind, window_from) == (50, "not_json", 0)
        assert 25 < dead <= 40  # more than half of the window, from the garbage only
        stopped_at = await position(engine, settings, 0)
        assert stopped_at is not None
        assert 10 + 26 <= stopped_at <= 50
        assert guarded_metric(settings, 0) == 1.0
        status, body = await readyz(settings)
        assert status == 503
        assert body["checks"]["dead_letter_guard"] == (
            f"{settings.users_topic}[0] paused by the dead-letter guard ({dead} of 50 dead "
            "letters, most often not_json): `sync-service dlq resume`"
        )
        # The upstream is fixed; partition 0 still waits, the others go on.
        await produce_to(settings, 0, good(range(11, 31)))
        await produce_to(settings, 2, good(range(201, 221)))
        await produce_to(settings, 1, garbage(3))
        await wait_until(lambda: _at(engine, settings, {1: 13, 2: 20}), what="1 and 2 go on")
        await asyncio.sleep(3)
        assert await position(engine, settings, 0) == stopped_at

    # A restart does not forget the pause.
    async with running(settings):
        await produce_to(settings, 2, good(range(221, 231)))
        await wait_until(lambda: _at(engine, settings, {2: 30}), what="2 after the restart")
        await asyncio.sleep(3)
        assert await position(engine, settings, 0) == stopped_at
        assert guarded_metric(settings, 0) == 1.0

        wrong = await cli(settings, "dlq", "resume", "--topic", settings.users_topic,
                          "--partition", "1")  # fmt: skip
        assert wrong.failed_with_one_line() == (
            f"sync-service: {settings.users_topic}[1] is not paused by the dead-letter guard "
            f"for group {settings.group_id} (paused: {settings.users_topic}[0])"
        )
        resumed = await cli(settings, "dlq", "resume", "--topic", settings.users_topic,
                            "--partition", "0")  # fmt: skip
        assert (resumed.code, resumed.stderr) == (0, "")
        assert resumed.stdout.startswith(
            f"resumed {settings.users_topic}[0] at offset {stopped_at}"
        )
        end = 10 + 40 + 20
        await wait_until(lambda: _at(engine, settings, {0: end}), what="partition 0 to read on")
        status, body = await readyz(settings)
        assert (status, body["checks"]["dead_letter_guard"]) == (200, None)
        assert guarded_metric(settings, 0) is None
    # The garbage left after the pause (less than the ratio of a fresh window) did not
    # trip it again, and every good record of partition 0 applied.
    assert await rows(
        engine,
        "SELECT partition, paused_at IS NULL, window_from FROM partition_guards"
        " WHERE group_id = :g",
        g=settings.group_id,
    ) == [(0, True, stopped_at)]
    assert await count(engine, "SELECT count(*) FROM users WHERE id BETWEEN 1 AND 30") == 30
    again = await cli(settings, "dlq", "resume", "--topic", settings.users_topic,
                      "--partition", "0")  # fmt: skip
    assert again.failed_with_one_line().endswith("(paused: none is)")
    assert await rows(engine, ACTIONS) == [
        ("dlq resume", {"topic": settings.users_topic, "partition": 0}, True,
         resumed.stdout.strip()),
    ]  # fmt: skip


async def test_the_guard_lets_a_healthy_stream_with_a_few_bad_messages_through(
    settings: Settings, engine: AsyncEngine
) -> None:
    settings = guarded_settings(settings)
    await create_topics(settings, partitions=1)
    records = good(range(1, 201))
    for at in (5, 50, 51, 52, 120, 199):  # six bad ones, three in a row
        records[at] = garbage(1)[0]
    await produce_to(settings, 0, records)
    async with running(settings):
        await wait_until(lambda: _at(engine, settings, {0: 200}), what="all 200 consumed")
    assert await count(engine, "SELECT count(*) FROM dead_letters") == 6
    assert await count(engine, "SELECT count(*) FROM users") == 194
    mine = "SELECT * FROM partition_guards WHERE group_id = :g"
    assert await rows(engine, mine, g=settings.group_id) == []


async def _at(engine: AsyncEngine, settings: Settings, wanted: dict[int, int]) -> bool:
    for partition, offset in wanted.items():
        stored = await position(engine, settings, partition)
        if stored is None or stored < offset:
            return False
    return True


async def read_topic(settings: Settings, topic: str, count: int) -> list[Any]:
    """Every committed record of `topic` once `count` are there (and a moment more, so
    that a duplicate would be seen)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + 60
        settle = None
        while asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                found.extend(records)
            if len(found) >= count:
                settle = settle or asyncio.get_running_loop().time() + 3
                if asyncio.get_running_loop().time() > settle:
                    break
    finally:
        await consumer.stop()
    return found


async def test_dead_letters_are_published_once_to_the_dlq_topic(
    settings: Settings, engine: AsyncEngine
) -> None:
    """With SYNC_DLQ_TOPIC, each dead letter goes to that topic through the outbox and
    the relay: its original key, value and headers, the reason and origin in `dlq.*`
    headers; a replay that reads the bad records again publishes nothing twice."""
    from sync_service.kafka import ensure_topics
    from sync_service.relay.publish import relay_part

    settings = settings.model_copy(update={"dlq_topic": f"{settings.users_topic}.dlq"})
    assert settings.dlq_topic is not None
    await create_topics(settings, partitions=1)
    await ensure_topics(
        settings,
        {settings.out_users_topic: 1, settings.out_orders_topic: 1, settings.dlq_topic: 1},
    )
    keyless = encode(user_event(8, 1))
    bad = [
        (b"7", b"\x00\xffnot json", [("trace-id", b"t-1")]),
        (None, keyless, []),  # no key
        *good([9]),
    ]
    await produce_to(settings, 0, bad)
    async with running(settings, relay=relay_part):
        published = await read_topic(settings, settings.dlq_topic, 2)
        # Read again: the stored letters are kept, and no second copy is published.
        await cli(settings, "replay", "--topic", settings.users_topic, "--partition", "0",
                  "--from-offset", "0")  # fmt: skip
        await asyncio.sleep(3)
        again = await read_topic(settings, settings.dlq_topic, 2)
        downstream = await read_topic(settings, settings.out_users_topic, 1)
    assert len(published) == 2
    assert [(r.key, r.value) for r in again] == [(r.key, r.value) for r in published]
    first, second = published
    assert (first.key, first.value) == (b"7", b"\x00\xffnot json")
    headers = dict(first.headers)
    assert first.headers[0] == ("trace-id", b"t-1")
    assert {k: v for k, v in headers.items() if k.startswith("dlq.")} == {
        "dlq.topic": settings.users_topic.encode(),
        "dlq.partition": b"0",
        "dlq.offset": b"0",
        "dlq.kind": b"not_json",
        "dlq.reason": headers["dlq.reason"],
        "dlq.value_size": b"10",
    }
    assert headers["dlq.reason"].startswith(b"not UTF-8: byte 0xff")
    assert headers["event_type"] == b"dead_letter"
    assert (second.key, second.value) == (None, keyless)
    assert dict(second.headers)["dlq.kind"] == b"bad_key"
    assert [r.key for r in downstream] == [b"9"]  # the valid change, as always
    assert await count(engine, "SELECT count(*) FROM dead_letters") == 2
