"""operator actions, bounded replays, snapshot rows in the outbox

- `operator_actions`: every operator action that changed something (replay, republish,
  dead-letter redrive and purge), written in the transaction of its effect.
- `consumer_offsets.replay_end` / `resume_offset`: a bounded replay under way; the batch
  that reaches `replay_end` stores `resume_offset` instead.
- The outbox's one-row-per-version rule becomes a partial unique index that leaves out
  snapshot rows (`sync-service republish`), which repeat the version of the row's last
  change. The outbox holds only rows not yet published, so building it is short.

All three are additive for the previous release: it never reads the new columns (a
bounded replay needs this release's consumers) and never writes snapshot rows.

Revision ID: 0003_operator_actions
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_operator_actions"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNIQUE = "uq_outbox_aggregate_type_aggregate_id_version"
_KEY = ["aggregate_type", "aggregate_id", "version"]


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
    op.drop_constraint(_UNIQUE, "outbox", type_="unique")
    op.create_index(
        _UNIQUE,
        "outbox",
        _KEY,
        unique=True,
        postgresql_where=sa.text("event_type NOT IN ('user.snapshot', 'order.snapshot')"),
    )


def downgrade() -> None:
    # Snapshot rows not yet published would break the old rule: they go first.
    op.execute("DELETE FROM outbox WHERE event_type IN ('user.snapshot', 'order.snapshot')")
    op.drop_index(_UNIQUE, table_name="outbox")
    op.create_unique_constraint(_UNIQUE, "outbox", _KEY)
    op.drop_constraint(
        op.f("ck_consumer_offsets_replay_plan_whole"), "consumer_offsets", type_="check"
    )
    op.drop_column("consumer_offsets", "resume_offset")
    op.drop_column("consumer_offsets", "replay_end")
    op.drop_table("operator_actions")
