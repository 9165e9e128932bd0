"""dead letters keep their Kafka headers; the dead-letter guard's state per partition

`dead_letters.headers` is nullable (the rows of earlier releases have none, and the
previous release, which does not write it, keeps working): a JSON array of
`[name, base64 value or null]` pairs, in the record's order (a name may repeat).

`partition_guards` holds, per consumer group and partition, whether the dead-letter guard
paused it, why, and from which offset its window counts again after a resume. Only
partitions that tripped the guard, or were resumed, have a row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("headers", postgresql.JSONB(), nullable=True))
    op.create_table(
        "partition_guards",
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("window_from", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("dead", sa.Integer(), nullable=True),
        sa.Column("window", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("resumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("group_id", "topic", "partition", name="pk_partition_guards"),
    )


def downgrade() -> None:
    op.drop_table("partition_guards")
    op.drop_column("dead_letters", "headers")
