"""Logging: one line per event on stderr, as text (`time LEVEL logger: message key=value`)
or as JSON (one object per line: `time`, `level`, `logger`, `message`, then the event's
fields); tracebacks only at DEBUG or for errors the service cannot handle.

The service logs through the standard library, with its context in `extra={...}`; one
structlog `ProcessorFormatter` renders its records and the libraries' alike. Known secrets
are redacted from every record and every rendered line (`redact`), and aiokafka's
repeated connection errors are folded into the outage lines (`outages`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import structlog
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict, Processor, WrappedLogger

from sync_service.observability import outages
from sync_service.observability.redact import RedactSecrets, redact, register

LogFormat = Literal["text", "json"]


@dataclass(frozen=True, slots=True)
class OffsetRange:
    """The records of one partition in a batch: `topic[partition]:first-last` in text, an
    object in JSON."""

    topic: str
    partition: int
    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]:{self.first}-{self.last}"


def configure(
    level: str = "INFO",
    fmt: LogFormat = "text",
    *,
    secrets: Iterable[str] = (),
    outage_summary_s: float = 30.0,
) -> None:
    """Route the service's and the libraries' logs to stderr at `level`, in `fmt`, with
    `secrets` redacted and outages told once."""
    register(secrets)
    outages.configure(summary_every_s=outage_summary_s)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(outages.LibraryErrors())
    handler.addFilter(RedactSecrets())
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings are lines of the log too (redacted, as JSON)
    # aiokafka's debug lines are its protocol; its warnings and errors go through
    # `LibraryErrors`, which folds the repeated ones into the outage lines.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))


def formatter(fmt: LogFormat) -> logging.Formatter:
    """The formatter of `fmt`: text as the service always wrote it, or JSON lines."""
    json = fmt == "json"
    pre_chain: list[Processor] = [
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        # Text keeps the local second it always had; JSON is for machines: UTC, microseconds.
        structlog.processors.TimeStamper(
            fmt="iso" if json else "%Y-%m-%dT%H:%M:%S", utc=json, key="time"
        ),
    ]
    return ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _render_json if json else _render_text,
        ],
    )


_HEAD = ("time", "level", "logger", "event")
_logfmt = structlog.processors.LogfmtRenderer(bool_as_flag=False)


def _render_json(_: WrappedLogger, __: str, event: EventDict) -> str:
    ordered = {
        "time": event.pop("time", None),
        "level": event.pop("level", None),
        "logger": event.pop("logger", None),
        "message": event.pop("event", None),
        **{key: value for key, value in event.items() if value is not None},
    }
    return redact(orjson.dumps(ordered, default=_jsonable).decode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _render_text(_: WrappedLogger, __: str, event: EventDict) -> str:
    time, level, logger, message = (event.pop(key, "") for key in _HEAD)
    exception = event.pop("exception", None)
    line = f"{time} {str(level).upper()} {logger}: {message}"
    fields = _logfmt(_, __, {k: _text_value(v) for k, v in event.items() if v is not None})
    if fields:
        line = f"{line} {fields}"
    if exception:
        line = f"{line}\n{exception}"
    return redact(line)


def _text_value(value: Any) -> Any:
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(map(str, value))
    if isinstance(value, Mapping | MutableMapping):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return value
