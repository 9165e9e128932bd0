"""`python -m bench.questions`: the README's three open questions (pool exhaustion in bursts,
selectinload against joinedload, migrations under traffic), measured on this machine.

Invariant: every figure in bench/QUESTIONS.md is in the JSON this writes, from one run in a
scratch database of its own (`questions_<random>`), which the run drops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from bench.progress import say
from bench.questions._db import load_average, machine, scratch_database, versions
from bench.questions.loading import question_loading
from bench.questions.migrations import question_migrations
from bench.questions.plan import FULL, QUESTIONS, QUICK, Plan
from bench.questions.pool import question_pool
from bench.questions.tables import tables
from sync_service.config import Settings
from sync_service.errors import UserError
from sync_service.retry import describe, is_transient

REPO: Final = Path(__file__).resolve().parents[2]
RESULTS: Final = REPO / "bench" / "results" / "questions.json"
QUICK_RESULTS: Final = REPO / "bench" / "results" / "questions-quick.json"
"""Apart from the full run's, which bench/QUESTIONS.md quotes."""


RUNNERS: Final[dict[str, Callable[[str, Plan], Awaitable[dict[str, Any]]]]] = {
    "pool": question_pool,
    "loading": question_loading,
    "migrations": question_migrations,
}


def _only(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = set(names) - set(QUESTIONS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(QUESTIONS)}")
    return names


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.questions", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs: under a minute")
    parser.add_argument(
        "--only", type=_only, default=QUESTIONS, help="comma-separated: pool,loading,migrations"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="the server to make the scratch database on (default: SYNC_DATABASE_URL)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the JSON file to write (default: bench/results/questions.json, or"
        " questions-quick.json with --quick)",
    )
    return parser.parse_args(argv)


async def run(arguments: argparse.Namespace, command: str) -> dict[str, Any]:
    plan = QUICK if arguments.quick else FULL
    server = arguments.database_url or Settings().database_url
    started = datetime.now(UTC)
    load_before = load_average()
    async with scratch_database(server) as url:
        found: dict[str, Any] = {
            "command": command,
            "started": started.isoformat(timespec="seconds"),
            "quick": arguments.quick,
            "plan": asdict(plan),
            "machine": machine(),
            "versions": await versions(url),
            "questions": {},
        }
        for name in arguments.only:
            began = time.monotonic()
            found["questions"][name] = await RUNNERS[name](url, plan)
            found["questions"][name]["seconds"] = round(time.monotonic() - began, 1)
    found["machine"]["load_average_before"] = load_before
    found["machine"]["load_average_after"] = load_average()
    found["seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    return found


def main(argv: Sequence[str] | None = None) -> None:
    arguments = _arguments(sys.argv[1:] if argv is None else argv)
    command = "python -m bench.questions" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    # The service's retry loop logs every pool timeout it retries: thousands of lines here.
    logging.getLogger("sync_service.retry").setLevel(logging.ERROR)
    try:
        record = asyncio.run(run(arguments, command))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        if not is_transient(error):  # a defect: its traceback is what helps
            raise
        print(f"error: lost PostgreSQL during the run ({describe(error)})", file=sys.stderr)
        raise SystemExit(1) from None
    output = arguments.output or (QUICK_RESULTS if arguments.quick else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2) + b"\n")
    print(tables(record))
    say(f"wrote {output} in {record['seconds']} s")


if __name__ == "__main__":
    main()
