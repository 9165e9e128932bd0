"""No secret in any output: with a distinctive password in SYNC_DATABASE_URL (a role of its
own on the real server), the service runs with traffic (text and JSON, with and without
`--debug`) and every command runs, including ones that fail and print tracebacks; not
one byte they wrote, nor the `/readyz` and `/metrics` bodies, holds the password."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from tests.factories import user_event
from tests.integration.harness import count, create_topics, produce, wait_until
from tests.integration.processes import command, environment, service
from tests.integration.relay_helpers import create_out_topics, free_port


@pytest.fixture
async def canary(settings: Settings, engine: AsyncEngine) -> AsyncIterator[tuple[Settings, str]]:
    """Settings whose database URL logs in as a role of the test's own, with a password
    no output may show. (The local server trusts loopback, so the password is not checked;
    what matters is that it is in the URL the service is given.)"""
    run = uuid.uuid4().hex[:10]
    role, password = f"logs_canary_{run}", f"Canary{run}Pw"
    async with engine.begin() as connection:
        await connection.execute(
            text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE postgres")
        )
    url = make_url(settings.database_url).set(username=role, password=password)
    try:
        yield (
            settings.model_copy(
                update={
                    "database_url": url.render_as_string(hide_password=False),
                    "http_port": free_port(),
                }
            ),
            password,
        )
    finally:
        async with engine.begin() as connection:
            await connection.execute(text(f"DROP ROLE IF EXISTS {role}"))


async def test_no_output_holds_the_database_password(
    canary: tuple[Settings, str], engine: AsyncEngine
) -> None:
    settings, password = canary
    await create_topics(settings, partitions=1)
    await create_out_topics(settings, partitions=1)
    outputs: dict[str, bytes] = {}
    version = 0
    for fmt in ("text", "json"):
        for debug in (False, True):
            version += 1
            name = f"run {fmt}{' --debug' if debug else ''}"
            env = environment(settings, log_format=fmt)
            await produce(
                settings,
                settings.users_topic,
                [user_event(i, version) for i in range(1, 51)] + [(b"7", b"not json")],
            )
            async with service(env, *(["--debug"] if debug else []), "run") as running:
                await running.wait_for_line("relay active")

                async def applied(version: int = version) -> bool:
                    return (
                        await count(engine, f"SELECT count(*) FROM users WHERE version = {version}")
                        == 50
                    )

                await wait_until(applied, within=120, what=f"the events of {name}")
                outputs[f"{name}: /readyz"] = await running.get(settings.http_port, "/readyz")
                outputs[f"{name}: /metrics"] = await running.get(settings.http_port, "/metrics")
            outputs[name] = bytes(running.stdout.data + running.stderr.data)
            assert b"sync-service started" in outputs[name]
            assert b"dead-lettered" in outputs[name]

    env = environment(settings)
    url = make_url(settings.database_url)
    unreachable_db = environment(
        settings, database_url=url.set(port=35439).render_as_string(hide_password=False)
    )
    unparseable_db = environment(
        settings, database_url=f"postgresql+asyncpg://{url.username}:{password}@localhost:port/x"
    )
    unreachable_kafka = environment(settings, kafka_bootstrap="localhost:39099")
    commands = {
        "db upgrade": (env, ["db", "upgrade"]),
        "--debug db upgrade": (env, ["--debug", "db", "upgrade"]),
        "offsets": (env, ["offsets"]),
        "offsets --json": (env, ["offsets", "--json"]),
        "dlq list": (env, ["dlq", "list"]),
        "dlq list --json": (env, ["dlq", "list", "--json"]),
        "replay, no start": (env, ["replay", "--topic", settings.users_topic, "--partition", "0"]),
        "replay, bad partition": (
            env,
            [
                "--debug",
                "replay",
                "--topic",
                settings.users_topic,
                "--partition",
                "9",
                "--from-offset",
                "0",
            ],
        ),
        "no database: --debug offsets": (unreachable_db, ["--debug", "offsets"]),
        "no database: --debug run": (unreachable_db, ["--debug", "run"]),
        "no database: --debug db upgrade": (unreachable_db, ["--debug", "db", "upgrade"]),
        "bad URL: --debug offsets": (unparseable_db, ["--debug", "offsets"]),
        "bad URL: --debug run": (unparseable_db, ["--debug", "run"]),
        "no Kafka: --debug offsets": (unreachable_kafka, ["--debug", "offsets"]),
        "no Kafka: --debug run": (unreachable_kafka, ["--debug", "run"]),
        "no Kafka: --debug replay": (
            unreachable_kafka,
            [
                "--debug",
                "replay",
                "--topic",
                settings.users_topic,
                "--partition",
                "0",
                "--from-offset",
                "0",
            ],
        ),
    }
    for name, (variables, args) in commands.items():
        done = await command(variables, *args)
        outputs[name] = done.stdout + done.stderr
        expected_ok = name in {"db upgrade", "--debug db upgrade", "offsets", "offsets --json"}
        assert (done.code == 0) == (expected_ok or name.startswith("dlq")), (name, done)

    leaks = [name for name, output in outputs.items() if password.encode() in output]
    assert leaks == [], f"the password is in: {leaks}"
    # The checks above saw what they were meant to: the masked URL, and a traceback.
    assert f"{url.username}:***@".encode() in outputs["run text"]
    assert b'"database":"postgresql+asyncpg://' in outputs["run json"]
    assert any(b"Traceback" in output for output in outputs.values())
    assert b"sync_transient_failures_total" in outputs["run text: /metrics"]
    assert (
        b'"status": "ready"' in outputs["run text: /readyz"]
        or b'"ready"' in outputs["run text: /readyz"]
    )
