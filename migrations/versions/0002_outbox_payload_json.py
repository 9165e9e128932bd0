"""outbox payload as json

The relay publishes the payload exactly as written, so PostgreSQL need not parse it into
jsonb and render it back: `json` keeps the text as written (still checked to be JSON),
so every outbox row costs the server less to insert and to read.

A retype, which deploy/README.md otherwise rules out, is safe here: the outbox holds only
rows not yet published (so the rewrite under its lock is short), and the previous
release keeps working against the new column (jsonb to json is an assignment cast).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column(
        "outbox",
        "payload",
        type_=postgresql.JSON(),
        existing_type=postgresql.JSONB(),
        postgresql_using="payload::json",
    )


def downgrade() -> None:
    op.alter_column(
        "outbox",
        "payload",
        type_=postgresql.JSONB(),
        existing_type=postgresql.JSON(),
        postgresql_using="payload::jsonb",
    )
