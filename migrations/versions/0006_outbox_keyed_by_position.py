"""the outbox is keyed by its relay position, (txid, id)

The relay reads and prunes the outbox in `(txid, id)` order, so that index was always
there beside the primary key on `id`, and every outbox row paid for both. The primary key
becomes `(txid, id)` and the separate index goes: one index entry less per applied
change (`python -m bench.writer`: 5-7% of a batch's write, 7-8% of PostgreSQL's CPU). A
query by `id` alone now reads the whole outbox: query by the key.

The unique index is built concurrently first; swapping the constraint onto it then takes
only a brief lock. The previous release lives with it: it writes rows as before, and its
relay's prune (by `id`) still finds them, by a scan of the outbox, which the relay keeps
short.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = "pk_outbox"
_NEW_KEY = "uq_outbox_txid_id"
_OLD_INDEX = "ix_outbox_txid_id"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        # A concurrent build that failed (say, on the lock timeout) left an invalid index.
        op.drop_index(_NEW_KEY, table_name="outbox", postgresql_concurrently=True, if_exists=True)
        op.create_index(
            _NEW_KEY, "outbox", ["txid", "id"], unique=True, postgresql_concurrently=True
        )
    # The index becomes the key and takes its name.
    op.execute(
        f"ALTER TABLE outbox DROP CONSTRAINT {_KEY},"
        f" ADD CONSTRAINT {_KEY} PRIMARY KEY USING INDEX {_NEW_KEY}"
    )
    op.drop_index(_OLD_INDEX, table_name="outbox")


def downgrade() -> None:
    op.create_index(_OLD_INDEX, "outbox", ["txid", "id"])
    op.drop_constraint(_KEY, "outbox", type_="primary")
    op.create_primary_key(_KEY, "outbox", ["id"])
