"""Every Kafka client of the service and its commands is built here, from the settings.

`client_options` is the one place where the bootstrap servers, TLS and SASL become client
options; `consumer`, `producer` and `admin` add them to a client's own options (a unit
test fails if a module builds an aiokafka client anywhere else). `start` starts a client
and, when the broker cannot be reached, finds out why: aiokafka reports a wrong password,
an untrusted certificate, a host name mismatch and a plaintext client on a TLS listener
all as "Unable to bootstrap" (the cause goes only to its own log), so one connection is
opened here to learn the cause, and `KafkaRefused` carries it in words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

from sync_service.config import Settings
from sync_service.connections import tls

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
"""How long the diagnosing connection may take, per bootstrap server."""
TLS_ALERT_WAIT_S = 1.0
"""How long a diagnosing TLS connection waits for an alert after its handshake."""


def client_options(settings: Settings) -> dict[str, Any]:
    """The options every aiokafka client gets: where the brokers are, and how to talk to
    them (TLS verified against SYNC_KAFKA_SSL_CAFILE with the host name checked; SASL)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = tls.client_context(
            settings.kafka_ssl_cafile,
            settings.kafka_ssl_certfile,
            settings.kafka_ssl_keyfile,
            check_hostname=settings.kafka_ssl_check_hostname,
        )
    if settings.kafka_security_protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


def consumer(settings: Settings, **options: Any) -> AIOKafkaConsumer:
    """A consumer with the connection settings and the caller's `options`."""
    return AIOKafkaConsumer(**client_options(settings), **options)


def producer(settings: Settings, **options: Any) -> AIOKafkaProducer:
    """A producer with the connection settings and the caller's `options`."""
    return AIOKafkaProducer(**client_options(settings), **options)


def admin(settings: Settings, **options: Any) -> AIOKafkaAdminClient:
    """An admin client with the connection settings and the caller's `options`."""
    return AIOKafkaAdminClient(**client_options(settings), **options)


class KafkaRefused(KafkaConnectionError):  # type: ignore[misc]
    """The broker answered but refused this client; `cause` says why, in words. Retriable
    like any connection error: the long-running service retries as for an outage."""

    def __init__(self, bootstrap: str, cause: str) -> None:
        super().__init__(f"Kafka at {bootstrap} refused the connection: {cause}")
        self.cause = cause


class Startable(Protocol):
    async def start(self) -> None: ...


class _Refusals:
    """The last refusal seen (by `start`, or in aiokafka's own reconnects once `watch`
    is on), for `/readyz`: it counts while it keeps being seen, and ends when a client
    starts or when it was not seen for `FRESH_S` (clients retry far more often)."""

    FRESH_S = 30.0

    def __init__(self) -> None:
        self._cause: str | None = None
        self._seen = 0.0

    def set(self, cause: str | None) -> bool:
        """Record `cause` (None: connected); True when it is news."""
        news = cause != self.cause
        self._cause, self._seen = cause, time.monotonic()
        return news

    @property
    def cause(self) -> str | None:
        if self._cause is None or time.monotonic() - self._seen > self.FRESH_S:
            return None
        return self._cause


REFUSAL = _Refusals()


async def start(client: Startable, settings: Settings) -> None:
    """Start `client`; a broker that refuses it raises `KafkaRefused` with the cause,
    brokers that cannot be reached at all a plain `KafkaConnectionError`."""
    try:
        await client.start()
    except KafkaConnectionError as error:
        cause = await diagnose(settings)
        REFUSAL.set(cause)
        if cause is None:  # aiokafka's own words list the parsed address tuples
            raise KafkaConnectionError(
                f"cannot reach Kafka at {settings.kafka_bootstrap}"
            ) from error
        raise KafkaRefused(settings.kafka_bootstrap, cause) from error
    REFUSAL.set(None)


class _Watch(logging.Filter):
    """Reads the errors aiokafka logs when a connection to a broker fails (it retries
    them by itself, so no caller sees them) and records those that are refusals."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        error = next((a for a in args if isinstance(a, BaseException)), None)
        if error is not None and _is_refusal(error):
            # (host, port, error) when bootstrapping, (node id, error) for a broker
            host = str(args[0]) if len(args) == 3 else f"broker {args[0]}'s advertised host"
            cause = explain(error, host, self.settings)
            if REFUSAL.set(cause):  # the clients retry often: say it once, in words
                log.warning("Kafka refuses this client (retrying): %s", cause)
        return True


_WATCHED = logging.getLogger("aiokafka")
"""Where aiokafka's client logs a failed connection, bootstrap or to a broker (at ERROR)."""


def watch(settings: Settings) -> None:
    """Record refusals seen in aiokafka's own reconnects (the long-running service: the
    cause goes to the log and `/readyz`). Only while aiokafka's ERROR records are on."""
    for old in [f for f in _WATCHED.filters if isinstance(f, _Watch)]:
        _WATCHED.removeFilter(old)
    _WATCHED.addFilter(_Watch(settings))


async def diagnose(settings: Settings) -> str | None:
    """Why the bootstrap servers refuse a client with these settings, or None when none
    of them can be reached at all (an outage) or one now accepts it."""
    options = client_options(settings)
    causes = []
    for server in settings.kafka_bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        host = host.strip("[]") or "localhost"
        try:
            cause = await asyncio.wait_for(
                _probe(host, int(port or 9092), settings, options), PROBE_TIMEOUT_S
            )
        except (TimeoutError, ValueError):
            continue
        if cause is not None:
            causes.append(cause)
    return causes[0] if causes else None


async def _probe(host: str, port: int, settings: Settings, options: dict[str, Any]) -> str | None:
    """Connect to one broker as a client would and explain the failure, if any."""
    try:  # first plain TCP: a server that is not there is an outage, not a refusal
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    context = options.get("ssl_context")
    if context is not None:
        refused = await _tls_refusal(host, port, context)
        if refused is not None:
            return explain(refused, host, settings)
    connection = None
    try:
        connection = await create_conn(
            host,
            port,
            client_id="sync-service-probe",
            request_timeout_ms=int(PROBE_TIMEOUT_S * 1000),
            **{k: v for k, v in options.items() if k != "bootstrap_servers"},
        )
        await connection.send(MetadataRequest([]))
    except (OSError, KafkaError, asyncio.IncompleteReadError, TimeoutError) as error:
        log.debug("connection to %s:%d failed", host, port, exc_info=True)
        return explain(error, host, settings)
    finally:
        if connection is not None:
            connection.close()
    return None


async def _tls_refusal(host: str, port: int, context: ssl.SSLContext) -> BaseException | None:
    """The TLS failure of a handshake with `host`, if any. A server that refuses the
    client's certificate says so in an alert right after the handshake (TLS 1.3), which
    a Kafka client only sees as a closed connection: wait a moment for it."""
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except ssl.SSLError as error:
        return error
    except OSError:
        return None
    try:
        await asyncio.wait_for(reader.read(1), TLS_ALERT_WAIT_S)
    except ssl.SSLError as error:
        return error
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return None


def _is_refusal(error: BaseException) -> bool:
    """Whether only a broker refusing this client raises `error` (never an outage): a
    SASL failure, a certificate that does not verify, a TLS alert from the broker."""
    refusals = (
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
        IllegalSaslStateError,
        ssl.SSLCertVerificationError,
    )
    return isinstance(error, refusals) or (
        isinstance(error, ssl.SSLError) and "ALERT" in str(error)
    )


_EXPECTS = {
    "PLAINTEXT": "TLS or SASL (SASL_SSL, SSL)",
    "SASL_PLAINTEXT": "TLS (SASL_SSL)",
    "SSL": "SASL (SASL_SSL)",
    "SASL_SSL": "no SASL (SSL)",
}
"""What a listener that closes on a client with this protocol most likely expects."""


def explain(error: BaseException, host: str, settings: Settings) -> str:
    """An operator's words for why a broker that accepted TCP refused this client."""
    protocol = settings.kafka_security_protocol
    setting = f"SYNC_KAFKA_SECURITY_PROTOCOL={protocol}"
    if isinstance(error, SaslAuthenticationFailed):
        return (
            f"wrong credentials: SASL {settings.kafka_sasl_mechanism} authentication of "
            f"{settings.kafka_sasl_username!r} failed "
            "(SYNC_KAFKA_SASL_USERNAME, SYNC_KAFKA_SASL_PASSWORD)"
        )
    if isinstance(error, UnsupportedSaslMechanismError):
        return (
            f"the broker does not offer SASL {settings.kafka_sasl_mechanism} on this "
            "listener (SYNC_KAFKA_SASL_MECHANISM)"
        )
    if isinstance(error, IllegalSaslStateError):
        return f"protocol mismatch: the listener does not use SASL ({setting})"
    reason = tls.explain(
        error,
        host,
        "SYNC_KAFKA_SSL_CAFILE",
        "SYNC_KAFKA_SSL_CERTFILE and SYNC_KAFKA_SSL_KEYFILE",
        has_cert=settings.kafka_ssl_certfile is not None,
    )
    if reason is not None:
        return f"{reason} ({setting})"
    if protocol.endswith("SSL") and isinstance(error, ConnectionResetError):
        return (
            f"protocol mismatch: the TLS handshake was cut off: is it a TLS listener? ({setting})"
        )
    return (
        f"protocol mismatch: the broker closed the connection without answering: "
        f"does the listener expect {_EXPECTS[protocol]}? ({setting})"
    )
