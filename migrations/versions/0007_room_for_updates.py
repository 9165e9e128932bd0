"""pages of users and orders keep room for the next version of their rows

`fillfactor = 85` on `users` and `orders`: an update whose new version fits on the row's
page, and changes no indexed column, is a heap-only tuple, with no new index entries
(`python -m bench.writer`: 2-5% of a batch's write, 4% of PostgreSQL's CPU). Only pages
written from now on keep the room; `VACUUM FULL` or `pg_repack` rewrites the old ones, if
ever wanted. Setting it takes a lock that blocks neither reads nor writes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("users", "orders")


def upgrade() -> None:
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = 85)")


def downgrade() -> None:
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
