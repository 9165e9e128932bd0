"""What every fault scenario shares: a generated history produced at a steady rate, a log
of every outbox row that ever committed (a trigger: the relay prunes the outbox itself),
the downstream topics read back read_committed, and the final checks.

The final checks are the same in every scenario, made once nothing waits any more: the
tables equal the generator's expected state, every stored position equals its
partition's end offset, nothing was dead-lettered, and the downstream topics hold
exactly one event per committed outbox row (so one per applied change), in version
order per aggregate.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.fleet import Sampler, Stream, wait_for
from sync_service.config import Settings
from sync_service.events.change import Entity
from sync_service.kafka import ensure_topics
from sync_service.ops.offsets import offset_reader, partition_bounds
from sync_service.ops.traffic import ExpectedState, Traffic, table_checksum, table_rows
from tests.integration.relay_helpers import (
    Downstream,
    assert_version_order,
    create_out_topics,
)

PARTITIONS = 6

_LOG = (
    "CREATE TABLE IF NOT EXISTS faults_outbox_log (event_id text NOT NULL,"
    " aggregate_type text NOT NULL, aggregate_id text NOT NULL, version bigint NOT NULL)",
    "TRUNCATE faults_outbox_log",
    "CREATE OR REPLACE FUNCTION faults_log_outbox() RETURNS trigger LANGUAGE plpgsql AS $$"
    " BEGIN INSERT INTO faults_outbox_log SELECT event_id::text, aggregate_type,"
    " aggregate_id, version FROM added; RETURN NULL; END $$",
    "DROP TRIGGER IF EXISTS faults_outbox_log ON outbox",
    "CREATE TRIGGER faults_outbox_log AFTER INSERT ON outbox REFERENCING NEW TABLE AS added"
    " FOR EACH STATEMENT EXECUTE FUNCTION faults_log_outbox()",
)
_UNLOG = (
    "DROP TRIGGER IF EXISTS faults_outbox_log ON outbox",
    "DROP FUNCTION IF EXISTS faults_log_outbox()",
    "DROP TABLE IF EXISTS faults_outbox_log",
)


async def log_outbox(engine: AsyncEngine, on: bool = True) -> None:
    """Record (or stop recording) every outbox row a committed transaction wrote."""
    async with engine.begin() as connection:
        for statement in _LOG if on else _UNLOG:
            await connection.execute(text(statement))


async def create_all_topics(settings: Settings) -> None:
    await ensure_topics(
        settings,
        {settings.users_topic: PARTITIONS, settings.orders_topic: PARTITIONS},
    )
    await create_out_topics(settings)


def stream(events: int, rate: float, seed: int) -> Stream:
    """`events` of a fresh history (ids no other test uses), `rate` per second."""
    base = random.randrange(1, 10**6) * 10**6
    return Stream(Traffic(seed=seed, id_base=base, partitions=PARTITIONS), events, rate)


async def drained(sampler: Sampler, flow: Stream) -> bool:
    return flow.done.is_set() and sampler.total() >= sum(flow.sent.values())


@dataclass
class Verdict:
    downstream: int
    applied_range: tuple[int, int]


async def assert_final(
    engine: AsyncEngine, settings: Settings, flow: Stream, downstream: Downstream
) -> Verdict:
    """The checks of every scenario (see the module's docstring)."""
    expected = flow.traffic.expected()
    partitions = sorted(flow.sent)
    # First, settle: a change still waiting when the last position was stored is settled
    # by the next sweep of its partition's owner (every `pending_retry_ms`), not at once,
    # applied (with its outbox row) if what it waited for was written meanwhile, else
    # dropped as overtaken. Read before that, the tables and the outbox log could lag.
    await wait_for(lambda: _none_waiting(engine), 30, "no change left waiting")
    async with offset_reader(settings) as reader:
        bounds = await partition_bounds(reader, partitions)
    async with engine.connect() as connection:
        stored = {
            (t, p): n
            for t, p, n in await connection.execute(
                text(
                    "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = :g"
                ),
                {"g": settings.group_id},
            )
        }
        dead = (await connection.execute(text("SELECT count(*) FROM dead_letters"))).scalar()
        logged = [
            (str(e), str(t), str(i), int(v))
            for e, t, i, v in await connection.execute(
                text(
                    "SELECT event_id, aggregate_type, aggregate_id, version FROM faults_outbox_log"
                )
            )
        ]
    assert stored == {tp: bounds[tp].end for tp in partitions}, "positions != end offsets"
    assert stored == flow.sent, "positions != records produced"
    assert dead == expected.dead_letters, f"{dead} dead letters ({expected.dead_letters} expected)"
    if await table_checksum(engine, expected.id_range) != expected.checksum():
        raise AssertionError(f"tables != expected state:\n{await _differences(engine, expected)}")

    # Applied once each: no (aggregate, version) twice in the outbox, within the bounds.
    versions = Counter((t, i, v) for _, t, i, v in logged)
    assert not [k for k, n in versions.items() if n > 1], "a change was applied twice"
    assert expected.applied_at_least <= len(logged) <= expected.applied_at_most

    # Downstream: exactly the committed outbox rows, each once, read_committed.
    await wait_for(lambda: _arrived(downstream, len(logged)), 120, "every outbox row downstream")
    published = await downstream.drain()
    seen = Counter(p.event_id for p in published)
    assert not [e for e, n in seen.items() if n > 1], "an event was published twice"
    committed = {e: (t, i, v) for e, t, i, v in logged}
    extra = [(p.topic, p.partition, p.offset, p.key, p.value["version"])
             for p in published if p.event_id not in committed]  # fmt: skip
    missing = [committed[e] for e in committed.keys() - seen.keys()]
    if extra or missing:
        raise AssertionError(
            f"downstream != committed outbox rows: {len(extra)} not committed {extra[:5]},"
            f" {len(missing)} not published {sorted(missing)[:5]}"
        )
    assert_version_order(published)
    return Verdict(len(published), (expected.applied_at_least, expected.applied_at_most))


async def _none_waiting(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        return not (await connection.execute(text("SELECT count(*) FROM pending_changes"))).scalar()


async def _arrived(downstream: Downstream, count: int) -> bool:
    return len(downstream.records) >= count


async def _differences(engine: AsyncEngine, expected: ExpectedState, at_most: int = 10) -> str:
    """The rows that differ from `expected` (expected, then stored; `-` for no row), with
    what waits and what the outbox logged for each: what a failed checksum needs to be
    explained."""
    stored = await table_rows(engine, expected.id_range)
    lines: list[str] = []
    pairs: tuple[tuple[Entity, tuple[str, ...]], ...] = (
        ("user", expected.users),
        ("order", expected.orders),
    )
    async with engine.connect() as connection:
        for entity, want in pairs:
            wanted = {row.split("|", 1)[0]: row for row in want}
            have = {row.split("|", 1)[0]: row for row in stored[entity]}
            for id_ in sorted(wanted.keys() | have.keys(), key=int):
                if wanted.get(id_) == have.get(id_):
                    continue
                if len(lines) >= at_most:
                    return "\n".join([*lines, "..."])
                waits = (
                    await connection.execute(
                        text(
                            'SELECT version, topic, partition, "offset", reason, blocked_by'
                            " FROM pending_changes WHERE entity = :e AND entity_id = :i"
                        ),
                        {"e": entity, "i": int(id_)},
                    )
                ).all()
                logged = (
                    await connection.execute(
                        text(
                            "SELECT version FROM faults_outbox_log"
                            " WHERE aggregate_type = :e AND aggregate_id = :i ORDER BY version"
                        ),
                        {"e": entity, "i": id_},
                    )
                ).scalars()
                versions = list(logged)
                lines += [
                    f"{entity} {id_}: expected {wanted.get(id_, '-')}",
                    f"{' ' * len(entity)} {id_}: stored   {have.get(id_, '-')}",
                    f"  waiting {[tuple(w) for w in waits]}, outbox versions {versions}",
                ]
    return "\n".join(lines)
