"""The Quix Streams peer in the benchmark: the workload's valid events, each entity's in
version order, on topics of its own; the application (`bench.quix.app`) started in its own
virtualenv on them; timed from its first message until its consumer group has committed
every record (Quix commits a checkpoint after its sinks wrote it), then checked.

Invariant: its figure counts only if its tables' checksum equals the generator's expected
state, the very check sync_service's tables pass (soft-deleted rows included).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.baselines import prepare_baseline_database
from bench.peer.encode import in_version_order
from bench.progress import say
from bench.quix import venv
from bench.report import REPO, Phase
from bench.service.names import Bench
from bench.service.usage import Usage
from bench.workload import Topics, Workload, produce_backlog
from sync_service.events.change import Entity
from sync_service.kafka import admin, ensure_topics
from sync_service.ops.traffic import NULL, ExpectedState, table_checksum
from sync_service.pipeline.plan import COLUMNS

APP: Final = "bench.quix.app"
POLL_S: Final = 0.1
FIRST_MESSAGE: Final = "FIRST_MESSAGE "

Totals = tuple[int, int, int]
"""Per table: rows, the sum of their versions, and how many are (soft-)deleted."""


def expected_totals(expected: ExpectedState) -> dict[str, Totals]:
    """What the cheap progress query must read once the final state is reached."""
    tables: tuple[tuple[str, Entity, tuple[str, ...]], ...] = (
        ("users", "user", expected.users),
        ("orders", "order", expected.orders),
    )
    found = {}
    for table, entity, lines in tables:
        version = COLUMNS[entity].index("version")
        deleted = COLUMNS[entity].index("deleted_at")
        cells = [line.split("|") for line in lines]
        found[table] = (
            len(cells),
            sum(int(row[version]) for row in cells),
            sum(1 for row in cells if row[deleted] != NULL),
        )
    return found


async def totals(engine: AsyncEngine) -> dict[str, Totals]:
    found = {}
    async with engine.connect() as connection:
        for table in ("users", "orders"):
            query = text(
                f"SELECT count(*), coalesce(sum(version), 0), count(deleted_at) FROM {table}"
            )
            rows, versions, deleted = (await connection.execute(query)).one()
            found[table] = (int(rows), int(versions), int(deleted))
    return found


async def committed(client: AIOKafkaAdminClient, group: str) -> int:
    """The records the group has committed, over all partitions. Quix Streams commits a
    checkpoint's offsets only after its sinks wrote it, so this is what the tables hold,
    read without loading PostgreSQL (a count of the tables every poll would)."""
    offsets = await client.list_consumer_group_offsets(group)
    return sum(max(0, meta.offset) for meta in offsets.values())


@dataclass
class Drain:
    """`time.monotonic()` marks of one drain."""

    spawned: float
    first_message: float | None = None
    done: float | None = None
    problem: str | None = None


def _first_message(log: Path) -> float | None:
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(FIRST_MESSAGE):
                return float(line.removeprefix(FIRST_MESSAGE))
    return None


async def _watch(
    process: subprocess.Popen[bytes],
    log: Path,
    client: AIOKafkaAdminClient,
    group: str,
    events: int,
    usage: Usage,
    drain: Drain,
    timeout_s: float,
) -> None:
    """Poll until the group has committed every record, the process exits, or `timeout_s`
    passes; CPU is counted from the first message on."""
    deadline = drain.spawned + timeout_s
    done = 0
    while True:
        now = time.monotonic()
        if process.poll() is not None:
            drain.problem = (
                f"the Quix Streams application exited with {process.returncode}: see {log}"
            )
            return
        if drain.first_message is None:
            drain.first_message = _first_message(log)
            if drain.first_message is not None:
                usage.start()
        elif (done := await committed(client, group)) >= events:
            drain.done = now
            return
        if now > deadline:
            drain.problem = f"{done:,} of {events:,} records committed after {timeout_s:.0f} s"
            return
        await asyncio.sleep(POLL_S)


async def check_state(engine: AsyncEngine, expected: ExpectedState) -> list[str]:
    """How the tables differ from the expected final state (nothing: they are equal)."""
    if await table_checksum(engine) == expected.checksum():
        return []
    have, want = await totals(engine), expected_totals(expected)
    return [f"the tables' checksum differs from the expected final state ({have} != {want})"]


def _spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """The application, run from the repository so that `bench.quix` is importable."""
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM (the application flushes its sinks and leaves its group), SIGKILL if it
    hangs; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


async def run_quix(
    bench: Bench, workload: Workload, *, commit_interval: float, timeout_s: float
) -> Phase:
    """The Quix Streams application on the workload's valid events in version order, into
    a database of its own with the relaxed tables; its rate counts the valid events."""
    phase = Phase("quix")
    try:
        interpreter = await asyncio.to_thread(venv.python, REPO)
    except venv.QuixUnavailable as error:
        phase.status, phase.problems = "failed", [str(error)]
        return phase
    prefix = bench.prefix("quix")
    topics = Topics(f"{prefix}.users", f"{prefix}.orders")
    await ensure_topics(bench.base, dict.fromkeys([topics.users, topics.orders],
                                                       workload.partitions))  # fmt: skip
    bench.made_topics += [topics.users, topics.orders]
    events = in_version_order(
        [event for event in workload.events if not event.bad],
        key=lambda event: (event.entity, event.id),
        version=lambda event: event.version,
    )
    say(f"quix: producing {len(events):,} valid events in version order to {prefix}.*")
    await produce_backlog(bench.bootstrap, topics, events)
    engine = await prepare_baseline_database(bench, "quix")
    url = make_url(bench.base.database_url)
    log = bench.logs / "quix.log"
    group = f"{prefix}.group"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [
        str(interpreter), "-m", APP,
        "--bootstrap", bench.bootstrap,
        "--group", group,
        "--users-topic", topics.users,
        "--orders-topic", topics.orders,
        "--host", url.host or "localhost",
        "--port", str(url.port or 5432),
        "--dbname", str(engine.url.database),
        "--user", url.username or "postgres",
        "--password", url.password or "",
        "--commit-interval", str(commit_interval),
    ]  # fmt: skip
    try:
        process = _spawn(command, log)
        drain = Drain(time.monotonic())
        usage = Usage(process.pid)
        client = await admin(bench.base)
        try:
            await _watch(process, log, client, group, len(events), usage, drain, timeout_s)
            spent = usage.stop() if drain.first_message is not None else {}
        finally:
            exit_code = _stop(process)
            await client.close()
        if drain.problem is not None or drain.done is None or drain.first_message is None:
            phase.status, phase.problems = "failed", [drain.problem or "did not finish"]
            return phase
        phase.problems = await check_state(engine, workload.expected)
    finally:
        await engine.dispose()
    phase.events = len(events)
    phase.seconds = drain.done - drain.first_message
    if exit_code != 0:
        phase.problems.append(f"the application exited with {exit_code} on SIGTERM: see {log}")
    phase.status = "wrong" if phase.problems else "ok"
    if not phase.problems:
        phase.notes.append("tables' checksum equal to the expected final state (soft deletes)")
    phase.figures = {
        "commit_interval_seconds": commit_interval,
        "startup_seconds": round(drain.first_message - drain.spawned, 2),
        "events_per_s_including_startup": round(len(events) / (drain.done - drain.spawned), 1),
        "usage": spent,
        "quixstreams": venv.REQUIREMENT,
        "log": str(log),
    }
    return phase
