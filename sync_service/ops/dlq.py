"""`sync-service dlq`: list the dead letters, and re-drive them through the current decoder.

A re-drive applies the letters that are now valid and marks them in one transaction, so
a letter is either applied and marked, or neither; the others stay listed, with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, cast

from sqlalchemy import RowMapping, Select, Table, bindparam, func, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker

from sync_service.config import Settings
from sync_service.db.models import ConsumerOffset, DeadLetterRow
from sync_service.errors import UserError
from sync_service.events.change import Change, Entity
from sync_service.pipeline.batch import Batch, TopicPartition
from sync_service.pipeline.decode import Limits, decode
from sync_service.pipeline.write import BatchWriter, Fenced
from sync_service.retry import Backoff, describe, is_transient
from sync_service.service import connect

APPLIED = "applied"
_LETTERS = cast(Table, DeadLetterRow.__table__)
_ATTEMPTS = 5
_PREVIEW_CHARS = 200


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """One stored dead letter, as an operator reads it."""

    id: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    value_size: int
    kind: str
    reason: str
    created_at: datetime
    redriven_at: datetime | None
    redrive_result: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": _text(self.key),
            "value_preview": _text(self.value, _PREVIEW_CHARS),
            "value_size": self.value_size,
            "value_kept": len(self.value or b""),
            "kind": self.kind,
            "reason": self.reason,
            "created_at": self.created_at.isoformat(),
            "redriven_at": self.redriven_at.isoformat() if self.redriven_at else None,
            "redrive_result": self.redrive_result,
        }


async def list_dead_letters(
    settings: Settings, *, limit: int, include_redriven: bool
) -> list[DeadLetterView]:
    """The newest `limit` dead letters; those applied by a re-drive only when asked."""
    query = select(_LETTERS).order_by(_LETTERS.c.id.desc()).limit(limit)
    if not include_redriven:
        query = query.where(_LETTERS.c.redriven_at.is_(None))
    engine = await connect(settings)
    try:
        async with engine.connect() as connection:
            return await _views(connection, query)
    finally:
        await engine.dispose()


async def _views(connection: AsyncConnection, query: Select[Any]) -> list[DeadLetterView]:
    rows = (await connection.execute(query)).mappings().all()
    return [_view(row) for row in rows]


def _view(row: RowMapping) -> DeadLetterView:
    return DeadLetterView(**{f.name: row[f.name] for f in fields(DeadLetterView)})


def render(letters: Sequence[DeadLetterView]) -> str:
    """One line per letter (where it came from, its key, why), and the last re-drive."""
    if not letters:
        return "no dead letters"
    lines = []
    for letter in letters:
        where = f"{letter.topic}[{letter.partition}]@{letter.offset}"
        created = letter.created_at.isoformat(timespec="seconds")
        lines.append(
            f"#{letter.id}  {where}  key={_one_line(_text(letter.key, 40))}  {letter.kind}  "
            f"{created}: {_one_line(letter.reason)}"
        )
        if letter.redrive_result is not None:
            lines.append(f"    last re-drive: {_one_line(letter.redrive_result)}")
    return "\n".join(lines)


async def redrive(settings: Settings, ids: list[int] | None) -> str:
    """Decode the dead letters `ids` (default: all not yet applied) again; apply the valid
    ones and mark every one with the outcome. Returns one line of counts."""
    # Its one transaction decodes every letter between two statements: a long list must
    # not be ended by the idle timeout meant for a stalled service process.
    engine = await connect(settings.model_copy(update={"idle_in_transaction_timeout_ms": 0}))
    backoff = Backoff(settings.retry_initial_ms / 1000, settings.retry_max_ms / 1000)
    attempt = 1
    try:
        while True:
            try:
                async with engine.connect() as connection:
                    return await _redrive(connection, settings, ids)
            except Exception as error:
                # A consumer wrote the same partitions or rows meanwhile (or the database
                # blinked): the attempt rolled back whole, so another one starts clean.
                if not (isinstance(error, Fenced) or is_transient(error)):
                    raise
                if attempt == _ATTEMPTS:
                    raise UserError(
                        f"re-drive rolled back after {attempt} attempts: {describe(error)}"
                    ) from None
            attempt += 1
            await asyncio.sleep(backoff.next_delay())
    finally:
        await engine.dispose()


@dataclass(slots=True)
class _Outcomes:
    applied: list[int]
    changes: list[Change]
    rejected: dict[int, str]
    """Dead-letter id -> why it still cannot be applied."""


async def _redrive(connection: AsyncConnection, settings: Settings, ids: list[int] | None) -> str:
    """One attempt, in one transaction on `connection`."""
    async with connection.begin():
        query = select(_LETTERS).where(_LETTERS.c.redriven_at.is_(None))
        if ids is not None:
            await _require_known(connection, ids)
            query = query.where(_LETTERS.c.id.in_(ids))
        # Locked, so two re-drives at once take turns and the second skips what is applied.
        letters = await _views(connection, query.order_by(_LETTERS.c.id).with_for_update())
        outcomes = _decode_again(settings, letters)
        waiting = 0
        if outcomes.changes:
            waiting = await _apply(connection, settings, outcomes.changes)
        if outcomes.applied:
            await connection.execute(
                update(_LETTERS)
                .where(_LETTERS.c.id.in_(outcomes.applied))
                .values(redriven_at=func.now(), redrive_result=APPLIED)
            )
        if outcomes.rejected:
            # `redriven_at` stays empty: the letter still waits for an operator (and the
            # figures count it), now with the reason of its last re-drive.
            await connection.execute(
                update(_LETTERS)
                .where(_LETTERS.c.id == bindparam("letter_id"))
                .values(redrive_result=bindparam("result")),
                [{"letter_id": i, "result": r} for i, r in outcomes.rejected.items()],
            )
    skipped = len(set(ids)) - len(letters) if ids is not None else 0
    return _summary(outcomes, waiting, skipped=skipped)


async def _require_known(connection: AsyncConnection, ids: list[int]) -> None:
    found = await connection.execute(select(_LETTERS.c.id).where(_LETTERS.c.id.in_(ids)))
    known = set(found.scalars())
    unknown = sorted(set(ids) - known)
    if unknown:
        raise UserError(f"no dead letter with id {', '.join(map(str, unknown))}")


def _decode_again(settings: Settings, letters: list[DeadLetterView]) -> _Outcomes:
    entities: dict[str, Entity] = {settings.users_topic: "user", settings.orders_topic: "order"}
    limits = Limits(
        settings.max_message_bytes, settings.max_json_depth, settings.dead_letter_value_bytes
    )
    outcomes = _Outcomes([], [], {})
    for letter in letters:
        kept = len(letter.value or b"")
        entity = entities.get(letter.topic)
        if letter.value_size > kept:
            outcomes.rejected[letter.id] = (
                f"cannot re-drive: only {kept} of its {letter.value_size} bytes were kept "
                "(SYNC_DEAD_LETTER_VALUE_BYTES)"
            )
        elif entity is None:
            outcomes.rejected[letter.id] = (
                f"cannot re-drive: {letter.topic} is no longer an inbound topic "
                "(SYNC_USERS_TOPIC, SYNC_ORDERS_TOPIC)"
            )
        else:
            decoded = decode(
                entity=entity,
                topic=letter.topic,
                partition=letter.partition,
                offset=letter.offset,
                key=letter.key,
                value=letter.value,
                limits=limits,
            )
            if isinstance(decoded, Change):
                outcomes.applied.append(letter.id)
                outcomes.changes.append(decoded)
            else:
                outcomes.rejected[letter.id] = f"still invalid: {decoded.reason}"
    return outcomes


async def _apply(connection: AsyncConnection, settings: Settings, changes: list[Change]) -> int:
    """Write `changes` as one batch inside `connection`'s transaction; returns how many of
    them wait for what they need.

    The batch claims the letters' partitions at their stored positions (it moves none), so
    that the writer also loads the changes waiting on those partitions: a re-driven change
    then queues behind a waiting older version of its entity instead of overtaking it.
    Those positions are locked first, so the writer's fencing finds them unchanged, and
    the consumers of those partitions wait for this transaction rather than race it.
    """
    partitions = sorted({(c.source.topic, c.source.partition) for c in changes})
    expected: dict[TopicPartition, int | None] = dict.fromkeys(partitions)
    stored = await connection.execute(
        select(ConsumerOffset.topic, ConsumerOffset.partition, ConsumerOffset.next_offset)
        .where(ConsumerOffset.group_id == settings.group_id)
        .where(tuple_(ConsumerOffset.topic, ConsumerOffset.partition).in_(partitions))
        .order_by(ConsumerOffset.topic, ConsumerOffset.partition)  # the writer's lock order
        .with_for_update()
    )
    for topic, partition, next_offset in stored:
        expected[(topic, partition)] = next_offset
    # The writer's session joins this connection's transaction: its commit does not end it.
    sessions = async_sessionmaker(
        bind=connection,
        expire_on_commit=False,
        autoflush=False,
        join_transaction_mode="rollback_only",
    )
    writer = BatchWriter(sessions, settings.group_id, settings.pending_load_limit)
    result = await writer.write(Batch(changes=changes), expected)
    return result.waiting


def _summary(outcomes: _Outcomes, waiting: int, *, skipped: int) -> str:
    applied, rejected = len(outcomes.applied), len(outcomes.rejected)
    if not applied and not rejected:
        line = "no dead letters to re-drive"
    else:
        line = f"re-drove {applied + rejected}: {applied} applied"
        if waiting:
            line += f" ({waiting} of them waiting for a user or an email)"
        line += f", {rejected} still not applicable"
        if rejected:
            line += " (see `sync-service dlq list`)"
    if skipped:
        line += f"; {skipped} skipped (applied by an earlier re-drive)"
    return line


def _text(value: bytes | None, most: int | None = None) -> str | None:
    if value is None:
        return None
    text = value.decode("utf-8", "backslashreplace")
    return text if most is None or len(text) <= most else text[: most - 1] + "…"


def _one_line(text: str | None) -> str:
    """A key or reason as one line of the listing (a key may hold any bytes)."""
    if text is None:
        return "-"
    return text.replace("\n", "\\n").replace("\r", "\\r")
