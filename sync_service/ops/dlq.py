"""`sync-service dlq`: list and show the dead letters, and re-drive them through the
current decoder.

A re-drive goes through the selected letters in chunks of bounded size, oldest first;
each chunk applies the letters that are now valid and marks them in one transaction, so
a letter is either applied and marked, or neither; the others stay listed, with the
reason. Nothing here deletes a letter (`sync-service dlq purge` does, when asked).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    RowMapping,
    Select,
    Table,
    bindparam,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker

from sync_service.config import Settings
from sync_service.db.models import ConsumerOffset, DeadLetterRow
from sync_service.errors import UserError
from sync_service.events.change import Change, DeadLetter, Entity
from sync_service.ops import audit
from sync_service.pipeline.batch import Batch, TopicPartition
from sync_service.pipeline.decode import Limits, decoder_for
from sync_service.pipeline.write import BatchWriter, Fenced
from sync_service.retry import Backoff, describe, is_transient
from sync_service.service import connect

APPLIED = "applied"
_LETTERS = cast(Table, DeadLetterRow.__table__)
_ATTEMPTS = 5
_PREVIEW_CHARS = 200
REDRIVE_CHUNK = 500
REDRIVE_ACTION = "dlq redrive"
"""Letters per re-drive transaction: memory and lock time stay bounded whatever the
store holds."""
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """One stored dead letter, as an operator reads it."""

    id: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    key_size: int | None
    """None on letters stored before keys were capped: their key is whole."""
    value: bytes | None
    value_size: int
    kind: str
    reason: str
    created_at: datetime
    redriven_at: datetime | None
    redrive_result: str | None
    headers: list[list[str | None]] | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": _text(self.key, _PREVIEW_CHARS),  # whole unless it is a long one
            "key_size": self.full_key_size,
            "key_kept": len(self.key or b""),
            "value_preview": _text(self.value, _PREVIEW_CHARS),
            "value_size": self.value_size,
            "value_kept": len(self.value or b""),
            "kind": self.kind,
            "reason": self.reason,
            "created_at": self.created_at.isoformat(),
            "redriven_at": self.redriven_at.isoformat() if self.redriven_at else None,
            "redrive_result": self.redrive_result,
        }

    @property
    def full_key_size(self) -> int:
        return self.key_size if self.key_size is not None else len(self.key or b"")


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


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command works on: every condition given must hold."""

    ids: list[int] | None = None
    kind: str | None = None
    reason_contains: str | None = None
    before: datetime | None = None
    """Stored before this time."""

    def conditions(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.ids is not None:
            where.append(_LETTERS.c.id.in_(self.ids))
        if self.kind is not None:
            where.append(_LETTERS.c.kind == self.kind)
        if self.reason_contains is not None:
            where.append(_LETTERS.c.reason.contains(self.reason_contains, autoescape=True))
        if self.before is not None:
            before = self.before
            if before.tzinfo is None:  # a bare date or time is UTC
                before = before.replace(tzinfo=UTC)
            where.append(_LETTERS.c.created_at < before)
        return where

    def describe(self) -> str:
        said = []
        if self.ids is not None:
            said.append("id " + ", ".join(map(str, sorted(set(self.ids)))))
        if self.kind is not None:
            said.append(f"of kind {self.kind}")
        if self.reason_contains is not None:
            said.append(f"whose reason contains {self.reason_contains!r}")
        if self.before is not None:
            said.append(f"stored before {self.before.isoformat()}")
        return " ".join(said) or "all"


async def check_selection(connection: AsyncConnection, selection: Selection) -> None:
    """Refuse ids that name no letter and a kind that no letter has (most likely a typo)."""
    if selection.ids is not None:
        await _require_known(connection, selection.ids)
    if selection.kind is not None:
        kinds = set((await connection.execute(select(_LETTERS.c.kind).distinct())).scalars())
        if selection.kind not in kinds:
            stored = ", ".join(sorted(kinds)) or "none"
            raise UserError(f"no dead letter of kind {selection.kind!r} (kinds stored: {stored})")


async def show(settings: Settings, letter_id: int) -> DeadLetterView:
    """One dead letter, whole."""
    engine = await connect(settings)
    try:
        async with engine.connect() as connection:
            found = await _views(connection, select(_LETTERS).where(_LETTERS.c.id == letter_id))
    finally:
        await engine.dispose()
    if not found:
        raise UserError(f"no dead letter with id {letter_id}")
    return found[0]


async def redrive(
    settings: Settings,
    ids: list[int] | None,
    *,
    kind: str | None = None,
    reason_contains: str | None = None,
    chunk: int = REDRIVE_CHUNK,
) -> str:
    """Decode the selected dead letters that no re-drive applied yet (default: all) again;
    apply the valid ones and mark every one with the outcome, `chunk` letters per
    transaction, oldest first. Returns one line of counts, which is also the outcome of
    the action's row in `operator_actions` (written with the first chunk, amended with
    each next one, in that chunk's transaction)."""
    selection = Selection(ids=ids, kind=kind, reason_contains=reason_contains)
    run = _Run(settings, selection, chunk)
    # A chunk decodes its letters between two statements: a large one must not be ended
    # by the idle timeout meant for a stalled service process.
    engine = await connect(settings.model_copy(update={"idle_in_transaction_timeout_ms": 0}))
    try:
        async with engine.connect() as connection:
            await check_selection(connection, selection)

        async def failed(outcome: str) -> None:
            if run.action_id is not None:  # earlier chunks committed, and stay
                outcome = f"{run.summary()}; then {outcome}"
            await audit.record_failure(
                engine, settings, REDRIVE_ACTION, run.arguments, outcome, run.action_id
            )

        while await _with_retries(settings, engine, run.next_chunk, failed) is not None:
            pass
    finally:
        await engine.dispose()
    return run.summary()


async def _with_retries(
    settings: Settings,
    engine: AsyncEngine,
    attempt_on: Callable[[AsyncConnection], Awaitable[T]],
    failed: Callable[[str], Awaitable[None]],
) -> T:
    """`attempt_on` a connection of its own; retried when it rolled back for a reason
    that is not its own (a consumer wrote the same partitions or rows meanwhile, or the
    database blinked): the attempt rolled back whole, so another one starts clean. When
    it fails for good, `failed` hears how, before the error is raised."""
    backoff = Backoff(settings.retry_initial_ms / 1000, settings.retry_max_ms / 1000)
    attempt = 1
    while True:
        try:
            async with engine.connect() as connection:
                return await attempt_on(connection)
        except Exception as error:
            again = isinstance(error, Fenced) or is_transient(error)
            if not again or attempt == _ATTEMPTS:
                outcome = f"rolled back after {attempt} attempts: {describe(error)}"
                await failed(outcome)
                if not again:
                    raise
                raise UserError(f"re-drive {outcome}") from None
        attempt += 1
        await asyncio.sleep(backoff.next_delay())


@dataclass(slots=True)
class _Outcomes:
    applied: list[int]
    changes: list[Change]
    rejected: dict[int, str]
    """Dead-letter id -> why it still cannot be applied."""
    waiting: int = 0
    last_id: int = 0


@dataclass(slots=True)
class _Totals:
    letters: int = 0
    applied: int = 0
    rejected: int = 0
    waiting: int = 0
    chunks: int = 0

    def plus(self, done: _Outcomes) -> _Totals:
        return _Totals(
            letters=self.letters + len(done.applied) + len(done.rejected),
            applied=self.applied + len(done.applied),
            rejected=self.rejected + len(done.rejected),
            waiting=self.waiting + done.waiting,
            chunks=self.chunks + 1,
        )

    def summary(self, *, skipped: int) -> str:
        if not self.letters:
            line = "no dead letters to re-drive"
        else:
            line = f"re-drove {self.letters}: {self.applied} applied"
            if self.waiting:
                line += f" ({self.waiting} of them waiting for a user or an email)"
            line += f", {self.rejected} still not applicable"
            if self.rejected:
                line += " (see `sync-service dlq list`)"
        if self.chunks > 1:
            line += f"; in {self.chunks} transactions"
        if skipped:
            line += f"; {skipped} skipped (applied by an earlier re-drive)"
        return line


class _Run:
    """One re-drive, chunk by chunk: where it is, what committed, and its audit row."""

    def __init__(self, settings: Settings, selection: Selection, chunk: int) -> None:
        self.settings = settings
        self.selection = selection
        self.chunk = chunk
        self.after = 0
        self.totals = _Totals()
        self.action_id: int | None = None
        self.arguments = {
            "ids": selection.ids,
            "kind": selection.kind,
            "reason_contains": selection.reason_contains,
        }

    def summary(self, totals: _Totals | None = None) -> str:
        totals = totals or self.totals
        ids = self.selection.ids
        skipped = len(set(ids)) - totals.letters if ids is not None else 0
        return totals.summary(skipped=skipped)

    async def next_chunk(self, connection: AsyncConnection) -> _Outcomes | None:
        """One attempt at the next `chunk` letters, in one transaction on `connection`
        (its audit row too); None when none is left. Advances only once committed."""
        async with connection.begin():
            query = (
                select(_LETTERS)
                .where(_LETTERS.c.redriven_at.is_(None), _LETTERS.c.id > self.after)
                .where(*self.selection.conditions())
                .order_by(_LETTERS.c.id)
                .limit(self.chunk)
            )
            # Locked, so two re-drives at once take turns; the second skips what is applied.
            letters = await _views(connection, query.with_for_update())
            if not letters:
                return None
            outcomes = _decode_again(self.settings, letters)
            outcomes.last_id = letters[-1].id
            if outcomes.changes:
                outcomes.waiting = await _apply(connection, self.settings, outcomes.changes)
            if outcomes.applied:
                await connection.execute(
                    update(_LETTERS)
                    .where(_LETTERS.c.id.in_(outcomes.applied))
                    .values(redriven_at=func.now(), redrive_result=APPLIED)
                )
            if outcomes.rejected:
                # `redriven_at` stays empty: the letter still waits for an operator (and
                # the figures count it), now with the reason of its last re-drive.
                await connection.execute(
                    update(_LETTERS)
                    .where(_LETTERS.c.id == bindparam("letter_id"))
                    .values(redrive_result=bindparam("result")),
                    [{"letter_id": i, "result": r} for i, r in outcomes.rejected.items()],
                )
            totals = self.totals.plus(outcomes)
            action_id = self.action_id
            if action_id is None:
                action_id = await audit.record(
                    connection, self.settings, REDRIVE_ACTION, self.arguments, self.summary(totals)
                )
            else:
                await audit.amend(connection, action_id, self.summary(totals))
        self.totals, self.action_id, self.after = totals, action_id, outcomes.last_id
        return outcomes


async def _require_known(connection: AsyncConnection, ids: list[int]) -> None:
    found = await connection.execute(select(_LETTERS.c.id).where(_LETTERS.c.id.in_(ids)))
    known = set(found.scalars())
    unknown = sorted(set(ids) - known)
    if unknown:
        raise UserError(f"no dead letter with id {', '.join(map(str, unknown))}")


def _decode_again(settings: Settings, letters: list[DeadLetterView]) -> _Outcomes:
    entities: dict[str, Entity] = {settings.users_topic: "user", settings.orders_topic: "order"}
    limits = Limits.of(settings)
    decode = decoder_for(settings.inbound_format)
    outcomes = _Outcomes([], [], {})
    for letter in letters:
        kept = len(letter.value or b"")
        key_kept = len(letter.key or b"")
        entity = entities.get(letter.topic)
        if letter.value_size > kept:
            outcomes.rejected[letter.id] = (
                f"cannot re-drive: only {kept} of its {letter.value_size} bytes were kept "
                "(SYNC_DEAD_LETTER_VALUE_BYTES)"
            )
        elif letter.full_key_size > key_kept:
            outcomes.rejected[letter.id] = (
                f"cannot re-drive: only {key_kept} of its key's {letter.full_key_size} bytes "
                "were kept (SYNC_DEAD_LETTER_KEY_BYTES)"
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
            elif isinstance(decoded, DeadLetter):
                outcomes.rejected[letter.id] = f"still invalid: {decoded.reason}"
            else:
                outcomes.rejected[letter.id] = f"holds no change ({decoded.kind}): purge it"
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
