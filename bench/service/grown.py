"""The grown target: the same backlog drained into a target that already holds many times
the rows the workload leaves, as a long-lived target does.

The history is written by PostgreSQL itself (`generate_series`, one INSERT ... SELECT per
table), so that ten million rows take minutes, not hours. What makes its index probes
like a real target's:

- its ids lie below every id of the workload (negative here, since the workload's start
  at 1): the history is older, so the workload's new rows go to the right edge of the id
  indexes, as new rows do, and its lookups and foreign-key checks descend a tree that many
  times larger;
- its emails are the workload's kind (`<first>.<last><n>h@<domain>`, never equal to one
  of the workload's, which have no `h`), so the workload's emails land among them all
  over the live-email index: every email check probes a page of a large index;
- its orders belong to its users, spread over them; some rows of each are soft-deleted;
- its outbox rows were published and pruned long ago: the outbox is empty;
- it is vacuumed and analysed, and checkpointed, as the empty target is before its drain.

Invariant: the drain is checked on the workload's ids only (the history is no part of the
expected state), and the history must come out of it unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import asyncpg

from bench.limit import asyncpg_dsn
from bench.progress import say
from bench.report import Phase
from bench.service.names import Bench, Run
from bench.service.phase import drain
from bench.workload import Workload
from sync_service.db.models import ORDER_STATUSES
from sync_service.ops import traffic

# The workload's own names, domains, countries and currencies, so that the history's
# emails spread over the same key space as the workload's.
_FIRST: Final = [slug for _, slug in traffic._FIRST]
_FIRST_NAMES: Final = [name for name, _ in traffic._FIRST]
_LAST: Final = [slug for _, slug in traffic._LAST]
_LAST_NAMES: Final = [name for name, _ in traffic._LAST]
_COUNTRIES: Final = [country for country in traffic._COUNTRIES if country is not None]

# g runs 1..n; id = g - n - 1 runs -n..-1, ascending, so the indexes fill as a sequence does.
_USERS: Final = """
INSERT INTO users (id, email, name, active, country, created_at, updated_at, version, deleted_at)
SELECT g - $1 - 1,
       ($2::text[])[f] || '.' || ($3::text[])[l] || g || 'h@'
         || ($4::text[])[1 + g % cardinality($4::text[])],
       ($6::text[])[f] || ' ' || ($7::text[])[l],
       g % 10 <> 0,
       CASE WHEN g % 13 = 0 THEN NULL ELSE ($5::text[])[1 + g % cardinality($5::text[])] END,
       at, at + (g % 997) * interval '1 minute',
       1 + g % 7,
       CASE WHEN g % 40 = 0 THEN at + interval '30 days' END
FROM generate_series(1::bigint, $1) g,
     LATERAL (SELECT 1 + g % cardinality($2::text[]) AS f,
                     1 + (g / cardinality($2::text[])) % cardinality($3::text[]) AS l,
                     timestamptz '2024-01-01 00:00:00+00' + g * interval '10 seconds' AS at) x
"""
_ORDERS: Final = """
INSERT INTO orders (id, user_id, total, currency, status, created_at, updated_at, version,
                    deleted_at)
SELECT g - $1 - 1,
       -1 - (g * 2654435761) % $2,
       ((g * 7919) % 10000000) / 100.0,
       ($3::text[])[1 + g % cardinality($3::text[])],
       ($4::text[])[1 + g % cardinality($4::text[])],
       at, at + (g % 4999) * interval '1 minute',
       1 + g % 5,
       CASE WHEN g % 60 = 0 THEN at + interval '60 days' END
FROM generate_series(1::bigint, $1) g,
     LATERAL (SELECT timestamptz '2024-01-01 00:00:00+00' + g * interval '3 seconds' AS at) x
"""
_HISTORY: Final = """
SELECT (SELECT count(*) FROM users WHERE id < 0), (SELECT count(*) FROM orders WHERE id < 0),
       (SELECT coalesce(sum(version), 0) FROM users WHERE id < 0)
         + (SELECT coalesce(sum(version), 0) FROM orders WHERE id < 0)
"""


@dataclass(frozen=True)
class History:
    """What a preload wrote: rows per table, the version sum (to see that a drain left it
    alone), the seconds it took and the tables' size on disk with their indexes."""

    users: int
    orders: int
    version_sum: int
    seconds: float
    table_bytes: int


async def preload(database_url: str, *, users: int, orders: int) -> History:
    """Write the history into the (empty) `users` and `orders`, then vacuum, analyse and
    checkpoint. Its orders' users exist, so skipping the foreign key's per-row check while
    loading (`session_replication_role = replica`) loses nothing."""
    if users < 1 and orders > 0:
        raise ValueError("orders need users")
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        started = time.perf_counter()
        async with connection.transaction():
            await connection.execute("SET LOCAL session_replication_role = replica")
            await connection.execute(_USERS, users, _FIRST, _LAST, list(traffic._DOMAINS),
                                     _COUNTRIES, _FIRST_NAMES, _LAST_NAMES)  # fmt: skip
            await connection.execute(_ORDERS, orders, max(users, 1), list(traffic._CURRENCIES),
                                     list(ORDER_STATUSES))  # fmt: skip
        await connection.execute("VACUUM (ANALYZE) users, orders")
        await connection.execute("CHECKPOINT")
        seconds = time.perf_counter() - started
        size = await connection.fetchval(
            "SELECT pg_total_relation_size('users') + pg_total_relation_size('orders')"
        )
        written = await history(connection)
    finally:
        await connection.close()
    return History(written[0], written[1], written[2], seconds, int(size))


async def history(connection: asyncpg.Connection) -> tuple[int, int, int]:
    """(users, orders, version sum) of the rows below the workload's ids."""
    row = await connection.fetchrow(_HISTORY)
    return int(row[0]), int(row[1]), int(row[2])


async def run_grown(bench: Bench, workload: Workload, backlog: Run, *, factor: float) -> Phase:
    """The backlog of `backlog` drained again, by a group of its own, into a target that
    already holds `factor` times the users and orders the workload leaves."""
    expected = workload.expected
    users, orders = round(factor * len(expected.users)), round(factor * len(expected.orders))
    await bench.database.reset()
    say(f"grown: writing a history of {users:,} users and {orders:,} orders")
    try:
        written = await preload(bench.database.url, users=users, orders=orders)
        say(f"grown: written in {written.seconds:.0f} s ({written.table_bytes / 1e9:.2f} GB)")
        run = bench.again(backlog, "grown")
        await bench.create_topics(run, workload.partitions)
        phase = await drain(bench, workload, run, name="grown", ids=expected.id_range)
        connection = await asyncpg.connect(asyncpg_dsn(bench.database.url))
        try:
            after = await history(connection)
        finally:
            await connection.close()
    finally:
        await bench.database.reset()  # gigabytes the later phases need not carry
    if phase.status == "ok" and after != (written.users, written.orders, written.version_sum):
        phase.status = "wrong"
        phase.problems.append(f"the history changed: {after} after, {written} before")
    phase.figures["history"] = {
        "factor": factor,
        "users": written.users,
        "orders": written.orders,
        "rows": written.users + written.orders,
        "rows_over_workload_rows": round(
            (written.users + written.orders) / max(1, len(expected.users) + len(expected.orders)),
            2,
        ),
        "preload_seconds": round(written.seconds, 1),
        "table_bytes": written.table_bytes,
    }
    return phase
