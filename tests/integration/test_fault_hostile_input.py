"""Fault suite: hostile input through the real Kafka into the real PostgreSQL.

Each message of `bench.hostile.corpus` (a 10 MB value, 100,000-deep nesting, a
1,000,000-digit number, invalid UTF-8, NaN, null fields, a tombstone, no key, a 1 MB key,
random bytes, ...) sits between two valid events on one partition. Each must become a
dead letter of its kind, with its key and value kept up to the caps and their full sizes,
the events around it applied, and the service alive and still consuming afterwards;
`sync-service dlq list --json` prints none of them whole.
"""

from __future__ import annotations

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.hostile import corpus
from sync_service.config import Settings
from sync_service.kafka import ensure_topics
from sync_service.ops.dlq import redrive
from tests.factories import encode, key_of, user_event
from tests.integration.harness import positions_reached, rows, running, scalar, wait_until
from tests.integration.test_cli import cli

LARGEST = 16 << 20
"""The topic and the producer take records up to 16 MiB (the 10 MB value, the 1 MB key)."""
HOSTILE_ID = 999_999
"""Every hostile message is otherwise an upsert of this user, which must never exist."""


async def _produce(settings: Settings, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, max_request_size=LARGEST, linger_ms=5
    )
    await producer.start()
    try:
        for key, value in messages:  # one at a time: the order is the test's
            await (await producer.send(settings.users_topic, key=key, value=value, partition=0))
    finally:
        await producer.stop()


async def _end_offset(settings: Settings) -> int:
    reader = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await reader.start()
    try:
        tp = TopicPartition(settings.users_topic, 0)
        return int((await reader.end_offsets([tp]))[tp])
    finally:
        await reader.stop()


async def test_hostile_messages_are_dead_letters_of_their_kind_and_the_rest_applies(
    settings: Settings, engine: AsyncEngine
) -> None:
    big = {"max.message.bytes": str(LARGEST)}
    await ensure_topics(
        settings,
        {settings.users_topic: 1, settings.orders_topic: 1},
        {settings.users_topic: big},
    )
    hostile = corpus(HOSTILE_ID)
    messages: list[tuple[bytes | None, bytes | None]] = []
    for i, message in enumerate(hostile, start=1):
        good = user_event(i, 1)
        messages += [(key_of(good), encode(good)), (message.key, message.value)]
    last = user_event(len(hostile) + 1, 1)
    messages.append((key_of(last), encode(last)))
    await _produce(settings, messages)
    end = await _end_offset(settings)
    assert end == len(messages)

    async with running(settings) as service:
        await wait_until(
            lambda: positions_reached(engine, settings, end), within=120, what="all consumed"
        )
        assert not service.done()  # alive, and still consuming:
        after = user_event(100, 1)
        await _produce(settings, [(key_of(after), encode(after))])
        await wait_until(
            lambda: positions_reached(engine, settings, end + 1), what="the event after"
        )
        assert not service.done()

    good_ids = [*range(1, len(hostile) + 2), 100]
    assert await rows(engine, "SELECT id, version FROM users ORDER BY id") == [
        (i, 1) for i in good_ids
    ]
    letters = await rows(
        engine,
        'SELECT "offset", kind, reason, key, key_size, octet_length(value), value_size'
        ' FROM dead_letters ORDER BY "offset"',
    )
    assert [(offset, kind) for offset, kind, *_ in letters] == [
        (2 * i + 1, message.kind) for i, message in enumerate(hostile)
    ]
    for (_, _, reason, key, key_size, kept, value_size), message in zip(
        letters, hostile, strict=True
    ):
        assert reason, message.name
        assert "\n" not in reason
        assert len(reason) < 200, reason
        whole_key = message.key or b""
        assert key == (None if message.key is None else whole_key[: settings.dead_letter_key_bytes])
        assert key_size == len(whole_key)
        whole_value = message.value or b""
        assert value_size == len(whole_value), message.name
        assert kept == (
            None
            if message.value is None
            else min(len(whole_value), settings.dead_letter_value_bytes)
        )
    by_name = {
        m.name: (kind, reason) for m, (_, kind, reason, *_) in zip(hostile, letters, strict=True)
    }
    assert by_name["100,000-deep nesting"] == ("too_deep", "JSON nests deeper than 8 levels")
    assert by_name["1,000,000-digit version"][1].startswith("version: number too large")
    assert by_name["no entity"] == ("invalid", "entity: Field required")
    assert by_name["1 MB key"][1].endswith(f"(1,048,576 bytes) does not match data.id {HOSTILE_ID}")

    # A letter whose key was cut is not re-driven as if the cut key were the key.
    letter_id = await scalar(engine, "SELECT id FROM dead_letters WHERE key_size = :n", n=1 << 20)
    assert await redrive(settings, [letter_id]) == (
        "re-drove 1: 0 applied, 1 still not applicable (see `sync-service dlq list`)"
    )
    assert await scalar(
        engine, "SELECT redrive_result FROM dead_letters WHERE id = :i", i=letter_id
    ) == (
        f"cannot re-drive: only {settings.dead_letter_key_bytes} of its key's 1048576 bytes"
        " were kept (SYNC_DEAD_LETTER_KEY_BYTES)"
    )

    listed = await cli(settings, "dlq", "list", "--json", "--all")
    assert listed.code == 0, listed.stderr
    shown = orjson.loads(listed.stdout)
    assert len(shown) == len(hostile)
    assert len(listed.stdout) < 64 * 1024  # previews, not the values or keys themselves
    one_mb_key = next(s for s in shown if s["key_size"] == 1 << 20)
    assert len(one_mb_key["key"]) <= 200
    assert one_mb_key["key_kept"] == settings.dead_letter_key_bytes
