"""`sync-service replay`: re-read a range of an inbound topic's partitions.

An open range (`--from-*` only) moves the stored position back (or anywhere Kafka still
holds); a running consumer is fenced on its next write and seeks there. A bounded range
`[start, end)` also stores, beside the position, where the partition was: the batch that
reaches `end` leaves out its records from there on and stores that old position instead,
in its own transaction (pipeline/write.py), so nothing after the range is read twice or
skipped. Replaying is safe because applying is idempotent: an event whose version is not
above the stored one changes nothing and writes no outbox row.

`--dry-run` reads the range with a consumer of its own and plans it against the stored
rows without writing anything (ops/dryrun.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import func, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from sync_service.config import Settings
from sync_service.db.models import ConsumerOffset
from sync_service.errors import UserError
from sync_service.ops import audit
from sync_service.ops.offsets import Bounds, offset_reader, partition_bounds, partition_counts
from sync_service.retry import describe
from sync_service.service import connect

NOTE = "a running consumer picks this up on its next batch"


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """What the operator asked for; `partitions` None means all of the topic's."""

    topic: str
    partitions: Sequence[int] | None
    from_offset: int | None = None
    from_time: datetime | None = None
    to_offset: int | None = None
    to_time: datetime | None = None

    @property
    def bounded(self) -> bool:
        return self.to_offset is not None or self.to_time is not None

    def arguments(self) -> dict[str, Any]:
        """For the audit row: as given, times in RFC 3339."""
        return {
            "topic": self.topic,
            "partitions": "all" if self.partitions is None else list(self.partitions),
            "from_offset": self.from_offset,
            "from_time": _iso(self.from_time),
            "to_offset": self.to_offset,
            "to_time": _iso(self.to_time),
        }


@dataclass(frozen=True, slots=True)
class Range:
    """One partition's share of a replay: `[start, end)`, `end` None for an open range."""

    partition: int
    start: int
    end: int | None
    bounds: Bounds

    @property
    def stop(self) -> int:
        """Where reading the range stops (the end of the log for an open range)."""
        return self.bounds.end if self.end is None else self.end


def check(request: ReplayRequest, settings: Settings) -> None:
    """Refuse, with one line, what no partition's offsets need to be looked up for."""
    inbound = (settings.users_topic, settings.orders_topic)
    if request.topic not in inbound:
        raise UserError(
            f"unknown topic {request.topic!r}: replay works on {inbound[0]} and {inbound[1]}"
        )
    if (request.from_offset is None) == (request.from_time is None):
        raise UserError("give exactly one of --from-offset and --from-time")
    if request.to_offset is not None and request.to_time is not None:
        raise UserError("give at most one of --to-offset and --to-time")
    if request.partitions is not None and not request.partitions:
        raise UserError("give --partition P (one or more) or --all-partitions")
    if request.from_time and request.to_time and _utc(request.to_time) < _utc(request.from_time):
        raise UserError("--to-time is before --from-time: nothing would be replayed")


async def resolve(settings: Settings, request: ReplayRequest) -> list[Range]:
    """The offsets of the replay on each partition, or a `UserError` naming the first
    partition, offset or time that cannot be replayed (Kafka no longer holds it, or the
    end comes before the start)."""
    check(request, settings)
    topic = request.topic
    async with offset_reader(settings) as reader:
        count = (await partition_counts(settings, [topic]))[topic]
        partitions = sorted(set(request.partitions or range(count)))
        for partition in partitions:
            if not 0 <= partition < count:
                raise UserError(
                    f"{topic} has partitions 0 to {count - 1}; there is no partition {partition}"
                )
        bounds = await partition_bounds(reader, [(topic, p) for p in partitions])
        ranges = []
        for partition in partitions:
            edges = bounds[(topic, partition)]
            start = await _offset(reader, topic, partition, request.from_offset,
                                  request.from_time, edges)  # fmt: skip
            end = await _offset(reader, topic, partition, request.to_offset,
                                request.to_time, edges)  # fmt: skip
            for offset in (start, end):
                if offset is not None and not edges.beginning <= offset <= edges.end:
                    gone = offset < edges.beginning
                    raise UserError(
                        f"offset {offset} "
                        + ("is no longer held by Kafka (retention) in" if gone else "is outside")
                        + f" {topic}[{partition}]: it can be replayed from offset "
                        f"{edges.beginning} to {edges.end} (the end)"
                    )
            assert start is not None
            if end is not None and end < start:
                raise UserError(
                    f"{topic}[{partition}]: the end (offset {end}) is before the start "
                    f"(offset {start})"
                )
            ranges.append(Range(partition, start, end, edges))
    return ranges


async def replay_range(settings: Settings, request: ReplayRequest) -> list[dict[str, Any]]:
    """Move the positions (and, for a bounded replay, store where each partition goes
    back to) in one transaction that also records the action; returns, per partition,
    what was done (`line` says it in words)."""
    check(request, settings)
    engine = await connect(settings)
    try:
        ranges = await resolve(settings, request)
        try:
            async with engine.begin() as connection:
                done = await _store(connection, settings, request.topic, ranges)
                outcome = "\n".join(d["line"] for d in done)
                await audit.record(connection, settings, "replay", request.arguments(), outcome)
        except Exception as error:  # rolled back whole: no position moved
            failed = f"rolled back, no position moved: {describe(error)}"
            await audit.record_failure(engine, settings, "replay", request.arguments(), failed)
            raise
        return done
    finally:
        await engine.dispose()


async def replay(
    settings: Settings,
    topic: str,
    partition: int,
    from_offset: int | None,
    from_time: datetime | None,
) -> str:
    """Rewind one partition to `from_offset`, or to the first record at or after
    `from_time` (the end offset when none is). Returns one line."""
    request = ReplayRequest(topic, [partition], from_offset, from_time)
    return str((await replay_range(settings, request))[0]["line"])


async def _store(
    connection: AsyncConnection, settings: Settings, topic: str, ranges: list[Range]
) -> list[dict[str, Any]]:
    """Per partition, under the positions' row locks (taken in the writer's order, so a
    consumer's batch and this take turns: whichever commits second sees the other)."""
    group = settings.group_id
    locked = await connection.execute(
        select(ConsumerOffset.partition, ConsumerOffset.next_offset, ConsumerOffset.resume_offset)
        .where(ConsumerOffset.group_id == group)
        .where(
            tuple_(ConsumerOffset.topic, ConsumerOffset.partition).in_(
                [(topic, r.partition) for r in ranges]
            )
        )
        .order_by(ConsumerOffset.topic, ConsumerOffset.partition)
        .with_for_update()
    )
    stored = {p: (n, resume) for p, n, resume in locked}
    done = []
    for r in ranges:
        position, resume = stored.get(r.partition, (None, None))
        was = resume if resume is not None else position  # where the consumer goes on from
        plan = _decide(r, was)
        where = f"{topic}[{r.partition}]"
        if plan is None:
            line = f"{where}: nothing to replay ({_why_not(r, was)}); position stays {_s(position)}"
            done.append(_done(r, position, position, None, None, line))
            continue
        target, replay_end, resume_offset = plan
        stmt = insert(ConsumerOffset).values(
            group_id=group, topic=topic, partition=r.partition, next_offset=target,
            replay_end=replay_end, resume_offset=resume_offset,
        )  # fmt: skip
        await connection.execute(
            stmt.on_conflict_do_update(
                index_elements=["group_id", "topic", "partition"],
                set_={
                    "next_offset": stmt.excluded.next_offset,
                    "replay_end": stmt.excluded.replay_end,
                    "resume_offset": stmt.excluded.resume_offset,
                    "updated_at": func.now(),
                },
            )
        )
        line = f"{where}: position {_s(position)} -> {target}"
        if replay_end is not None:
            line += f", replaying to {replay_end}, then back to {resume_offset}"
        done.append(_done(r, position, target, replay_end, resume_offset, f"{line}; {NOTE}"))
    return done


def _decide(r: Range, was: int | None) -> tuple[int, int | None, int | None] | None:
    """(new position, replay end, resume offset), or None when there is nothing to do.
    An open range simply moves the position. A bounded one needs a plan only when it ends
    before where the consumer was; one that reaches that far is an open rewind."""
    if r.end is None:
        return r.start, None, None
    if was is None or r.start >= was or r.start == r.end:
        return None
    if r.end >= was:
        return r.start, None, None
    return r.start, r.end, was


def _why_not(r: Range, was: int | None) -> str:
    if r.start == r.end:
        return f"the range from offset {r.start} is empty"
    if was is None:
        return "the consumer has not read it yet"
    return f"the consumer has not read offset {r.start} yet (it is at {was})"


def _done(
    r: Range, before: int | None, after: int | None, end: int | None, resume: int | None,
    line: str,
) -> dict[str, Any]:  # fmt: skip
    return {
        "partition": r.partition,
        "position_before": before,
        "position_after": after,
        "replay_end": end,
        "resume_offset": resume,
        "line": line,
    }


async def _offset(
    reader: AIOKafkaConsumer,
    topic: str,
    partition: int,
    offset: int | None,
    when: datetime | None,
    bounds: Bounds,
) -> int | None:
    if when is None:
        return offset
    return await _offset_at(reader, topic, partition, when, bounds)


async def _offset_at(
    reader: AIOKafkaConsumer, topic: str, partition: int, when: datetime, bounds: Bounds
) -> int:
    """The offset of the first record at or after `when` (a time without a zone is UTC)."""
    # Kafka reads negative timestamps as "earliest"/"latest" markers: clamp to the epoch.
    millis = max(0, int(_utc(when).timestamp() * 1000))
    tp = TopicPartition(topic, partition)
    found = (await reader.offsets_for_times({tp: millis})).get(tp)
    return bounds.end if found is None else int(found.offset)


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _iso(when: datetime | None) -> str | None:
    return None if when is None else _utc(when).isoformat()


def _s(position: int | None) -> str:
    return "none" if position is None else str(position)
