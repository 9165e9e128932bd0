"""`sync-service`: the one entry point. Thin: each command parses, calls into the package,
and prints. Every failure is one line on stderr and a non-zero exit; `--debug` shows the
traceback."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from datetime import datetime
from typing import Annotated, Any, TypeVar

import orjson
import typer
from pydantic import ValidationError

from sync_service.config import Settings, get_settings
from sync_service.errors import UserError
from sync_service.observability.logging import configure as configure_logging
from sync_service.retry import describe

T = TypeVar("T")
log = logging.getLogger("sync_service")

app = typer.Typer(
    name="sync-service",
    help="Kafka change events into PostgreSQL, and a transactional outbox back to Kafka.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The target schema (owned by Alembic).", no_args_is_help=True)
dlq_app = typer.Typer(help="The dead-letter store.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(dlq_app, name="dlq")

_state = {"debug": False}

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    _state["debug"] = debug


def _settings() -> Settings:
    try:
        settings = get_settings()
    except ValidationError as error:
        first = error.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        if not first["loc"]:  # a rule across settings: the message names them
            raise UserError(f"bad settings: {message}") from None
        name = "SYNC_" + str(first["loc"][0]).upper()
        raise UserError(f"bad setting {name}: {message}") from None
    configure_logging("DEBUG" if _state["debug"] else settings.log_level)
    return settings


def _run(work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; turn any failure into one line and exit code 1 (2 for bad input)."""
    try:
        return asyncio.run(work)
    except UserError as error:
        _fail(str(error), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as error:
        if _state["debug"]:
            raise
        _fail(f"unexpected failure: {describe(error)} (rerun with --debug for details)", 1)
    raise AssertionError("unreachable")


def _fail(message: str, code: int) -> Any:
    typer.echo(f"sync-service: {message}", err=True)
    raise typer.Exit(code)


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2).decode() + "\n")


@app.command()
def run() -> None:
    """Consumer and relay in one process: the one-machine default."""
    from sync_service.relay.publish import relay_part

    _serve(consume=True, relay=relay_part)


@app.command()
def consume() -> None:
    """Only the consumer (Kafka -> PostgreSQL), to scale it apart from the relay."""
    _serve(consume=True)


@app.command()
def relay() -> None:
    """Only the relay (outbox -> Kafka); replicas elect one active publisher."""
    from sync_service.relay.publish import relay_part

    _serve(consume=False, relay=relay_part)


def _serve(**parts: Any) -> None:
    from sync_service.service import serve, tune_gc

    settings = _settings()
    tune_gc()
    _run(serve(settings, **parts))


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the target database (to head by default)."""
    from sync_service.ops.migrate import upgrade

    settings = _settings()
    typer.echo(_run(upgrade(settings, revision)))


@app.command()
def offsets(as_json: JsonFlag = False) -> None:
    """Stored position, end offset and lag per topic-partition, and what waits."""
    from sync_service.ops.offsets import read_offsets

    report = _run(read_offsets(_settings()))
    if as_json:
        _print_json(report.as_json())
    else:
        typer.echo(report.render())


@app.command()
def replay(
    topic: Annotated[str, typer.Option(help="The topic to rewind.")],
    partition: Annotated[int, typer.Option(help="The partition to rewind.", min=0)],
    from_offset: Annotated[int | None, typer.Option(help="Replay from this offset.", min=0)] = None,
    from_time: Annotated[
        datetime | None,
        typer.Option(
            help="Replay from the first record at or after this time (RFC 3339).",
            formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%d"],
        ),
    ] = None,
) -> None:
    """Rewind a partition; replayed events re-apply safely (stale ones change nothing)."""
    from sync_service.ops.replay import replay as do_replay

    if (from_offset is None) == (from_time is None):
        _fail("give exactly one of --from-offset and --from-time", 2)
    typer.echo(_run(do_replay(_settings(), topic, partition, from_offset, from_time)))


@dlq_app.command("list")
def dlq_list(
    as_json: JsonFlag = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1)] = 50,
    all_: Annotated[bool, typer.Option("--all", help="Include re-driven ones.")] = False,
) -> None:
    """The dead letters: where each came from, and why."""
    from sync_service.ops.dlq import list_dead_letters, render

    letters = _run(list_dead_letters(_settings(), limit=limit, include_redriven=all_))
    if as_json:
        _print_json([letter.as_json() for letter in letters])
    else:
        typer.echo(render(letters))


@dlq_app.command("redrive")
def dlq_redrive(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead-letter ids (default: all).")] = None,
) -> None:
    """Decode the dead letters again and apply those that are now valid."""
    from sync_service.ops.dlq import redrive

    typer.echo(_run(redrive(_settings(), ids or None)))


@app.command()
def demo(
    events: Annotated[
        int, typer.Option(help="How many change events to generate.", min=1)
    ] = 20_000,
    seed: Annotated[int, typer.Option(help="Seed of the generated traffic.")] = 7,
) -> None:
    """The whole pipeline on generated traffic, on this machine, with a live display."""
    from sync_service.ops.demo import run_demo

    _run(run_demo(_settings(), events=events, seed=seed))


def main() -> None:
    """The entry point: usage errors, too, are one line (Typer would draw a panel)."""
    try:
        code = app(standalone_mode=False)
    except typer.Exit as done:
        code = done.exit_code
    except typer.TyperException as error:  # a bad or missing option, argument or command
        message = error.format_message().strip()
        if message:  # empty when a bare group has already printed its help
            typer.echo(f"sync-service: {message.splitlines()[0]}", err=True)
        code = error.exit_code
    except typer.Abort:
        typer.echo("sync-service: interrupted", err=True)
        code = 130
    except UserError as error:  # raised before `_run`, e.g. for a bad SYNC_* setting
        typer.echo(f"sync-service: {error}", err=True)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)
