"""Every Prometheus metric the service exports, declared in one place."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# The *_created series would double the scrape for no insight.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONSUMED = Counter("sync_events_consumed_total", "Records read from Kafka.", ["topic"])
APPLIED = Counter("sync_changes_applied_total", "Changes that advanced a row.", ["entity"])
STALE = Counter(
    "sync_changes_stale_total", "Duplicate or older changes that changed nothing.", ["entity"]
)
WAITED = Counter(
    "sync_changes_waited_total",
    "Changes that had to wait (an order before its user, an email still held).",
)
DEAD_LETTERED = Counter(
    "sync_dead_letters_total", "Records kept in the dead-letter store.", ["topic", "kind"]
)
SKIPPED = Counter(
    "sync_records_skipped_total",
    "Records that hold no change by design (Debezium's tombstones), skipped.",
    ["topic", "kind"],
)
BATCH_SIZE = Histogram(
    "sync_batch_records",
    "Records per written batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000),
)
WRITE_SECONDS = Histogram(
    "sync_batch_write_seconds",
    "Time to write and commit one batch.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RETRIES = Counter(
    "sync_transient_failures_total", "Failures retried with backoff.", ["stage", "kind"]
)
LAG = Gauge("sync_consumer_lag", "End offset minus stored position.", ["topic", "partition"])
PENDING = Gauge("sync_pending_changes", "Changes waiting for what they need.")
PENDING_AGE = Gauge("sync_pending_oldest_age_seconds", "Age of the oldest waiting change.")
PAUSED = Gauge("sync_consumer_paused", "1 while fetching is paused for backpressure.")
GUARDED = Gauge(
    "sync_partition_guarded",
    "1 while the dead-letter guard holds a partition paused (until `dlq resume`).",
    ["topic", "partition"],
)
GUARD_TRIPS = Counter(
    "sync_dlq_guard_trips_total",
    "Partitions paused by the dead-letter guard (too many dead letters in its window).",
    ["topic"],
)

STALLED_ENDED = Counter(
    "sync_stalled_transactions_ended_total",
    "Transactions of stalled service processes ended by this one (stopped inside a"
    " statement, where PostgreSQL's idle timeout does not reach).",
)

OUTBOX_BACKLOG = Gauge("sync_outbox_backlog", "Outbox rows not yet published.")
OUTBOX_OLDEST_AGE = Gauge(
    "sync_outbox_oldest_age_seconds", "Age of the oldest outbox row not yet published."
)
OUTBOX_HELD = Gauge(
    "sync_outbox_held_back",
    "Outbox rows committed after the oldest open transaction began: the relay publishes"
    " them once it ends.",
)
HORIZON_AGE = Gauge(
    "sync_oldest_transaction_age_seconds",
    "Age of the server's oldest open transaction with a transaction id (the relay's horizon).",
)
PUBLISHED = Counter("sync_outbox_published_total", "Outbox rows published.", ["topic"])
PUBLISH_SECONDS = Histogram(
    "sync_relay_publish_seconds",
    "Time to publish and commit one relay chunk.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
RELAY_ACTIVE = Gauge("sync_relay_active", "1 while this process holds the relay lease.")
