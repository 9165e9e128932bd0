"""The target schema. Alembic's migrations build it; a test checks that they agree.

`users` and `orders` hold the latest applied version of each entity (a delete leaves the
row with `deleted_at` set, so that an older event can never bring it back). The other
tables hold what the pipeline must not lose: positions, waiting changes, dead letters,
and the outbox.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSON, JSONB, UUID, ExcludeConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ORDER_STATUSES = ("pending", "paid", "shipped", "cancelled", "refunded")
ROOM_FOR_UPDATES = {"postgresql_with": {"fillfactor": 85}}
"""Pages of `users` and `orders` are filled to 85%: a row's next version then mostly fits
on its page, as a heap-only tuple (no new index entries) where no indexed column changed."""


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """A user at its highest applied version; a tombstone has only id, version, deleted_at."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(255))
    active: Mapped[bool | None]
    country: Mapped[str | None] = mapped_column(String(2))
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # No two live users share an email. Deferred to commit, so that one batch can
        # move an email from one user to another in any row order (even a swap).
        ExcludeConstraint(
            (text("email"), "="),
            name="ex_users_live_email",
            using="btree",
            where=text("deleted_at IS NULL"),
            deferrable=True,
            initially="DEFERRED",
        ),
        CheckConstraint(
            "deleted_at IS NOT NULL OR (email IS NOT NULL AND name IS NOT NULL"
            " AND active IS NOT NULL AND created_at IS NOT NULL AND updated_at IS NOT NULL)",
            name="live_row_complete",
        ),
        CheckConstraint("version >= 0", name="version_not_negative"),
        ROOM_FOR_UPDATES,
    )


class Order(Base):
    """An order at its highest applied version; `total` is exact money."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("users.id"), index=True)
    total: Mapped[Decimal | None] = mapped_column(Numeric(14, 2))
    currency: Mapped[str | None] = mapped_column(String(3))
    status: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(
            "deleted_at IS NOT NULL OR (user_id IS NOT NULL AND total IS NOT NULL"
            " AND currency IS NOT NULL AND status IS NOT NULL AND created_at IS NOT NULL"
            " AND updated_at IS NOT NULL)",
            name="live_row_complete",
        ),
        CheckConstraint("total >= 0", name="total_not_negative"),
        CheckConstraint(
            f"status IN ({', '.join(repr(s) for s in ORDER_STATUSES)})", name="status_known"
        ),
        CheckConstraint("version >= 0", name="version_not_negative"),
        ROOM_FOR_UPDATES,
    )


class ConsumerOffset(Base):
    """The next offset to read per group and partition, written with the rows it covers."""

    __tablename__ = "consumer_offsets"

    group_id: Mapped[str] = mapped_column(Text, primary_key=True)
    topic: Mapped[str] = mapped_column(Text, primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    replay_end: Mapped[int | None] = mapped_column(BigInteger)
    """A bounded replay under way: the first offset after its range. The batch that reaches
    it stores `resume_offset` instead, in the same transaction, and the consumer seeks."""
    resume_offset: Mapped[int | None] = mapped_column(BigInteger)
    """Where the consumer was before the bounded replay, so where it goes on from."""

    __table_args__ = (
        CheckConstraint("(replay_end IS NULL) = (resume_offset IS NULL)", name="replay_plan_whole"),
    )


class PendingChange(Base):
    """A valid change that waits for what it needs (its user, a free email)."""

    __tablename__ = "pending_changes"

    entity: Mapped[str] = mapped_column(String(16), primary_key=True)
    entity_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    topic: Mapped[str] = mapped_column(Text)
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    envelope: Mapped[dict[str, Any]] = mapped_column(JSONB)
    reason: Mapped[str] = mapped_column(Text)
    blocked_by: Mapped[int] = mapped_column(BigInteger, index=True)
    """The user whose arrival or change may let this change apply."""
    first_seen_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    __table_args__ = (Index(None, "topic", "partition"),)


class DeadLetterRow(Base):
    """A record that could not be applied, kept with everything needed to re-drive it."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    topic: Mapped[str] = mapped_column(Text)
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_size: Mapped[int | None] = mapped_column(Integer)
    """The key's full size (`key` holds its first bytes); none on rows stored whole."""
    value: Mapped[bytes | None] = mapped_column(LargeBinary)
    value_size: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    redriven_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    redrive_result: Mapped[str | None] = mapped_column(Text)
    headers: Mapped[list[list[str | None]] | None] = mapped_column(JSONB)
    """The record's Kafka headers as `[name, base64 value or null]` pairs, in order."""

    __table_args__ = (UniqueConstraint("topic", "partition", "offset"),)


class PartitionGuard(Base):
    """The dead-letter guard's verdict on one partition of one consumer group.

    While `paused_at` is set, no consumer of the group reads the partition. The guard's
    window counts only dead letters at offsets from `window_from` on: a resume moves it to
    the partition's position, so the letters that tripped the guard do not trip it again.
    """

    __tablename__ = "partition_guards"

    group_id: Mapped[str] = mapped_column(Text, primary_key=True)
    topic: Mapped[str] = mapped_column(Text, primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    paused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    window_from: Mapped[int] = mapped_column(BigInteger, server_default="0")
    dead: Mapped[int | None]
    window: Mapped[int | None]
    kind: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    resumed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class OutboxEvent(Base):
    """One downstream event per applied change (Debezium's outbox vocabulary).

    `txid` is the writing transaction's id: a row is safe to relay once `txid` is below
    the current snapshot's xmin, because then no older transaction can still commit. The
    key is `(txid, id)`, the relay's position: the order it reads and prunes in.
    """

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, Identity())
    txid: Mapped[int] = mapped_column(
        BigInteger, server_default=text("(pg_current_xact_id()::text)::bigint")
    )
    aggregate_type: Mapped[str] = mapped_column(String(16))
    aggregate_id: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(32))
    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    version: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    """`json`, not `jsonb`: kept as written, since the relay publishes it as it is."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    # One row per applied change needs no index: the writer's compare-and-set
    # (`pipeline.write`) applies a change at most once. Snapshots (`sync-service
    # republish`) repeat a version on purpose.
    __table_args__ = (PrimaryKeyConstraint("txid", "id"),)


class OperatorAction(Base):
    """One operator action that changed something, written in the transaction of its effect
    (a failure after the start is written on its own, with `ok` false)."""

    __tablename__ = "operator_actions"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    operator: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String(32))
    arguments: Mapped[dict[str, Any]] = mapped_column(JSONB)
    ok: Mapped[bool]
    outcome: Mapped[str] = mapped_column(Text)
