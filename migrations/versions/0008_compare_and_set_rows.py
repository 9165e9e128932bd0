"""the outbox's one-row-per-applied-change index goes: the writer's compare-and-set keeps it

The consumer now writes a stored row only where its version is still the one the batch
read, and a new row only where its key is still free; any row left unwritten retries the
batch. A change is therefore applied, and its outbox row written, at most once, whichever
writers race on an aggregate, and `uq_outbox_applied_change` can no longer fail. It cost
an index entry per outbox row (`python -m bench.writer`: a tenth or more of PostgreSQL's
CPU in a batch's write).

The previous release lives with it while both run: its upsert still writes only higher
versions. What the index alone stopped, a second outbox row when one aggregate arrives on
two partitions at once, is then possible until its consumers are gone; upstreams that key
by aggregate id, as the contract asks, never do that.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNIQUE = "uq_outbox_applied_change"
_KEY = ["aggregate_type", "aggregate_id", "version"]
_NOT_SNAPSHOT = "event_type NOT IN ('user.snapshot', 'order.snapshot')"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(_UNIQUE, table_name="outbox", postgresql_concurrently=True, if_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(_UNIQUE, table_name="outbox", postgresql_concurrently=True, if_exists=True)
        op.create_index(
            _UNIQUE,
            "outbox",
            _KEY,
            unique=True,
            postgresql_where=sa.text(_NOT_SNAPSHOT),
            postgresql_concurrently=True,
        )
