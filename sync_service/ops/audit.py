"""The operators' audit trail: every action that changed something is a row of
`operator_actions`, written in the transaction of its effect, so a row exists exactly when
the effect does. A failure after the action started is written on its own (`ok` false).

Callers: `record` inside their transaction (it returns the row's id), `amend` to update
the outcome as later chunks of the same action commit, and `record_failure` after a
rollback. `list_actions` and `render` serve `sync-service history`.
"""

from __future__ import annotations

import getpass
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from sync_service.config import Settings
from sync_service.db.models import OperatorAction
from sync_service.service import connect

Executor = AsyncConnection | AsyncSession
"""Anything with `execute` inside the caller's transaction."""


def operator_name(settings: Settings) -> str:
    """`SYNC_OPERATOR`, else the OS user (else "unknown", e.g. in a container without one)."""
    if settings.operator:
        return settings.operator
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


async def record(
    executor: Executor,
    settings: Settings,
    action: str,
    arguments: Mapping[str, Any],
    outcome: str,
    *,
    ok: bool = True,
) -> int:
    """Write one action row in `executor`'s transaction; returns its id. `arguments` must
    be JSON-able (times as ISO strings)."""
    row = await executor.execute(
        insert(OperatorAction)
        .values(
            operator=operator_name(settings),
            action=action,
            arguments=dict(arguments),
            ok=ok,
            outcome=outcome,
        )
        .returning(OperatorAction.id)
    )
    return int(row.scalar_one())


async def amend(executor: Executor, action_id: int, outcome: str, *, ok: bool = True) -> None:
    """Replace the outcome of action `action_id`, in `executor`'s transaction (a chunked
    action amends its row in each chunk's transaction, so the row says what committed)."""
    await executor.execute(
        update(OperatorAction).where(OperatorAction.id == action_id).values(outcome=outcome, ok=ok)
    )


async def record_failure(
    engine: AsyncEngine,
    settings: Settings,
    action: str,
    arguments: Mapping[str, Any],
    outcome: str,
    action_id: int | None = None,
) -> None:
    """After a rollback: say that the action failed, in a transaction of its own (amending
    `action_id` when chunks of it had committed). Best effort: the database may be what
    failed, and the caller's error is what the operator must see."""
    try:
        async with engine.begin() as connection:
            if action_id is None:
                await record(connection, settings, action, arguments, outcome, ok=False)
            else:
                await amend(connection, action_id, outcome, ok=False)
    except Exception:  # the original failure is what the caller reports
        pass


@dataclass(frozen=True, slots=True)
class ActionView:
    """One row of `operator_actions`, as `history` shows it."""

    id: int
    at: datetime
    operator: str
    action: str
    arguments: dict[str, Any]
    ok: bool
    outcome: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "operator": self.operator,
            "action": self.action,
            "arguments": self.arguments,
            "ok": self.ok,
            "outcome": self.outcome,
        }


async def list_actions(settings: Settings, *, limit: int) -> list[ActionView]:
    """The newest `limit` actions, newest first."""
    table = OperatorAction.__table__
    engine = await connect(settings)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(select(table).order_by(table.c.id.desc()).limit(limit))
            return [ActionView(**row) for row in rows.mappings()]
    finally:
        await engine.dispose()


def render(actions: list[ActionView]) -> str:
    """One line per action: when, who, what with which arguments, and how it ended."""
    if not actions:
        return "no operator actions recorded"
    lines = []
    for a in actions:
        # By name: jsonb keeps no order of its own.
        args = " ".join(
            f"{k}={_value(v)}" for k, v in sorted(a.arguments.items()) if v not in (None, [])
        )
        status = "ok" if a.ok else "FAILED"
        at = a.at.isoformat(timespec="seconds")
        lines.append(f"#{a.id}  {at}  {a.operator}  {a.action} {args}".rstrip())
        first, *more = a.outcome.splitlines() or [""]
        lines.append(f"    {status}: {first}")
        lines.extend(f"      {line}" for line in more)  # e.g. one line per partition
    return "\n".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
