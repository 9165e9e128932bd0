"""`sync-service`: the one entry point. Thin: each command parses, calls into the package,
and prints. Every failure is one line on stderr and a non-zero exit; `--debug` shows the
traceback."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import traceback
from collections.abc import Coroutine
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

import orjson
import typer
import uvloop
from pydantic import ValidationError

from sync_service.config import Settings, get_settings, unknown_variables
from sync_service.errors import UserError
from sync_service.observability.logging import configure as configure_logging
from sync_service.observability.redact import redact, secrets_of
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

TIME_FORMATS = ["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%d"]
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
    configure_logging(
        "DEBUG" if _state["debug"] else settings.log_level,
        settings.log_format,
        secrets=secrets_of(settings),
        outage_summary_s=settings.log_outage_summary_s,
    )
    for name in unknown_variables(os.environ):
        log.warning("%s is set but no setting reads it (misspelt?): it is ignored", name)
    return settings


def _run(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` on uvloop's event loop; turn any failure into one line and exit code 1
    (2 for bad input). The standard loop and its sockets are about a tenth of the
    consumer's CPU; on uvloop the consumer and the relay spend 3-5% less CPU per event
    (bench/README.md)."""
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(work)
    except UserError as error:
        _fail(str(error), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as error:
        if _state["debug"]:
            sys.stderr.write(redact(traceback.format_exc()))
            _fail(f"unexpected failure: {describe(error)}", 1)
        _fail(f"unexpected failure: {describe(error)} (rerun with --debug for details)", 1)
    raise AssertionError("unreachable")


def _fail(message: str, code: int) -> Any:
    typer.echo(f"sync-service: {redact(message)}", err=True)
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
    from sync_service.memory import tune_gc
    from sync_service.service import serve

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


TimeOption = typer.Option(
    formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%d"],
    help="RFC 3339 (a time without a zone is UTC).",
)


@app.command()
def replay(
    topic: Annotated[str, typer.Option(help="The inbound topic to replay.")],
    partition: Annotated[
        list[int] | None, typer.Option(help="A partition to replay (repeat for more).", min=0)
    ] = None,
    all_partitions: Annotated[bool, typer.Option(help="Every partition of the topic.")] = False,
    from_offset: Annotated[int | None, typer.Option(help="Replay from this offset.", min=0)] = None,
    from_time: Annotated[datetime | None, TimeOption] = None,
    to_offset: Annotated[
        int | None,
        typer.Option(help="Stop before this offset, then go on from where it was.", min=0),
    ] = None,
    to_time: Annotated[datetime | None, TimeOption] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Read the range and say what would change; write nothing.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Re-read a range of a topic's partitions; replayed events re-apply safely (stale
    ones change nothing). With --to-*, the consumer then goes on from where it was."""
    from sync_service.ops.dryrun import dry_run as do_dry_run
    from sync_service.ops.replay import ReplayRequest, replay_range

    if partition and all_partitions:
        _fail("give --partition or --all-partitions, not both", 2)
    if not partition and not all_partitions:
        _fail("give --partition P (one or more) or --all-partitions", 2)
    request = ReplayRequest(
        topic, None if all_partitions else partition, from_offset, from_time, to_offset, to_time
    )
    settings = _settings()
    if dry_run:
        report = _run(do_dry_run(settings, request))
        if as_json:
            _print_json(report.as_json())
        else:
            typer.echo(report.render())
        return
    done = _run(replay_range(settings, request))
    if as_json:
        _print_json({"topic": topic, "partitions": done})
    else:
        typer.echo("\n".join(d["line"] for d in done))


class EntityChoice(StrEnum):
    user = "user"
    order = "order"


@app.command()
def republish(
    entity: Annotated[EntityChoice, typer.Option(help="Which rows: users or orders.")],
    id_: Annotated[
        list[int] | None, typer.Option("--id", help="A row to re-send (repeat for more).", min=1)
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every row, deleted ones too.")] = False,
    since: Annotated[
        datetime | None,
        typer.Option(
            formats=TimeOption.formats,
            help="Rows updated or deleted at or after this time (RFC 3339).",
        ),
    ] = None,
    chunk: Annotated[int, typer.Option(help="Rows per transaction.", min=1)] = 1_000,
) -> None:
    """Re-send the current state of rows downstream (user.snapshot / order.snapshot),
    published exactly once by the relay, in order with live changes."""
    from sync_service.ops.republish import Selection
    from sync_service.ops.republish import republish as do_republish

    selection = Selection(entity.value, id_ or None, all_, since)
    typer.echo(_run(do_republish(_settings(), selection, chunk)))


@app.command()
def history(
    as_json: JsonFlag = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1)] = 50,
) -> None:
    """Every operator action that changed something: what, when, who, and the outcome."""
    from sync_service.ops.audit import list_actions, render

    actions = _run(list_actions(_settings(), limit=limit))
    if as_json:
        _print_json([action.as_json() for action in actions])
    else:
        typer.echo(render(actions))


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


@dlq_app.command("show")
def dlq_show(
    letter_id: Annotated[int, typer.Argument(help="The dead letter's id.", metavar="ID")],
    as_json: JsonFlag = False,
) -> None:
    """One dead letter, whole: origin, key, headers, reason and value (binary as hex)."""
    from sync_service.ops.dlq import show
    from sync_service.ops.show import letter_json, render_letter

    letter = _run(show(_settings(), letter_id))
    if as_json:
        _print_json(letter_json(letter))
    else:
        typer.echo(render_letter(letter))


KindOption = Annotated[str | None, typer.Option("--kind", help="Only letters of this kind.")]


@dlq_app.command("redrive")
def dlq_redrive(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead-letter ids (default: all).")] = None,
    kind: KindOption = None,
    reason_contains: Annotated[
        str | None, typer.Option(help="Only letters whose reason contains this text.")
    ] = None,
) -> None:
    """Decode the dead letters again and apply those that are now valid (in chunks)."""
    from sync_service.ops.dlq import redrive

    typer.echo(_run(redrive(_settings(), ids or None, kind=kind, reason_contains=reason_contains)))


@dlq_app.command("purge")
def dlq_purge(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead-letter ids.")] = None,
    before: Annotated[
        datetime | None,
        typer.Option(help="Letters stored before this time (RFC 3339).", formats=TIME_FORMATS),
    ] = None,
    kind: KindOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete dead letters for good (asks first, unless --yes)."""
    from sync_service.ops.dlq import Selection
    from sync_service.ops.purge import preview, purge

    settings = _settings()
    selection = Selection(ids=ids or None, kind=kind, before=before)
    shown = _run(preview(settings, selection))
    if not shown.count:
        typer.echo(f"no dead letters to purge ({selection.describe()})")
        return
    what = f"{shown.count} dead letter{'s' if shown.count != 1 else ''} ({selection.describe()}"
    what += f"; {shown.not_redriven} never re-driven)" if shown.not_redriven else ")"
    if not yes:
        if not sys.stdin.isatty():
            _fail(f"not purging {what} without confirmation: rerun with --yes", 2)
        if not typer.confirm(f"delete {what} for good?"):
            _fail("nothing purged", 1)
    typer.echo(_run(purge(settings, selection, shown)))


@dlq_app.command("resume")
def dlq_resume(
    topic: Annotated[str, typer.Option(help="The paused partition's topic.")],
    partition: Annotated[int, typer.Option(help="The paused partition.", min=0)],
) -> None:
    """Resume a partition that the dead-letter guard paused, once its upstream is fixed."""
    from sync_service.ops.resume import resume

    typer.echo(_run(resume(_settings(), topic, partition)))


@app.command()
def demo(
    events: Annotated[
        int, typer.Option(help="How many change events to generate.", min=1)
    ] = 20_000,
    seed: Annotated[int, typer.Option(help="Seed of the generated traffic.")] = 7,
    inbound_format: Annotated[
        Literal["native", "debezium"] | None,
        typer.Option(
            "--format",
            help="Write the traffic as native envelopes or as Debezium's PostgreSQL "
            "change events (default: SYNC_INBOUND_FORMAT).",
        ),
    ] = None,
) -> None:
    """The whole pipeline on generated traffic, on this machine, with a live display."""
    from sync_service.ops.demo import run_demo

    _run(run_demo(_settings(), events=events, seed=seed, inbound_format=inbound_format))


def main() -> None:
    """The entry point: usage errors, too, are one line (Typer would draw a panel)."""
    try:
        code = app(standalone_mode=False)
    except typer.Exit as done:
        code = done.exit_code
    except typer.TyperException as error:  # a bad or missing option, argument or command
        message = error.format_message().strip()
        if message:  # empty when a bare group has already printed its help
            typer.echo(f"sync-service: {redact(message.splitlines()[0])}", err=True)
        code = error.exit_code
    except typer.Abort:
        typer.echo("sync-service: interrupted", err=True)
        code = 130
    except UserError as error:  # raised before `_run`, e.g. for a bad SYNC_* setting
        typer.echo(f"sync-service: {redact(str(error))}", err=True)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)
