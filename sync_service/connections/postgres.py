"""Every PostgreSQL connection's TLS, built here from the settings: the service's engine
(and with it the relay's LISTEN connection), Alembic and every command.

`SYNC_DATABASE_SSLMODE` reads as libpq's: `require` encrypts without verifying the
server (as asyncpg does), `verify-ca` checks the chain only, `verify-full` also checks
the host name. Unset, asyncpg's default applies (or what SYNC_DATABASE_URL says).
"""

from __future__ import annotations

import ssl
from typing import Any

from sqlalchemy.engine import make_url

from sync_service.config import Settings
from sync_service.connections import tls
from sync_service.errors import UserError
from sync_service.retry import describe


def ssl_argument(settings: Settings) -> ssl.SSLContext | bool | None:
    """asyncpg's `ssl` argument for the settings (None: leave asyncpg's default)."""
    mode = settings.database_sslmode
    if mode is None:
        return None
    if mode == "disable":
        return False
    return tls.client_context(
        settings.database_sslrootcert,
        settings.database_sslcert,
        settings.database_sslkey,
        verify=mode != "require",
        check_hostname=mode == "verify-full",
    )


def connect_args(settings: Settings) -> dict[str, Any]:
    """The engine's `connect_args` for TLS (merged into the caller's own)."""
    argument = ssl_argument(settings)
    return {} if argument is None else {"ssl": argument}


def unreachable(error: BaseException, settings: Settings) -> UserError:
    """The one line for a connection that failed: why, when TLS or the server's rules
    say so, else the usual question."""
    url = make_url(settings.database_url)
    where = f"PostgreSQL at {url.host or 'localhost'}:{url.port or 5432}"
    cause = _cause(error)
    reason = tls.explain(
        cause,
        url.host or "localhost",
        "SYNC_DATABASE_SSLROOTCERT",
        "SYNC_DATABASE_SSLCERT and SYNC_DATABASE_SSLKEY",
        has_cert=settings.database_sslcert is not None,
    )
    if reason is not None:
        mode = settings.database_sslmode or "unset"
        return UserError(f"{where} refused TLS: {reason} (SYNC_DATABASE_SSLMODE={mode})")
    if "no encryption" in str(cause):  # pg_hba.conf allows this client only with TLS
        return UserError(
            f"{where} accepts only TLS connections: set SYNC_DATABASE_SSLMODE=verify-full "
            "(and SYNC_DATABASE_SSLROOTCERT)"
        )
    if "requires a valid client certificate" in str(cause):
        return UserError(
            f"{where} requires a client certificate: set SYNC_DATABASE_SSLCERT and "
            "SYNC_DATABASE_SSLKEY"
        )
    if "certificate authentication failed" in str(cause):
        return UserError(
            f"{where} did not accept the client certificate for user {url.username!r}: its "
            "common name must be the user name (SYNC_DATABASE_SSLCERT)"
        )
    if "rejected SSL upgrade" in str(cause):
        return UserError(
            f"{where} does not offer TLS, but SYNC_DATABASE_SSLMODE="
            f"{settings.database_sslmode} requires it"
        )
    return UserError(
        f"cannot reach PostgreSQL ({describe(error)}): is it running, and is "
        "SYNC_DATABASE_URL right?"
    )


def _cause(error: BaseException) -> BaseException:
    """The driver's own error under SQLAlchemy's wrappers."""
    seen = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return seen
