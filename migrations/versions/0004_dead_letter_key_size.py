"""dead letters keep the key's full size

A dead letter keeps only the first `SYNC_DEAD_LETTER_KEY_BYTES` of its key, as it keeps
only the first `SYNC_DEAD_LETTER_VALUE_BYTES` of its value; `key_size` says how long the
key was. Nullable, so that this is an expand step (deploy/README.md): rows stored before,
and by the previous release during a rollout, have none (their key was kept whole).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("key_size", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("dead_letters", "key_size")
