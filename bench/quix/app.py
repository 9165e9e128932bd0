"""The Quix Streams peer: our native envelopes from two topics into `users` and `orders` by
Quix Streams' own PostgreSQL sink, upserting on the primary key.

It runs in a virtualenv of its own (`bench.quix.venv`), as `python -m bench.quix.app` from
the repository, with only the standard library, quixstreams, psycopg2 and `bench.quix.rows`:
nothing of the service is imported here.

What a team would write with this sink, at its best settings:

- `upsert_on_primary_key=True` on `id`, `schema_auto_update=False` (the tables exist, with
  our columns and types, so no DDL or catalogue query per batch) and
  `include_metadata=False` (no `__key`/`timestamp` columns);
- the sink writes at each checkpoint (`--commit-interval`, 5 s by default, as Quix's);
- an upsert is the event's row and its version; a delete is a soft delete, as our service
  does it: the row keeps its columns and gets `version` and `deleted_at`.

Two ways the sink works decide the shape of the rows it is given. It leaves out a field
whose value is None, and it takes a batch's columns from the batch's first row; so a NULL
is sent as an explicit SQL NULL (`SqlNull`), and deletes (three columns) go through a sink
of their own, flushed after the upserts' (sinks flush in the order they were attached), so
that within one checkpoint an entity's upsert is written before its delete.

Invariant: given each entity's events in version order (the sink has no version guard), it
leaves exactly the rows our service leaves.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from psycopg2.extensions import AsIs, register_adapter  # type: ignore[import-untyped]
from quixstreams import Application  # type: ignore[import-not-found]
from quixstreams.sinks.community.postgresql import (  # type: ignore[import-not-found]
    PostgreSQLSink,
)

from bench.quix.rows import SqlNull, delete_row, upsert_row

register_adapter(SqlNull, lambda _: AsIs("NULL"))


class FirstMessage:
    """Prints `FIRST_MESSAGE <time.monotonic()>` once, when the first message is processed:
    the benchmark's window opens there (the clock is the machine's, shared by processes)."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, topic: str, partition: int, offset: int) -> None:
        if not self.seen:
            self.seen = True
            print(f"FIRST_MESSAGE {time.monotonic()!r}", file=sys.stdout, flush=True)


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add("--bootstrap", required=True)
    add("--group", required=True)
    add("--users-topic", required=True)
    add("--orders-topic", required=True)
    add("--host", default="localhost")
    add("--port", type=int, default=5432)
    add("--dbname", required=True)
    add("--user", default="postgres")
    add("--password", default="")
    add("--commit-interval", type=float, default=5.0, help="seconds between checkpoints")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = arguments(argv)
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        commit_interval=args.commit_interval,
        loglevel="WARNING",
        auto_create_topics=False,
        use_changelog_topics=False,
        on_message_processed=FirstMessage(),
    )
    connection = {"host": args.host, "port": args.port, "dbname": args.dbname,
                  "user": args.user, "password": args.password}  # fmt: skip
    for table, name in (("users", args.users_topic), ("orders", args.orders_topic)):
        stream = app.dataframe(app.topic(name, value_deserializer="json"))
        options = {"table_name": table, "primary_key_columns": "id",
                   "upsert_on_primary_key": True, "schema_auto_update": False,
                   "include_metadata": False}  # fmt: skip
        upserts = PostgreSQLSink(**connection, **options)
        deletes = PostgreSQLSink(**connection, **options)
        stream.filter(lambda event: event["op"] == "upsert").apply(upsert_row).sink(upserts)
        stream.filter(lambda event: event["op"] == "delete").apply(delete_row).sink(deletes)
    logging.getLogger("quixstreams").setLevel(logging.WARNING)
    app.run()


if __name__ == "__main__":
    main()
