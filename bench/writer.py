"""`python -m bench.writer`: the batch writer alone against PostgreSQL, per event, for
changes on the PostgreSQL side of a batch (its statements, the schema's indexes and
storage) that a whole drain, noisy by a tenth on these machines, cannot resolve.

The workload is decoded once; each round writes all of it, in arrival order and in batches
of `--batch` records, through the service's own `BatchWriter` into a database made for
the round (migrated to head; with `--variant SQL`, every other round runs that SQL after
migrating, so the two arms interleave). It counts the write's wall time, this process's
CPU and PostgreSQL's (every server process's, so the machine should be quiet).

With `--empty N`, each round writes N batches that hold no record and move every
partition's stored position by one (after 50 untimed): what a batch costs whatever it
holds (the fence, the positions, the commit), per batch instead of per event.

Invariant: a round's figures count only if its tables' checksum equals the workload's
expected state and every dead letter is stored (with `--empty`: every position is where
the last batch moved it); a variant that breaks the writer fails the run (exit 1)
instead of showing a figure. Exit 2: the run could not start (a bad option, PostgreSQL
unreachable, the variant's SQL refused), with one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from bench.cpu import TOPICS, records
from bench.service.database import create_database, drop_database
from bench.service.usage import role_cpu_seconds
from bench.workload import Workload
from sync_service.config import Settings
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.db.models import DeadLetterRow, OutboxEvent
from sync_service.errors import UserError
from sync_service.events.change import Change, DeadLetter
from sync_service.memory import tune_gc
from sync_service.ops.migrate import upgrade
from sync_service.ops.traffic import table_checksum
from sync_service.pipeline.batch import Batch, BatchBuilder, TopicPartition
from sync_service.pipeline.write import BatchWriter


def owned(partitions: int) -> list[TopicPartition]:
    """Every partition of the workload's two topics, as the writer is given them."""
    return [(TOPICS.of(entity), p) for entity in ("user", "order") for p in range(partitions)]


def empty_batches(count: int, partitions: int) -> list[Batch]:
    """`count` batches without records, each moving every partition one offset on."""
    return [Batch(next_offsets=dict.fromkeys(owned(partitions), n + 1)) for n in range(count)]


def batches(workload: Workload, size: int) -> list[Batch]:
    """The workload decoded and cut as a backlog drain cuts it."""
    builder = BatchBuilder(size, max_wait_s=float("inf"))
    cut: list[Batch] = []
    for found in records(workload):
        if isinstance(found, Change | DeadLetter):
            builder.add(found, 0.0)
        if builder.full():
            cut.append(builder.take())
    if len(builder):
        cut.append(builder.take())
    return cut


_EMPTY_WARMUP = 50
"""Empty batches written untimed first: the statements' first plans and the pool."""


@dataclass(frozen=True)
class Round:
    arm: str
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float


async def one_round(
    base: Settings, name: str, arm: str, variant: str | None, cut: Sequence[Batch],
    workload: Workload, *, empty: bool = False,
) -> Round:  # fmt: skip
    """Write every batch of `cut` into a fresh database `name`, then check it (`empty`:
    `cut` is `empty_batches`, the first `_EMPTY_WARMUP` of them untimed)."""
    url = await create_database(base.database_url, name)
    settings = base.model_copy(update={"database_url": url})
    engine = make_engine(settings)
    try:
        await upgrade(settings)
        async with engine.connect() as connection:
            if variant is not None:
                try:
                    for statement in filter(None, (s.strip() for s in variant.split(";"))):
                        await connection.execute(text(statement))
                except DBAPIError as error:
                    first = str(error.orig).strip().splitlines()[0]
                    raise UserError(f"the variant's SQL was refused: {first}") from None
                await connection.commit()
            await connection.execute(text("CHECKPOINT"))
        writer = BatchWriter(make_sessionmaker(engine), f"bench-writer-{arm}", 1_000)
        expected: dict[TopicPartition, int | None] = dict.fromkeys(owned(workload.partitions))
        await writer.positions(list(expected))  # the pool's first connection, untimed
        warmup = _EMPTY_WARMUP if empty else 0
        for batch in cut[:warmup]:
            await writer.write(batch, expected)
            expected.update(batch.next_offsets)
        server = role_cpu_seconds("postgresql")
        client, started = time.process_time(), time.perf_counter()
        for batch in cut[warmup:]:
            await writer.write(batch, expected)
            expected.update(batch.next_offsets)
        wall = time.perf_counter() - started
        spent = (time.process_time() - client, role_cpu_seconds("postgresql") - server)
        if empty:
            await _check_positions(writer, expected)
        else:
            await _check(engine, workload)
        return Round(arm, wall, *spent)
    finally:
        await engine.dispose()
        await drop_database(base.database_url, name)


class Wrong(Exception):
    """A round left something other than the workload's expected state."""


async def _check(engine: Any, workload: Workload) -> None:
    expected = workload.expected
    if await table_checksum(engine) != expected.checksum():
        raise Wrong("the tables' checksum differs from the workload's expected state")
    async with engine.connect() as connection:
        dead = await connection.scalar(select(func.count()).select_from(DeadLetterRow))
        outbox = await connection.scalar(select(func.count()).select_from(OutboxEvent))
    if dead != expected.dead_letters:
        raise Wrong(f"{dead} dead letters stored, {expected.dead_letters} expected")
    if not expected.applied_at_least <= outbox <= expected.applied_at_most:
        raise Wrong(f"{outbox} outbox rows, outside [{expected.applied_at_least}, "
                    f"{expected.applied_at_most}]")  # fmt: skip


async def _check_positions(writer: BatchWriter, expected: dict[TopicPartition, int | None]) -> None:
    stored = await writer.positions(list(expected))
    if stored != expected:
        raise Wrong("the stored positions differ from those the last batch moved them to")


def summary(rounds: Sequence[Round], events: int, unit: str = "event") -> dict[str, Any]:
    """Per arm: each figure's best round (the least disturbed), in µs per `unit`, of
    which a round wrote `events`."""
    found: dict[str, Any] = {}
    for arm in dict.fromkeys(r.arm for r in rounds):
        mine = [r for r in rounds if r.arm == arm]
        found[arm] = {
            figure: {
                "best": round(min(getattr(r, key) for r in mine) / events * 1e6, 2),
                "rounds": [round(getattr(r, key) / events * 1e6, 2) for r in mine],
            }
            for figure, key in (
                (f"write_us_per_{unit}", "wall_s"),
                (f"writer_cpu_us_per_{unit}", "client_cpu_s"),
                (f"postgresql_cpu_us_per_{unit}", "server_cpu_s"),
            )
        }
    return found


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tune_gc()
    workload = Workload.generate(0 if args.empty else args.events, seed=args.seed)
    if args.empty:
        cut = empty_batches(_EMPTY_WARMUP + args.empty, workload.partitions)
    else:
        cut = batches(workload, args.batch)
    base = Settings()
    rounds = []
    for number in range(args.rounds):
        for arm, variant in (("head", None), ("variant", args.variant)):
            if arm == "variant" and variant is None:
                continue
            name = f"sync_bench_writer_{os.getpid()}_{arm}"
            rounds.append(
                await one_round(base, name, arm, variant, cut, workload, empty=bool(args.empty))
            )
            print(f"round {number + 1} {arm}: {rounds[-1].wall_s:.2f} s", file=sys.stderr)
    if args.empty:
        return {
            "empty_batches": args.empty,
            "partitions": 2 * workload.partitions,
            "variant": args.variant,
            "per_batch": summary(rounds, args.empty, "batch"),
        }
    return {
        "events": args.events,
        "batch": args.batch,
        "batches": len(cut),
        "variant": args.variant,
        "per_event": summary(rounds, args.events),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writer", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=20_261_124)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", help="SQL run after migrating, in every other round")
    parser.add_argument(
        "--empty", type=int, default=0, metavar="N",
        help="write N batches without records (a batch's fixed cost), not the workload",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.events, args.batch, args.rounds) < 1 or args.empty < 0:
        print("bench.writer: --events, --batch and --rounds must be above 0, --empty not "
              "below", file=sys.stderr)  # fmt: skip
        return 2
    try:
        found = asyncio.run(run(args))
    except Wrong as error:
        print(f"bench.writer: {error}", file=sys.stderr)
        return 1
    except UserError as error:
        print(f"bench.writer: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
