"""`SYNC_LOG_FORMAT=json`, read as a log pipeline reads it: every line the running service
writes is one JSON object with time, level, logger and message; the batch lines carry
topic, partition, offset range and counts that add up to what was produced, and a dead
letter's line says where it came from."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from tests.factories import user_event
from tests.integration.harness import count, create_topics, produce, wait_until
from tests.integration.processes import environment, service
from tests.integration.relay_helpers import create_out_topics, free_port


async def test_every_line_is_an_object_and_batches_carry_their_offsets(
    settings: Settings, engine: AsyncEngine
) -> None:
    settings = settings.model_copy(update={"http_port": free_port()})
    await create_topics(settings, partitions=1)
    await create_out_topics(settings, partitions=1)
    events = [user_event(i, 1) for i in range(1, 41)]
    await produce(settings, settings.users_topic, [*events, (b"41", b"{not json")])
    await produce(settings, settings.users_topic, [user_event(i, 1) for i in (1, 2)])  # stale
    env = environment(settings, log_format="json", log_level="DEBUG")
    async with service(env, "run") as running:

        async def applied() -> bool:
            return await count(engine, "SELECT count(*) FROM users") == 40

        await wait_until(applied, within=120, what="the users")
        await running.wait_for_line('"chunk published"')
    assert running.stdout.data == b""
    lines = running.stderr.text().splitlines()
    objects: list[dict[str, Any]] = []
    for line in lines:
        parsed = orjson.loads(line)  # every line, the libraries' too
        assert isinstance(parsed, dict), line
        assert list(parsed)[:4] == ["time", "level", "logger", "message"], line
        objects.append(parsed)
    loggers = {o["logger"] for o in objects}
    assert {"sync_service.service", "sync_service.pipeline.consume"} <= loggers

    batches = [o for o in objects if o["message"] == "batch written"]
    assert batches
    covered = sorted(
        offset
        for batch in batches
        for part in batch["partitions"]
        for offset in range(part["first"], part["last"] + 1)
        if (part["topic"], part["partition"]) == (settings.users_topic, 0)
    )
    assert covered == list(range(43))
    assert sum(b["applied"] for b in batches) == 40
    assert sum(b["stale"] for b in batches) == 2
    assert sum(b["dead_letters"] for b in batches) == 1
    assert sum(b["records"] for b in batches) == 43
    assert all({"waiting", "outbox", "write_ms"} <= set(b) for b in batches)

    [dead] = [o for o in objects if o["message"] == "dead-lettered"]
    assert (dead["level"], dead["topic"], dead["partition"], dead["offset"]) == (
        "warning",
        settings.users_topic,
        0,
        40,
    )
    assert dead["kind"] == "not_json"

    chunks = [o for o in objects if o["message"] == "chunk published"]
    assert sum(c["rows"] for c in chunks) == 40
    assert all(isinstance(c["txid"], int) and isinstance(c["id"], int) for c in chunks)
