"""Settings, read once from `SYNC_*` environment variables (and an optional `.env`).

Every knob an operator may turn lives here, with the contract's defaults.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
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
    inbound_format: Literal["native", "debezium"] = "native"
    """What the inbound topics carry: the native envelope, or Debezium's PostgreSQL
    change events through Kafka Connect's JSON converter (CONTRACT section 1b)."""
    # Kafka, outbound (CONTRACT section 4).
    out_users_topic: str = "sync.users"
    out_orders_topic: str = "sync.orders"
    # Kafka connection security, for every client (consumer, relay, admin, commands).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(default=None, description="unset: the system's CAs")
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_check_hostname: bool = True

    # PostgreSQL and its pool.
    database_url: str = "postgresql+asyncpg://postgres@localhost:5432/sync"
    pool_size: int = Field(default=5, ge=1)
    max_overflow: int = Field(default=5, ge=0)
    pool_pre_ping: bool = True
    pool_recycle: int = Field(default=1800, description="seconds; -1 never recycles")
    pool_timeout: float = Field(default=10.0, gt=0, description="seconds to wait for a connection")
    statement_timeout_ms: int = Field(default=60_000, ge=0, description="0 = no limit")
    # PostgreSQL TLS, for every connection (engine, the relay's LISTEN, Alembic, commands).
    database_sslmode: Literal["disable", "require", "verify-ca", "verify-full"] | None = Field(
        default=None, description="unset: as SYNC_DATABASE_URL says (asyncpg: prefer)"
    )
    database_sslrootcert: Path | None = Field(default=None, description="unset: system CAs")
    database_sslcert: Path | None = None
    database_sslkey: Path | None = None
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
    # pydantic-core's JSON reader stops at about 200 levels: a deeper limit could not hold.
    max_json_depth: int = Field(default=8, ge=2, le=200)
    dead_letter_value_bytes: int = Field(default=65_536, ge=0)
    dead_letter_key_bytes: int = Field(default=1_024, ge=0)

    # The dead-letter guard: a partition whose last `dlq_window` messages hold more than
    # `dlq_max_ratio` dead letters is paused until an operator resumes it (1 turns it off).
    dlq_window: int = Field(default=1_000, ge=1)
    dlq_max_ratio: float = Field(default=0.5, gt=0, le=1)
    # Also publish every new dead letter to this Kafka topic (through the outbox and the
    # relay, exactly once); set it for the consumers and the relay alike.
    dlq_topic: str | None = Field(default=None, min_length=1, max_length=249)

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

    # Operators' commands: who is recorded in `operator_actions` (default: the OS user).
    operator: str | None = Field(default=None, min_length=1, max_length=200)

    # Health and metrics.
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        BeforeValidator(lambda value: value.upper() if isinstance(value, str) else value),
    ] = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_outage_summary_s: float = Field(
        default=30.0, gt=0, description="seconds between the log's summaries of an outage"
    )

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

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Passwords masked: a URL's, and any secret setting's."""
        from sync_service.observability.redact import shown

        for name, value in super().__repr_args__():
            yield name, shown(name, value) if name is not None else value

    @field_validator(
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "database_sslmode",
        "database_sslrootcert",
        "database_sslcert",
        "database_sslkey",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`SYNC_KAFKA_SSL_CAFILE=` (as templates and env files often leave it) is unset."""
        return None if value == "" else value

    @field_validator(
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "database_sslrootcert",
        "database_sslcert",
        "database_sslkey",
    )
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        """A certificate or key file that is not there fails at start, not at connect."""
        if path is not None and not path.is_file():
            raise ValueError(f"no such file: {path}")
        return path

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        """Refuse combinations that cannot be what was meant (one line names them)."""
        protocol = self.kafka_security_protocol
        sasl = {
            "SYNC_KAFKA_SASL_MECHANISM": self.kafka_sasl_mechanism,
            "SYNC_KAFKA_SASL_USERNAME": self.kafka_sasl_username,
            "SYNC_KAFKA_SASL_PASSWORD": self.kafka_sasl_password,
        }
        tls = {
            "SYNC_KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
            "SYNC_KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
            "SYNC_KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile,
        }
        if protocol.startswith("SASL_"):
            missing = [name for name, value in sasl.items() if not value]
            if missing:
                raise ValueError(
                    f"SYNC_KAFKA_SECURITY_PROTOCOL={protocol} needs {', '.join(missing)}"
                )
        elif given := [name for name, value in sasl.items() if value]:
            raise ValueError(
                f"{', '.join(given)} set, but SYNC_KAFKA_SECURITY_PROTOCOL={protocol} "
                "does not use SASL: set it to SASL_SSL"
            )
        if not protocol.endswith("SSL") and (given := [n for n, v in tls.items() if v]):
            raise ValueError(
                f"{', '.join(given)} set, but SYNC_KAFKA_SECURITY_PROTOCOL={protocol} "
                "does not use TLS: set it to SSL or SASL_SSL"
            )
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ValueError("SYNC_KAFKA_SSL_CERTFILE and SYNC_KAFKA_SSL_KEYFILE go together")
        pg_files = {
            "SYNC_DATABASE_SSLROOTCERT": self.database_sslrootcert,
            "SYNC_DATABASE_SSLCERT": self.database_sslcert,
            "SYNC_DATABASE_SSLKEY": self.database_sslkey,
        }
        if self.database_sslmode in (None, "disable") and (
            given := [n for n, v in pg_files.items() if v]
        ):
            raise ValueError(
                f"{', '.join(given)} set, but SYNC_DATABASE_SSLMODE is "
                f"{self.database_sslmode or 'unset'}: set it to verify-full"
            )
        if self.database_sslmode == "require" and self.database_sslrootcert:
            # libpq would then verify the chain after all; say which mode does that instead
            raise ValueError(
                "SYNC_DATABASE_SSLROOTCERT set, but SYNC_DATABASE_SSLMODE=require does not "
                "verify the server: set it to verify-full"
            )
        if bool(self.database_sslcert) != bool(self.database_sslkey):
            raise ValueError("SYNC_DATABASE_SSLCERT and SYNC_DATABASE_SSLKEY go together")
        return self


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The `SYNC_*` names in `environ` that no setting reads: a misspelt one would
    otherwise be ignored without a word."""
    prefix = Settings.model_config.get("env_prefix", "")
    known = {prefix + name.upper() for name in Settings.model_fields}
    return sorted(n for n in environ if n.upper().startswith(prefix) and n.upper() not in known)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read on first use."""
    return Settings()
