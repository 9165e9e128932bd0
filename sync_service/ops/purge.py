"""`sync-service dlq purge`: delete dead letters an operator has decided to drop.

Only what the operator selected and was shown is deleted: the count is taken first, with
the newest id it covers, and the delete never goes past that id, so a letter stored
while the operator was deciding is kept. Deleting goes in chunks of bounded size, each
its own transaction. Nothing else in the service deletes a dead letter.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Table, delete, func, select

from sync_service.config import Settings
from sync_service.db.models import DeadLetterRow
from sync_service.errors import UserError
from sync_service.ops import audit
from sync_service.ops.dlq import Selection, check_selection
from sync_service.retry import describe
from sync_service.service import connect

_LETTERS: Table = DeadLetterRow.__table__  # type: ignore[assignment]
PURGE_CHUNK = 5_000
PURGE_ACTION = "dlq purge"


@dataclass(frozen=True, slots=True)
class Preview:
    """What a purge would delete: `count` letters, none newer than `up_to_id`."""

    count: int
    up_to_id: int
    not_redriven: int
    """Of them, letters that no re-drive applied (their message is applied nowhere)."""


def require_selection(selection: Selection) -> None:
    if selection.ids is None and selection.kind is None and selection.before is None:
        raise UserError("say which dead letters to purge: IDs, --before TS or --kind K")
    if selection.ids is not None and (selection.kind or selection.before):
        raise UserError("give dead-letter IDs or --before/--kind, not both")


async def preview(settings: Settings, selection: Selection) -> Preview:
    """Count what `selection` holds now (refusing unknown ids and kinds)."""
    require_selection(selection)
    engine = await connect(settings)
    try:
        async with engine.connect() as connection:
            await check_selection(connection, selection)
            count, up_to, waiting = (
                await connection.execute(
                    select(
                        func.count(),
                        func.coalesce(func.max(_LETTERS.c.id), 0),
                        func.count().filter(_LETTERS.c.redriven_at.is_(None)),
                    ).where(*selection.conditions())
                )
            ).one()
    finally:
        await engine.dispose()
    return Preview(int(count), int(up_to), int(waiting))


async def purge(
    settings: Settings, selection: Selection, shown: Preview, *, chunk: int = PURGE_CHUNK
) -> str:
    """Delete the letters of `selection` up to `shown.up_to_id`. Returns one line."""
    require_selection(selection)
    engine = await connect(settings)
    deleted = transactions = 0
    action_id: int | None = None
    arguments = {
        "ids": selection.ids,
        "kind": selection.kind,
        "before": selection.before.isoformat() if selection.before else None,
        "up_to_id": shown.up_to_id,
    }
    try:
        while True:
            async with engine.begin() as connection:
                doomed = (
                    select(_LETTERS.c.id)
                    .where(_LETTERS.c.id <= shown.up_to_id, *selection.conditions())
                    .order_by(_LETTERS.c.id)
                    .limit(chunk)
                    .with_for_update()  # a re-drive under way finishes first
                )
                gone = await connection.execute(
                    delete(_LETTERS).where(_LETTERS.c.id.in_(doomed.scalar_subquery()))
                )
                count = gone.rowcount
                if not count:
                    break
                line = _summary(selection, deleted + count, transactions + 1)
                # The action's row commits with its first chunk and says, after each
                # chunk, what has been deleted for good.
                if action_id is None:
                    action_id = await audit.record(
                        connection, settings, PURGE_ACTION, arguments, line
                    )
                else:
                    await audit.amend(connection, action_id, line)
            deleted += count
            transactions += 1
    except Exception as error:
        done = _summary(selection, deleted, transactions) + "; then " if deleted else ""
        await audit.record_failure(
            engine, settings, PURGE_ACTION, arguments, f"{done}failed: {describe(error)}", action_id
        )
        raise
    finally:
        await engine.dispose()
    return _summary(selection, deleted, transactions)


def _summary(selection: Selection, deleted: int, transactions: int) -> str:
    line = f"purged {deleted} dead letter{'s' if deleted != 1 else ''} ({selection.describe()})"
    if transactions > 1:
        line += f" in {transactions} transactions"
    return line
