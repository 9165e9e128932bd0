"""`python -m bench`: sync_service beside its baselines, its peer and the machine's limit, on
the same events, Kafka, PostgreSQL and machine, in one run; one table, one JSON file.

Exit status: 0 when every checked run was right (whether or not the targets were met),
1 when one was wrong or failed, 2 when the run could not start (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from aiokafka.errors import KafkaError
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from bench import report
from bench.baselines import prepare_baseline_database, run_bulk, run_limit, run_naive, run_peer
from bench.latency import run_latency
from bench.progress import say
from bench.quix.phase import run_quix
from bench.report import PHASES, Phase
from bench.service.formats import run_format
from bench.service.grown import run_grown
from bench.service.names import Bench, Run
from bench.service.phase import load_backlog, run_sync_service
from bench.workload import PARTITIONS, Workload
from sync_service.config import Settings
from sync_service.errors import UserError
from sync_service.retry import describe

SEED = 20_261_124


def _skips(value: str) -> set[str]:
    names = {name.strip() for name in value.split(",") if name.strip()}
    unknown = names - set(PHASES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}"
        )
    return names


def _count(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return number


def _amount(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return number


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, like every other failure (argparse would print the usage first)."""
        self.exit(2, f"bench: {message} (see python -m bench --help)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m bench", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--events", type=_count, default=1_000_000, help="size of the workload")
    add("--seed", type=int, default=SEED)
    add("--skip", type=_skips, default=set(), help=f"comma-separated, of: {', '.join(PHASES)}")
    add("--latency-rate", type=_amount, default=5_000.0, help="events/s offered")
    add("--latency-seconds", type=_amount, default=60.0)
    add(
        "--grown-factor",
        type=_amount,
        default=10.0,
        help="the grown target's history, in multiples of the rows the workload leaves",
    )
    add("--naive-events", type=_count, default=20_000, help="the naive sample's size")
    add("--naive-seconds", type=_amount, default=20.0, help="... or its duration")
    add("--bulk-batch", type=_count, default=5_000)
    # The sink at its best in a probe here: the reduction buffer (one write per key and
    # batch) with the UNNEST insert, 5,000 records a batch.
    add("--peer-batch-size", type=_count, default=5_000)
    add(
        "--peer-variant",
        default="unnest",
        help="bench.peer's sink variant (plain, reduced, unnest)",
    )
    add("--peer-warmup-events", type=_count, default=20_000)
    add("--peer-timeout", type=_amount, default=1_200.0, help="seconds (both peers)")
    # Its sink writes at each checkpoint. Quix's default of 5 s halved the rate of a 100k
    # drain here against 1 s (the sink's write stalls processing, and the drain ends only
    # at a checkpoint).
    add("--quix-commit-interval", type=_amount, default=1.0, help="seconds between checkpoints")
    add(
        "--profile",
        action="store_true",
        help="run sync_service under pyinstrument (its report goes next to its log)",
    )
    add("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, command: str) -> int:
    # SIGTERM ends the run like Ctrl-C: the service is stopped and what the run made is
    # removed (the default action would leave both behind).
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    started = datetime.now(UTC)
    clock = time.monotonic()
    base = Settings()
    token = secrets.token_hex(3)
    logs = Path(".services") / "bench" / f"{started.strftime('%Y%m%dT%H%M%S')}-{token}"
    bench = await Bench.start(base, logs, token)
    phases: dict[str, Phase] = {}
    try:
        postgres, postgres_settings = await bench.database.server()
        say(f"bench: generating {args.events:,} events (seed {args.seed})")
        workload = await asyncio.to_thread(
            Workload.generate, args.events, seed=args.seed, partitions=PARTITIONS
        )
        wanted = [p for p in PHASES if p not in args.skip]
        backlog, produce_s = (
            await load_backlog(bench, workload)
            if {"sync_service", "grown", "naive", "bulk", "limit"} & set(wanted)
            else (None, 0.0)
        )
        for name in wanted:
            say(f"bench: {name}")
            began = time.monotonic()
            phases[name] = await _phase(name, args, bench, workload, backlog)
            phases[name].phase_seconds = round(time.monotonic() - began, 1)
            say(f"bench: {name}: {_short(phases[name])}")
    finally:
        await bench.clean_up()
    for name in args.skip:
        phases[name] = Phase(name, status="skipped")
    summary = {**workload.summary(), "produce_seconds": round(produce_s, 2)}
    record = report.results(
        started=started,
        command=command,
        machine_info=report.machine(),
        version_info=report.versions(postgres, postgres_settings),
        workload=summary,
        phases={name: phases[name] for name in PHASES if name in phases},
    )
    record["seconds"] = round(time.monotonic() - clock, 1)
    record["logs"] = str(logs)
    path = report.write(record, args.results, started)
    report.print_table(record, Console(width=140))
    say(f"bench: {record['seconds']:.0f} s in all; results in {path}")
    return 0 if record["ok"] else 1


async def _phase(
    name: str, args: argparse.Namespace, bench: Bench, workload: Workload, backlog: Run | None
) -> Phase:
    """Run one phase; a failure of its own (not of the whole bench) is recorded in it."""
    try:
        return await _run_phase(name, args, bench, workload, backlog)
    except (RuntimeError, OSError, SQLAlchemyError, KafkaError) as error:
        bench.logs.mkdir(parents=True, exist_ok=True)
        with (bench.logs / f"{name}.error.txt").open("w") as out:
            traceback.print_exception(error, file=out)
        return Phase(name, status="failed", problems=[describe(error)])


async def _run_phase(
    name: str, args: argparse.Namespace, bench: Bench, workload: Workload, backlog: Run | None
) -> Phase:
    if name == "peer":
        return await run_peer(
            bench,
            workload,
            batch_size=args.peer_batch_size,
            variant=args.peer_variant,
            warmup_events=args.peer_warmup_events,
            timeout_s=args.peer_timeout,
        )
    if name == "quix":
        return await run_quix(
            bench, workload, commit_interval=args.quix_commit_interval, timeout_s=args.peer_timeout
        )
    if name == "debezium":
        return await run_format(bench, workload, "debezium")
    if name == "latency":
        return await run_latency(
            bench, rate=args.latency_rate, seconds=args.latency_seconds, seed=args.seed + 1
        )
    assert backlog is not None, "the backlog is loaded whenever such a phase runs"
    if name == "sync_service":
        profile = bench.logs / "sync_service.profile.txt" if args.profile else None
        return await run_sync_service(bench, workload, backlog, profile=profile)
    if name == "grown":
        return await run_grown(bench, workload, backlog, factor=args.grown_factor)
    if name == "limit":
        return await run_limit(bench, workload, backlog.topics)
    engine = await prepare_baseline_database(bench)
    try:
        if name == "naive":
            return await run_naive(
                backlog,
                workload,
                engine,
                max_events=args.naive_events,
                max_seconds=args.naive_seconds,
            )
        return await run_bulk(backlog, workload, engine, batch=args.bulk_batch)
    finally:
        await engine.dispose()


def _short(phase: Phase) -> str:
    if phase.status == "skipped":
        return "; ".join(["skipped", *phase.notes])
    rate = phase.measured_events_per_s
    shown = f"{rate:,.0f} events/s" if rate is not None else "no figure"
    return (
        shown if phase.status == "ok" else f"{phase.status}: {shown}; {'; '.join(phase.problems)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # aiokafka logs an error on each metadata refresh that misses a topic just created;
    # failures that matter surface as exceptions, and the service logs to its own file.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return asyncio.run(run(args, command))
    except UserError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
