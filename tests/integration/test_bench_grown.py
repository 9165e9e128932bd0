"""The grown target's history: the rows it is asked for, older ids than any workload's,
emails of the workload's kind that no workload email equals, valid foreign keys and rules,
and a check that sees a drain that touched it."""

from __future__ import annotations

import re

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.limit import asyncpg_dsn
from bench.service.grown import history, preload
from bench.workload import Workload
from sync_service.ops.traffic import table_checksum
from tests.integration.harness import rows


async def test_the_history_is_what_was_asked_and_stays_out_of_the_workload_s_way(
    database_url: str, engine: AsyncEngine
) -> None:
    workload = Workload.generate(2_000, seed=11)
    empty = await table_checksum(engine, workload.expected.id_range)

    written = await preload(database_url, users=3_000, orders=9_000)

    assert (written.users, written.orders) == (3_000, 9_000)
    assert written.table_bytes > 0
    ids = await rows(engine, "SELECT min(id), max(id) FROM users UNION ALL"
                             " SELECT min(id), max(id) FROM orders")  # fmt: skip
    assert ids == [(-3_000, -1), (-9_000, -1)]
    # Every order's user exists (loaded without the per-row check, so checked here).
    assert await rows(engine, "SELECT count(*) FROM orders o LEFT JOIN users u"
                              " ON u.id = o.user_id WHERE u.id IS NULL") == [(0,)]  # fmt: skip
    emails = {email for (email,) in await rows(engine, "SELECT email FROM users")}
    assert len(emails) == 3_000
    workload_emails = {line.split("|")[1] for line in workload.expected.users}
    assert not emails & workload_emails
    # Same names and domains as the workload's, so they interleave in the email index.
    ours = [re.fullmatch(r"([a-z.]+?)\d+h@(.+)", email) for email in emails]
    theirs = [re.fullmatch(r"([a-z.]+?)\d+@(.+)", email) for email in workload_emails]
    assert all(ours)
    assert all(theirs)
    assert {m[1] for m in ours if m} & {m[1] for m in theirs if m}
    assert {m[2] for m in ours if m} == {m[2] for m in theirs if m}
    soft = await rows(engine, "SELECT count(*) FROM users WHERE deleted_at IS NOT NULL")
    assert 0 < soft[0][0] < 3_000
    # The workload's ids see nothing of it: the drain's check is unchanged by the history.
    assert await table_checksum(engine, workload.expected.id_range) == empty


async def test_the_history_check_sees_a_changed_row(database_url: str, engine: AsyncEngine) -> None:
    written = await preload(database_url, users=100, orders=300)
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await history(connection) == (100, 300, written.version_sum)
        await connection.execute("UPDATE orders SET version = version + 1 WHERE id = -7")
        assert await history(connection) == (100, 300, written.version_sum + 1)
    finally:
        await connection.close()
