"""The audit trail against the real PostgreSQL: each operator action that changed something
is one `operator_actions` row written with its effect; a refused one writes none; a failed
one says so; `sync-service history` lists them newest first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.errors import UserError
from sync_service.ops.dlq import redrive
from sync_service.ops.replay import replay
from sync_service.pipeline.batch import Batch, TopicPartition
from sync_service.pipeline.write import BatchWriter
from tests.factories import encode, user_event
from tests.integration.harness import create_topics, produce, rows
from tests.integration.test_cli import cli
from tests.integration.test_ops import add_dead_letter

ACTIONS = "SELECT operator, action, arguments, ok, outcome FROM operator_actions ORDER BY id"


async def test_replay_and_redrive_are_recorded_with_their_effect(
    settings: Settings, engine: AsyncEngine
) -> None:
    who = settings.model_copy(update={"operator": "ada@oncall"})
    await create_topics(settings, partitions=1)
    await produce(settings, settings.users_topic, [user_event(i, 1) for i in (1, 2, 3)])
    moved = await replay(who, settings.users_topic, 0, 2, None)
    letter = await add_dead_letter(engine, settings.users_topic, 7, b"9", encode(user_event(9, 1)))
    drove = await redrive(who, [letter])
    assert await rows(engine, ACTIONS) == [
        (
            "ada@oncall",
            "replay",
            {
                "topic": settings.users_topic,
                "partitions": [0],
                "from_offset": 2,
                "from_time": None,
                "to_offset": None,
                "to_time": None,
            },
            True,
            moved,
        ),
        (
            "ada@oncall",
            "dlq redrive",
            {"ids": [letter], "kind": None, "reason_contains": None},
            True,
            drove,
        ),
    ]
    assert drove == "re-drove 1: 1 applied, 0 still not applicable"

    # Refused: nothing changed, nothing recorded.
    with pytest.raises(UserError):
        await replay(who, settings.users_topic, 0, 99, None)
    with pytest.raises(UserError):
        await redrive(who, [letter + 100])
    assert len(await rows(engine, ACTIONS)) == 2


async def test_a_failed_redrive_is_recorded_as_failed_and_changes_nothing(
    settings: Settings, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FailsAfterWriting(BatchWriter):
        async def write(self, batch: Batch, expected: Mapping[TopicPartition, int | None]) -> Any:
            await super().write(batch, expected)
            raise RuntimeError("the process died here")

    monkeypatch.setattr("sync_service.ops.dlq.BatchWriter", FailsAfterWriting)
    letter = await add_dead_letter(engine, settings.users_topic, 3, b"9", encode(user_event(9, 1)))
    with pytest.raises(RuntimeError):
        await redrive(settings, None)
    assert await rows(engine, "SELECT id FROM users") == []
    [(operator, action, arguments, ok, outcome)] = await rows(engine, ACTIONS)
    assert (action, arguments, ok) == (
        "dlq redrive",
        {"ids": None, "kind": None, "reason_contains": None},
        False,
    )
    assert outcome == "rolled back after 1 attempts: RuntimeError: the process died here"
    assert operator  # the OS user: SYNC_OPERATOR is not set
    assert await rows(engine, "SELECT redriven_at FROM dead_letters WHERE id = :i", i=letter) == [
        (None,)
    ]


async def test_history_lists_newest_first_as_json_and_as_lines(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=1)
    await produce(settings, settings.users_topic, [user_event(i, 1) for i in (1, 2, 3)])
    for offset in (3, 1, 0):
        await replay(settings, settings.users_topic, 0, offset, None)
    listed = await cli(settings, "history", "--json", "--limit", "2")
    assert (listed.code, listed.stderr) == (0, "")
    actions = orjson.loads(listed.stdout)
    assert [a["arguments"]["from_offset"] for a in actions] == [0, 1]
    assert {a["action"] for a in actions} == {"replay"}
    assert actions[0]["outcome"].startswith(f"{settings.users_topic}[0]: position 1 -> 0;")
    assert actions[0]["ok"] is True
    assert actions[0]["id"] > actions[1]["id"]

    lines = (await cli(settings, "history")).stdout.splitlines()
    assert len(lines) == 6
    assert lines[0].endswith(f"replay from_offset=0 partitions=0 topic={settings.users_topic}")
    assert lines[1].startswith("    ok: ")
