"""join the two branches that start at 0002: operator actions, and dead-letter headers
with the guard's state (nothing to change: they touch different tables and columns)

Revision ID: 0004_dlq_join
Revises: 0003_dlq, 0003_operator_actions
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0004_dlq_join"
down_revision: str | Sequence[str] | None = ("0003_dlq", "0003_operator_actions")
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
