"""Retry what is not the message's fault: capped, jittered exponential backoff.

`is_transient` is the one policy: a lost or refused connection, a pool timeout, a
serialization failure or deadlock, a statement timeout, a broker error. Everything else
is a defect and propagates.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from aiokafka.errors import KafkaError
from sqlalchemy import exc as sa_exc

from sync_service.observability.metrics import RETRIES

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
    """A one-line description of an error, without the statement and parameters."""
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        error = error.orig.__cause__ or error.orig
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:300]


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
) -> T:
    """Run `work` until it succeeds, sleeping between transient failures; a stop request
    ends the wait with `asyncio.CancelledError`."""
    while True:
        try:
            result = await work()
        except Exception as error:
            if not is_transient(error):
                raise
            RETRIES.labels(stage, type(error).__name__).inc()
            delay = backoff.next_delay()
            log.warning("%s failed, retrying in %.2fs: %s", stage, delay, describe(error))
            log.debug("%s failure", stage, exc_info=True)
            if stop is not None and stop.is_set():
                raise asyncio.CancelledError from error
            await asyncio.sleep(delay)
        else:
            backoff.reset()
            return result
