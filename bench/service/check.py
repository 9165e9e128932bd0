"""The checks of a drain: the tables against the generator's expected state, the dead
letters, nothing waiting, and the downstream topics read back (read_committed).

Invariant: a drain is right only if every check here passes; each failed one is a line
that says what differs.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.service.watch import end_offsets, progress
from sync_service.ops.traffic import ExpectedState, table_checksum


@dataclass(frozen=True)
class Downstream:
    messages: int
    distinct: int
    """Distinct `event_id` headers: fewer than `messages` means something was doubled."""


async def count_downstream(bootstrap: str, topics: list[str]) -> Downstream:
    """Read every committed message of `topics` (read_committed) and count them."""
    ends = await end_offsets(bootstrap, topics)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 << 20,
    )
    messages = 0
    ids: set[bytes] = set()
    await consumer.start()
    try:
        left = {TopicPartition(t, p): end for (t, p), end in ends.items() if end > 0}
        if left:
            consumer.assign(list(left))
            await consumer.seek_to_beginning(*left)
        while left:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=50_000)
            for records in fetched.values():
                messages += len(records)
                ids.update(dict(r.headers).get("event_id", b"") for r in records)
            for tp in list(left):
                if await consumer.position(tp) >= left[tp]:
                    del left[tp]
                    consumer.pause(tp)
    finally:
        await consumer.stop()
    return Downstream(messages, len(ids))


async def check_target(
    engine: AsyncEngine,
    expected: ExpectedState,
    downstream: Downstream,
    applied: float | None,
    *,
    ids: tuple[int, int] | None = None,
) -> list[str]:
    """How the target and the downstream topics differ from what the history demands;
    with `ids`, only the rows with ids in that range are compared (a target may hold
    other rows of its own)."""
    final = await progress(engine, group_id="")  # only its dead letters and waiting count
    checksum = await table_checksum(engine, ids)
    problems = []
    if checksum != expected.checksum():
        problems.append("the tables' checksum differs from the expected final state")
    if final.dead_letters != expected.dead_letters:
        problems.append(f"{final.dead_letters} dead letters, expected {expected.dead_letters}")
    if final.waiting:
        problems.append("changes still wait")
    low, high = expected.applied_at_least, expected.applied_at_most
    if not low <= downstream.messages <= high:
        problems.append(f"{downstream.messages:,} downstream events, expected {low:,}..{high:,}")
    if downstream.distinct != downstream.messages:
        problems.append(f"{downstream.messages - downstream.distinct:,} downstream events doubled")
    if applied is not None and int(applied) != downstream.messages:
        problems.append(f"{int(applied):,} changes applied but {downstream.messages:,} published")
    return problems
