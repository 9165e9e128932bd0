"""operator actions, bounded replays, snapshot rows in the outbox

- `operator_actions`: every operator action that changed something (replay, republish,
  dead-letter redrive and purge), written in the transaction of its effect.
- `consumer_offsets.replay_end` / `resume_offset`: a bounded replay under way; the batch
  that reaches `replay_end` stores `resume_offset` instead.
- The outbox's one-row-per-version rule becomes a partial unique index that leaves out
  snapshot rows (`sync-service republish`), which repeat the version of the row's last
  change: the index is built concurrently first, then the old constraint is dropped.

The previous release lives with all of it: it never reads the new columns (a bounded
replay needs this release's consumers), never writes snapshot rows, and both unique rules
hold for what it writes. The CHECK constraint is validated at once, not in a later
migration: `consumer_offsets` holds one row per partition, its new columns are empty, and
adding them takes the same brief lock.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_UNIQUE = "uq_outbox_aggregate_type_aggregate_id_version"
_UNIQUE = "uq_outbox_applied_change"
_KEY = ["aggregate_type", "aggregate_id", "version"]
_NOT_SNAPSHOT = "event_type NOT IN ('user.snapshot', 'order.snapshot')"


def upgrade() -> None:
    op.create_table(
        "operator_actions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("operator", sa.Text(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("arguments", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operator_actions")),
    )
    op.add_column("consumer_offsets", sa.Column("replay_end", sa.BigInteger(), nullable=True))
    op.add_column("consumer_offsets", sa.Column("resume_offset", sa.BigInteger(), nullable=True))
    op.create_check_constraint(
        op.f("ck_consumer_offsets_replay_plan_whole"),
        "consumer_offsets",
        "(replay_end IS NULL) = (resume_offset IS NULL)",
    )
    with op.get_context().autocommit_block():
        # A concurrent build that failed (say, on the lock timeout) left an invalid index.
        op.drop_index(_UNIQUE, table_name="outbox", postgresql_concurrently=True, if_exists=True)
        op.create_index(
            _UNIQUE,
            "outbox",
            _KEY,
            unique=True,
            postgresql_where=sa.text(_NOT_SNAPSHOT),
            postgresql_concurrently=True,
        )
    op.drop_constraint(_OLD_UNIQUE, "outbox", type_="unique")


def downgrade() -> None:
    # Snapshot rows not yet published would break the old rule: they go first.
    op.execute("DELETE FROM outbox WHERE event_type IN ('user.snapshot', 'order.snapshot')")
    op.create_unique_constraint(_OLD_UNIQUE, "outbox", _KEY)
    op.drop_index(_UNIQUE, table_name="outbox")
    op.drop_constraint(
        op.f("ck_consumer_offsets_replay_plan_whole"), "consumer_offsets", type_="check"
    )
    op.drop_column("consumer_offsets", "resume_offset")
    op.drop_column("consumer_offsets", "replay_end")
    op.drop_table("operator_actions")
