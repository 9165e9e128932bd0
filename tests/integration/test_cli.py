"""`sync-service` as an operator runs it: the installed entry point in a subprocess, with
the test's SYNC_* settings. Output is what scripts parse; every failure is one line."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sync_service.config import Settings
from sync_service.db.schema import head_revision
from tests.conftest import Endpoints
from tests.factories import encode, user_event
from tests.integration.harness import as_environment, create_topics, produce, rows

EXECUTABLE = Path(sys.executable).with_name("sync-service")
UNREACHABLE_DB = "postgresql+asyncpg://postgres@localhost:1/sync"


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    def failed_with_one_line(self) -> str:
        """The failure's only stderr line, after checking that there is exactly one."""
        assert self.code != 0, self
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("sync-service: "), self.stderr
        assert "Traceback" not in self.stderr
        return lines[0]


async def cli(settings: Settings, *args: str, **env: str) -> Outcome:
    """Run `sync-service *args` with `settings` as SYNC_* variables (and `env` on top)."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    variables.update(as_environment(settings))
    variables.update(env)
    process = await asyncio.create_subprocess_exec(
        str(EXECUTABLE),
        *args,
        env=variables,
        cwd=Path(__file__).parent,  # not the repo root: no `.env` may leak in
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Outcome(process.returncode, stdout.decode(), stderr.decode())


async def test_offsets_prints_json_and_a_table(settings: Settings, engine: AsyncEngine) -> None:
    await create_topics(settings, partitions=1)
    await produce(settings, settings.users_topic, [user_event(i, 1) for i in (1, 2, 3)])
    await _store_position(engine, settings, settings.users_topic, 1)

    done = await cli(settings, "offsets", "--json")
    assert (done.code, done.stderr) == (0, "")
    report = orjson.loads(done.stdout)
    assert report == {
        "group": settings.group_id,
        "partitions": [
            {"topic": settings.users_topic, "partition": 0, "position": 1, "beginning": 0,
             "end": 3, "lag": 2},
            {"topic": settings.orders_topic, "partition": 0, "position": None, "beginning": 0,
             "end": 0, "lag": 0},
        ],
        "lag": 2,
        "waiting": {"changes": 0, "oldest_age_s": None},
        "dead_letters": {"not_redriven": 0},
        "outbox": {"backlog": 0, "oldest_age_s": None, "held_back": 0, "held_by": None},
    }  # fmt: skip

    table = await cli(settings, "offsets")
    assert (table.code, table.stderr) == (0, "")
    assert [line.split() for line in table.stdout.splitlines()] == [
        ["consumer", "group", settings.group_id],
        ["topic", "partition", "position", "end", "lag"],
        [settings.users_topic, "0", "1", "3", "2"],
        [settings.orders_topic, "0", "-", "0", "0"],
        ["total", "lag:", "2"],
        ["waiting", "changes:", "0"],
        ["dead", "letters", "not", "re-driven:", "0"],
        ["outbox", "backlog:", "0"],
    ]


async def test_dlq_list_and_redrive(settings: Settings, engine: AsyncEngine) -> None:
    value = encode(user_event(5, 1))
    async with engine.begin() as connection:
        await connection.execute(
            text(
                'INSERT INTO dead_letters (topic, partition, "offset", key, value, value_size,'
                " kind, reason) VALUES (:t, 2, 40, '5', :v, :s, 'invalid', 'rejected earlier')"
            ),
            {"t": settings.users_topic, "v": value, "s": len(value)},
        )

    listed = await cli(settings, "dlq", "list", "--json")
    assert (listed.code, listed.stderr) == (0, "")
    [letter] = orjson.loads(listed.stdout)
    assert {k: letter[k] for k in ("topic", "partition", "offset", "key", "kind", "reason")} == {
        "topic": settings.users_topic,
        "partition": 2,
        "offset": 40,
        "key": "5",
        "kind": "invalid",
        "reason": "rejected earlier",
    }
    assert (letter["value_size"], letter["redriven_at"], letter["redrive_result"]) == (
        len(value),
        None,
        None,
    )

    redriven = await cli(settings, "dlq", "redrive")
    assert (redriven.code, redriven.stderr) == (0, "")
    assert redriven.stdout == "re-drove 1: 1 applied, 0 still not applicable\n"
    assert await rows(engine, "SELECT id, version FROM users") == [(5, 1)]

    assert (await cli(settings, "dlq", "list")).stdout == "no dead letters\n"
    [kept] = orjson.loads((await cli(settings, "dlq", "list", "--all", "--json")).stdout)
    assert (kept["id"], kept["redrive_result"]) == (letter["id"], "applied")
    assert kept["redriven_at"] is not None

    unknown = await cli(settings, "dlq", "redrive", "999")
    assert unknown.failed_with_one_line() == "sync-service: no dead letter with id 999"


async def test_replay_moves_the_position_and_refuses_bad_arguments(
    settings: Settings, engine: AsyncEngine
) -> None:
    await create_topics(settings, partitions=1)
    users = settings.users_topic
    await produce(settings, users, [user_event(i, 1) for i in (1, 2, 3)])
    await _store_position(engine, settings, users, 3)

    replay_users = ("replay", "--topic", users, "--partition")
    done = await cli(settings, *replay_users, "0", "--from-offset", "1")
    assert (done.code, done.stderr) == (0, "")
    assert done.stdout == (
        f"{users}[0]: position 3 -> 1; a running consumer picks this up on its next batch\n"
    )
    at = await cli(settings, *replay_users, "0", "--from-time", "2000-01-01T00:00:00Z")
    assert at.stdout.startswith(f"{users}[0]: position 1 -> 0;")

    bad: dict[str, list[tuple[str, ...]]] = {
        "give exactly one of --from-offset and --from-time": [
            (*replay_users, "0", "--from-offset", "0", "--from-time", "2026-01-01"),
            (*replay_users, "0"),
        ],
        f"unknown topic 'cdc.nope': replay works on {users} and {settings.orders_topic}": [
            ("replay", "--topic", "cdc.nope", "--partition", "0", "--from-offset", "0"),
        ],
        f"offset 4 is outside {users}[0]: it can be replayed from offset 0 to 3 (the end)": [
            (*replay_users, "0", "--from-offset", "4")
        ],
        f"{users} has partitions 0 to 0; there is no partition 3": [
            (*replay_users, "3", "--from-offset", "0"),
        ],
    }
    runs = [(message, args) for message, cases in bad.items() for args in cases]
    outcomes = await asyncio.gather(*(cli(settings, *args) for _, args in runs))
    for (message, _), outcome in zip(runs, outcomes, strict=True):
        assert outcome.failed_with_one_line() == f"sync-service: {message}"
        assert outcome.stdout == ""
    assert await rows(engine, "SELECT next_offset FROM consumer_offsets") == [(0,)]


async def test_usage_errors_are_one_line(settings: Settings) -> None:
    outcomes = await asyncio.gather(
        cli(settings, "replay", "--partition", "0", "--from-offset", "0"),
        cli(settings, "replay", "--topic", "t", "--partition", "0", "--from-time", "yesterday"),
    )
    for outcome in outcomes:
        outcome.failed_with_one_line()


async def test_an_unreachable_broker_is_one_line(settings: Settings) -> None:
    commands = [
        ("offsets",),
        ("replay", "--topic", settings.users_topic, "--partition", "0", "--from-offset", "0"),
        ("replay", "--topic", settings.users_topic, "--all-partitions", "--from-offset", "0",
         "--dry-run"),
    ]  # fmt: skip
    await _refused_by_the_broker(settings, commands)


async def test_an_unreachable_broker_stops_the_service_with_one_line(settings: Settings) -> None:
    await _refused_by_the_broker(settings, [("consume",), ("run",)])


async def _refused_by_the_broker(settings: Settings, commands: list[tuple[str, ...]]) -> None:
    outcomes = await asyncio.gather(
        *(cli(settings, *c, SYNC_KAFKA_BOOTSTRAP="localhost:1") for c in commands)
    )
    for outcome in outcomes:
        assert outcome.failed_with_one_line().startswith(
            "sync-service: cannot reach Kafka at localhost:1 (KafkaConnectionError): "
        )


async def test_an_unreachable_database_is_one_line(settings: Settings) -> None:
    commands = [
        ("offsets",),
        ("dlq", "list"),
        ("dlq", "redrive"),
        ("dlq", "redrive", "--kind", "invalid"),
        ("dlq", "show", "1"),
        ("dlq", "purge", "--kind", "invalid", "--yes"),
        ("dlq", "resume", "--topic", settings.users_topic, "--partition", "0"),
        ("replay", "--topic", settings.users_topic, "--partition", "0", "--from-offset", "0"),
        ("replay", "--topic", settings.users_topic, "--all-partitions", "--from-offset", "0",
         "--dry-run"),
        ("republish", "--entity", "user", "--all"),
        ("history",),
        ("run",),
        ("db", "upgrade"),
    ]  # fmt: skip
    outcomes = await asyncio.gather(
        *(cli(settings, *c, SYNC_DATABASE_URL=UNREACHABLE_DB) for c in commands)
    )
    for outcome in outcomes:
        line = outcome.failed_with_one_line()
        assert line.startswith("sync-service: cannot reach PostgreSQL ("), line
        assert line.endswith("): is it running, and is SYNC_DATABASE_URL right?"), line


@pytest.fixture
async def empty_database(endpoints: Endpoints) -> AsyncIterator[str]:
    """The URL of a database with nothing in it, dropped afterwards."""
    server = make_url(endpoints.database_url)
    name = f"sync_empty_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


async def test_a_schema_not_at_head_is_refused_until_db_upgrade(
    settings: Settings, empty_database: str
) -> None:
    empty: dict[str, Any] = {"SYNC_DATABASE_URL": empty_database}
    head = head_revision(empty_database)
    commands = [("run",), ("consume",), ("offsets",), ("dlq", "list"), ("dlq", "show", "1")]
    outcomes = await asyncio.gather(*(cli(settings, *c, **empty) for c in commands))
    for outcome in outcomes:
        assert outcome.failed_with_one_line() == (
            f"sync-service: database schema is at nothing, this version needs {head}: "
            "run `sync-service db upgrade`"
        )

    upgraded = await cli(settings, "db", "upgrade", **empty)
    assert (upgraded.code, upgraded.stdout) == (0, f"schema upgraded from nothing to {head}\n")
    again = await cli(settings, "db", "upgrade", **empty)
    assert (again.code, again.stdout) == (0, f"schema already at {head}\n")
    listed = await cli(settings, "dlq", "list", "--json", **empty)
    assert (listed.code, listed.stdout) == (0, "[]\n")


async def _store_position(engine: AsyncEngine, settings: Settings, topic: str, at: int) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)"
                " VALUES (:g, :t, 0, :n)"
            ),
            {"g": settings.group_id, "t": topic, "n": at},
        )
