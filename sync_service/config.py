"""Settings, read once from `SYNC_*` environment variables (and an optional `.env`).

Every knob an operator may turn lives here, with the contract's defaults.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """The service's configuration; field `x` is read from `SYNC_X`."""

    model_config = SettingsConfigDict(env_prefix="SYNC_", env_file=".env", extra="ignore")

    # Kafka, inbound (CONTRACT section 1).
    kafka_bootstrap: str = "localhost:9092"
    group_id: str = "sync-service"
    # Static group membership (KIP-345): a replica that comes back under the same id
    # within the session timeout gets its partitions back without a rebalance. Empty:
    # a dynamic member.
    instance_id: str = Field(default="", max_length=200)
    session_timeout_ms: int = Field(
        default=0, ge=0, le=1_800_000, description="0: 45 s with an instance id, else 10 s"
    )
    users_topic: str = "cdc.users"
    orders_topic: str = "cdc.orders"
    # Kafka, outbound (CONTRACT section 4).
    out_users_topic: str = "sync.users"
    out_orders_topic: str = "sync.orders"

    # PostgreSQL and its pool.
    database_url: str = "postgresql+asyncpg://postgres@localhost:5432/sync"
    pool_size: int = Field(default=5, ge=1)
    max_overflow: int = Field(default=5, ge=0)
    pool_pre_ping: bool = True
    pool_recycle: int = Field(default=1800, description="seconds; -1 never recycles")
    pool_timeout: float = Field(default=10.0, gt=0, description="seconds to wait for a connection")
    statement_timeout_ms: int = Field(default=60_000, ge=0, description="0 = no limit")
    # A stalled process (SIGSTOP, a VM pause) must not hold its locks, or the outbox's
    # xmin, for longer than this: the server ends its open transaction (and connection).
    idle_in_transaction_timeout_ms: int = Field(default=5_000, ge=0, description="0 = no limit")
    # A lock wait past this fails the statement (retried with backoff, its cause logged).
    lock_timeout_ms: int = Field(default=3_000, ge=0, description="0 = no limit")

    # Batching and backpressure.
    batch_max_events: int = Field(default=5_000, ge=1)
    batch_max_wait_ms: int = Field(default=25, ge=1)
    poll_max_records: int = Field(default=5_000, ge=1)

    # Input limits: larger or deeper messages are dead-lettered before parsing.
    max_message_bytes: int = Field(default=1_048_576, ge=1)
    max_json_depth: int = Field(default=8, ge=2)
    dead_letter_value_bytes: int = Field(default=65_536, ge=0)

    # Waiting changes (an order before its user, an email not yet free).
    pending_retry_ms: int = Field(default=1_000, ge=10)
    pending_load_limit: int = Field(default=10_000, ge=1)

    # Retries of failures that are not the message's fault.
    retry_initial_ms: int = Field(default=100, ge=1)
    retry_max_ms: int = Field(default=10_000, ge=1)

    # Relay.
    relay_chunk: int = Field(default=2_000, ge=1)
    relay_poll_ms: int = Field(default=500, ge=10)
    relay_transactional_id: str = "sync-service-relay"
    relay_position_topic: str = "sync.relay-position"
    relay_prune_every_s: float = Field(default=5.0, gt=0)

    # Health and metrics.
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_level: str = "INFO"

    @field_validator("session_timeout_ms")
    @classmethod
    def _within_the_brokers_bounds(cls, value: int) -> int:
        if 0 < value < 6_000:
            raise ValueError("must be 0 (automatic) or at least 6000, the broker's minimum")
        return value

    @property
    def group_session_timeout_ms(self) -> int:
        """The consumer's session timeout: long enough for a static member to restart."""
        if self.session_timeout_ms:
            return self.session_timeout_ms
        return 45_000 if self.instance_id else 10_000


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read on first use."""
    return Settings()
