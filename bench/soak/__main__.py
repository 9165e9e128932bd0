"""`python -m bench.soak`: sync_service (two `consume` replicas and a `relay`) at a steady
rate for `--minutes`, with faults injected into its own processes; RSS, p99 latency and lag
sampled over time, the final state checked; a results file and a plot of the three.

Exit status: 0 when the final state was right and no process's RSS grew past the
tolerance after its warm-up; 1 otherwise; 2 when the soak could not start (one line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from aiokafka.errors import KafkaError
from sqlalchemy.exc import SQLAlchemyError

from bench.soak.run import Options, soak
from sync_service.errors import UserError
from sync_service.retry import describe

SEED = 20_261_205


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"soak: {message} (see python -m bench.soak --help)\n")


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return number


def _not_negative(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return number


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--rate", type=_positive, default=2_000.0, help="events/s offered (2,000)")
    add("--minutes", type=_positive, default=30.0, help="minutes of load (30)")
    add(
        "--warmup-minutes",
        type=_positive,
        default=None,
        help="each process's warm-up before its RSS is a baseline (5, or a sixth of a shorter run)",
    )
    add(
        "--burst-seconds",
        type=_not_negative,
        default=60.0,
        help="events of this many seconds sent at once at the start, so that each replica's "
        "warm-up includes full-size batches (60; 0: none)",
    )
    add("--sample-seconds", type=_positive, default=5.0, help="sampling period (5)")
    add("--no-faults", dest="faults", action="store_false", help="steady load only")
    add("--seed", type=int, default=SEED)
    add("--debug", action="store_true", help="a traceback on failure, not one line")
    add("--results", type=Path, default=Path(__file__).resolve().parent.parent / "results")
    return parser.parse_args(argv)


def print_summary(record: dict[str, Any]) -> None:
    """The figures a reader wants first, one per line."""
    out = sys.stdout
    s = record["settings"]
    print(f"soak: {s['rate']:,.0f} events/s for {s['minutes']:g} min "
          f"(achieved {record['sending']['achieved_rate']}/s), warm-up {s['warmup_minutes']:.3g} "
          f"min per process, tolerance {s['growth_tolerance_percent']:g}%", file=out)  # fmt: skip
    for p in record["processes"]:
        verdict = {True: "ok", False: "GREW", None: "not judged (too short-lived)"}[p["ok"]]
        print(
            f"  {p['process']:>18}: {p['warm_mb']} MB after warm-up -> {p['end_mb']} MB at the "
            f"end ({p['growth_mb']:+} MB, {p['growth_percent']:+}%; slope "
            f"{p['slope_mb_per_hour']} MB/h): {verdict}"
            if p["growth_mb"] is not None
            else f"  {p['process']:>18}: ran {p['ended_s'] - p['started_s']:.0f} s: {verdict}",
            file=out,
        )
    lat = record["latency"]
    print(f"  p99 send -> committed: {lat['commit']['p99_ms']} ms overall, "
          f"{lat['commit_after_warmup']['p99_ms']} ms after warm-up; "
          f"send -> downstream: {lat['downstream']['p99_ms']} ms", file=out)  # fmt: skip
    print(f"  lag: max {record['lag']['max']:,} records, median {record['lag']['median']}",
          file=out)  # fmt: skip
    for f in record["faults"]:
        print(f"  fault at {f['at_s'] / 60:.1f} min: {f['kind']} {f['target']}: recovered "
              f"after {f['recovered_after_s']} s", file=out)  # fmt: skip
    for problem in record["problems"]:
        print(f"  problem: {problem}", file=out)
    print(f"  RSS after warm-up: {record['verdicts']['rss']}; final state: "
          f"{record['verdicts']['correct']}; results in {record['results_file']}"
          + (f", plot {record['plot']}" if record.get("plot") else ""), file=out)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warmup = args.warmup_minutes if args.warmup_minutes is not None else min(5.0, args.minutes / 6)
    options = Options(
        rate=args.rate,
        minutes=args.minutes,
        warmup_minutes=warmup,
        burst_seconds=args.burst_seconds,
        sample_seconds=args.sample_seconds,
        faults=args.faults,
        seed=args.seed,
        results=args.results,
    )
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    command = " ".join(["python -m bench.soak", *(sys.argv[1:] if argv is None else argv)])
    try:
        record = asyncio.run(_main(options, command))
    except UserError as error:
        print(f"soak: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, KafkaError, SQLAlchemyError) as error:
        if args.debug:
            raise
        print(f"soak: failed: {describe(error)} (--debug for the traceback)", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("soak: interrupted", file=sys.stderr)
        return 130
    _plot(record)
    print_summary(record)
    return 0 if record["ok"] else 1


async def _main(options: Options, command: str) -> dict[str, Any]:
    # SIGTERM ends the soak like Ctrl-C: the service is stopped and what it made removed.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await soak(options, command)


def _plot(record: dict[str, Any]) -> None:
    """Draw the plot beside the results file and name it there."""
    try:
        from bench.soak.plot import plot
    except ImportError:
        print("soak: no plot: matplotlib is missing (pip install -e '.[bench]')", file=sys.stderr)
        return
    results = Path(record["results_file"])
    record["plot"] = str(plot(record, results.with_suffix(".png")))
    on_file = {k: v for k, v in record.items() if k != "results_file"}
    results.write_text(json.dumps(on_file, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
