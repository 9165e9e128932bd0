"""Retry what is not the message's fault: capped, jittered exponential backoff.

`is_transient` is the one policy: a lost or refused connection, a pool timeout, a
serialization failure or deadlock, a statement timeout, a broker error. Everything else
is a defect and propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg
from aiokafka.errors import KafkaError
from sqlalchemy import exc as sa_exc

from sync_service.observability import outages
from sync_service.observability.metrics import RETRIES
from sync_service.observability.redact import redact

T = TypeVar("T")
log = logging.getLogger(__name__)

_TRANSIENT_PG = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.ExclusionViolationError,  # the deferred email rule: another batch took it first
    asyncpg.QueryCanceledError,
    asyncpg.AdminShutdownError,
    asyncpg.LockNotAvailableError,  # lock_timeout: the fence behind a stalled owner, say
    asyncpg.IdleInTransactionSessionTimeoutError,  # this process stalled mid-batch
)


class Transient(Exception):
    """Raised by the service itself for a condition that clears on retry."""


_RACING_INSERTS = frozenset({"pk_consumer_offsets"})
"""Unique rules two consumers can both hit at once (storing a first position): the
loser retries and then sees the winner's row. Any other duplicate is a defect."""


def is_transient(error: BaseException) -> bool:
    """True when retrying the same work later can succeed."""
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        cause = error.orig.__cause__
        if isinstance(cause, asyncpg.UniqueViolationError):
            return cause.constraint_name in _RACING_INSERTS
    if isinstance(error, Transient | OSError | asyncio.TimeoutError | KafkaError):
        return True
    if isinstance(error, sa_exc.TimeoutError):  # pool exhausted
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        cause = error.orig.__cause__ if error.orig is not None else None
        return isinstance(cause, _TRANSIENT_PG) or isinstance(error.orig, _TRANSIENT_PG)
    return isinstance(error, _TRANSIENT_PG)


def describe(error: BaseException) -> str:
    """A one-line description of an error, without the statement and parameters, and
    without any known secret; an error with no message is its type (and what was being
    done, where a step said so: `outages.step`)."""
    action = outages.action_of(error)
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        error = error.orig.__cause__ or error.orig
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    name = type(error).__name__
    described = f"{name}: {text}" if text else name
    if action is not None:
        described = f"{described} (while {action})"
    return redact(described[:300])


class Backoff:
    """Delays of `initial * 2^n`, capped at `maximum`, with full jitter."""

    def __init__(self, initial_s: float, maximum_s: float) -> None:
        self._initial = initial_s
        self._maximum = maximum_s
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * 2**self._attempt)
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


async def retrying(
    stage: str,
    work: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    stop: asyncio.Event | None = None,
    on: outages.Dependency | None = None,
) -> T:
    """Run `work` until it succeeds, sleeping between transient failures; a stop request
    ends the wait with `asyncio.CancelledError`. A failure to reach Kafka or PostgreSQL
    (`on`, unless the error says which) is told by `outages` (once, then in summaries);
    any other transient failure is a WARNING line with its cause."""
    attempt = 0
    unreachable: outages.Outage | None = None
    while True:
        try:
            result = await work()
        except Exception as error:
            if not is_transient(error):
                raise
            attempt += 1
            RETRIES.labels(stage, type(error).__name__).inc()
            delay = backoff.next_delay()
            cause = describe(error)
            context = {"stage": stage, "attempt": attempt, "delay_s": round(delay, 2)}
            dependency = outages.dependency_of(error) or on
            if dependency is not None and outages.is_connection_failure(error):
                unreachable = outages.current()[dependency]
                unreachable.failed(cause, doing=stage)
                log.debug("%s failed, retrying", stage, extra={**context, "cause": cause},
                          exc_info=True)  # fmt: skip
            else:
                log.warning("%s failed, retrying", stage, extra={**context, "cause": cause})
                log.debug("%s failure", stage, exc_info=True)
            if stop is not None and stop.is_set():
                raise asyncio.CancelledError from error
            await asyncio.sleep(delay)
        else:
            if unreachable is not None:
                unreachable.recovered()
            if on is not None:
                outages.current()[on].recovered()
            backoff.reset()
            return result


async def wait_any(events: Sequence[asyncio.Event], timeout_s: float) -> None:
    """Return when one of `events` is set, or after `timeout_s`: the pause between two
    rounds of a loop that a stop request must end at once."""
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits)
