"""Outages, told once: when Kafka or PostgreSQL stops answering, one WARNING line names the
cause; while it lasts, a summary (how long, how many failed attempts) at most every
`summary_every_s`; once its answers have held for `RECOVERY_GRACE_S`, one INFO line.
Nothing in between: the retries of a known outage log at DEBUG, and aiokafka's own
connection errors (dozens a second while a broker is down) are counted, not written.

The process has one `Outage` per dependency (`current()`), fed by the retry loop
(`retry.retrying`) with each failure it retries, by the steps of the service (`step`,
and the consumer's fetches) with their successes, and by `LibraryErrors`, a logging
filter that reads aiokafka's records. A library error that is not a plain connection
failure (an authentication or TLS refusal, an authorization error) is not folded away:
each kind is written once per `summary_every_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Literal

import asyncpg
from aiokafka import errors as kafka_errors
from sqlalchemy import exc as sa_exc

Dependency = Literal["Kafka", "PostgreSQL"]
KAFKA: Dependency = "Kafka"
POSTGRESQL: Dependency = "PostgreSQL"

log = logging.getLogger("sync_service.outages")
Clock = Callable[[], float]
RECOVERY_GRACE_S = 5.0
"""How long answers must come with no failure in between before an outage is told over:
with one broker of several down, the others answer while the client keeps failing to
reach that one, and the log should say so once, not every second."""


class Outage:
    """What this process knows of one dependency's reachability."""

    def __init__(
        self,
        dependency: Dependency,
        *,
        summary_every_s: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.dependency = dependency
        self.summary_every_s = summary_every_s
        self._clock = clock
        self.down = False
        """True from the first failure to reach it until it has answered, with no failure,
        for `RECOVERY_GRACE_S`."""
        self._answered: float | None = None
        """While down: when it first answered after its latest failure."""
        self._since = 0.0
        self._told = 0.0
        self._failures = 0
        self._hidden = 0
        """Library lines not written besides the failed attempts (their other symptoms)."""

    def failed(self, cause: str, *, doing: str | None = None) -> None:
        """One failed attempt to reach it, for `cause` (a one-line description)."""
        now = self._clock()
        self._failures += 1
        self._answered = None
        if not self.down:
            self.down, self._since, self._told = True, now, now
            self._failures, self._hidden = 1, 0
            log.warning(
                "%s unreachable", self.dependency,
                extra={"dependency": self.dependency, "doing": doing, "cause": cause},
            )  # fmt: skip
        elif now - self._told >= self.summary_every_s:
            self._told = now
            log.warning(
                "%s still unreachable", self.dependency,
                extra={
                    "dependency": self.dependency, "down_s": round(now - self._since, 1),
                    "failures": self._failures, "hidden": self._hidden, "cause": cause,
                },
            )  # fmt: skip

    def hidden(self) -> None:
        """A library's line about the outage was not written."""
        self._hidden += 1

    def recovered(self) -> None:
        """It answered (called on every success: cheap while it is up)."""
        if not self.down:
            return
        now = self._clock()
        if self._answered is None:
            self._answered = now
        if now - self._answered < RECOVERY_GRACE_S:
            return
        self.down, answered, self._answered = False, self._answered, None
        log.info(
            "%s reachable again", self.dependency,
            extra={
                "dependency": self.dependency, "down_s": round(answered - self._since, 1),
                "failures": self._failures, "hidden": self._hidden,
            },
        )  # fmt: skip


class Outages:
    """One `Outage` per dependency."""

    def __init__(self, *, summary_every_s: float = 30.0, clock: Clock = time.monotonic) -> None:
        self.kafka = Outage(KAFKA, summary_every_s=summary_every_s, clock=clock)
        self.postgresql = Outage(POSTGRESQL, summary_every_s=summary_every_s, clock=clock)

    def __getitem__(self, dependency: Dependency) -> Outage:
        return self.kafka if dependency == KAFKA else self.postgresql


_current = Outages()


def current() -> Outages:
    """The process's outages."""
    return _current


def configure(*, summary_every_s: float, clock: Clock = time.monotonic) -> Outages:
    """Start afresh with these settings (at start-up, and in tests)."""
    global _current
    _current = Outages(summary_every_s=summary_every_s, clock=clock)
    return _current


# -- Which failures are an outage, and of what ------------------------------------------

_KAFKA_UNREACHABLE = (
    kafka_errors.KafkaConnectionError,
    kafka_errors.NodeNotReadyError,
    kafka_errors.RequestTimedOutError,
    kafka_errors.KafkaTimeoutError,
)
_PG_UNREACHABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
)
_UNREACHABLE = (OSError, asyncio.TimeoutError, *_KAFKA_UNREACHABLE, *_PG_UNREACHABLE)
_STEP = "_sync_step"


def _root(error: BaseException) -> BaseException:
    """The driver's error under SQLAlchemy's wrapper."""
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        return error.orig.__cause__ or error.orig
    return error


def is_connection_failure(error: BaseException) -> bool:
    """A failure to reach a server at all (refused, reset, timed out, shutting down), as
    opposed to a server that answered with an error. A TLS refusal is not one: it says
    something is misconfigured, and is reported as itself."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    error = _root(error)
    if isinstance(error, ssl.SSLError):
        return False
    if isinstance(error, asyncpg.InterfaceError):  # a pooled connection the server dropped
        return "connection is closed" in str(error)
    return isinstance(error, _UNREACHABLE)


def dependency_of(error: BaseException) -> Dependency | None:
    """Which server `error` came from: the step it was raised in, else its type."""
    step: tuple[Dependency, str] | None = getattr(error, _STEP, None)
    if step is not None:
        return step[0]
    if isinstance(error, kafka_errors.KafkaError):
        return KAFKA
    if isinstance(error, sa_exc.SQLAlchemyError | asyncpg.PostgresError | asyncpg.InterfaceError):
        return POSTGRESQL
    return None


def action_of(error: BaseException) -> str | None:
    """What was being done when `error` was raised (see `step`)."""
    step: tuple[Dependency, str] | None = getattr(error, _STEP, None)
    return step[1] if step is not None else None


@contextlib.contextmanager
def step(dependency: Dependency, action: str) -> Iterator[None]:
    """Run a step that talks to `dependency`: its success ends an outage of it; an error
    it raises is labelled with the dependency and `action` (the innermost step wins), so
    that a retry line can say what failed, even for an error with no message."""
    try:
        yield
    except Exception as error:
        if getattr(error, _STEP, None) is None:
            with contextlib.suppress(AttributeError):  # a built-in without a __dict__
                setattr(error, _STEP, (dependency, action))
        raise
    current()[dependency].recovered()


# -- aiokafka's own lines ----------------------------------------------------------------


class LibraryErrors(logging.Filter):
    """Folds aiokafka's connection errors into the Kafka outage, and writes every other
    kind of aiokafka warning or error (one template with the same kinds of exception) at
    most once per the outage summary's interval, counting the rest."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._written: dict[tuple[str, str, tuple[str, ...]], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith("aiokafka"):
            return True
        errors = [a for a in _args(record) if isinstance(a, BaseException)]
        if record.exc_info and record.exc_info[1] is not None:
            errors.append(record.exc_info[1])
        outage = current().kafka
        if any(is_connection_failure(e) for e in errors):
            outage.failed(record.getMessage())
            return False  # the outage's first line carries this one's text as its cause
        if not errors and outage.down:
            outage.hidden()  # "Unable to update metadata", "Heartbeat session expired"...
            return False
        kind = (record.name, str(record.msg), tuple(type(e).__name__ for e in errors))
        now = self._clock()
        last = self._written.get(kind)
        if last is not None and now - last < outage.summary_every_s:
            outage.hidden()
            return False
        if len(self._written) > 1_000:  # kinds are few; this only bounds a pathological case
            self._written.clear()
        self._written[kind] = now
        return True


def _args(record: logging.LogRecord) -> tuple[object, ...]:
    args = record.args
    if isinstance(args, tuple):
        return args
    return () if args is None else (args,)
