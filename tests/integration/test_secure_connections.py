"""The service over a Kafka that speaks only SASL_SSL (SCRAM-SHA-512) and a PostgreSQL that
accepts only TLS, both private to this module and certified by a CA made here; and each
way of getting the connection wrong, as the one line an operator reads.

The broker listens on localhost:19092-19095 and PostgreSQL on localhost:15432 (both
started once for the module, about 15 s, and stopped after it); they need Java and the
Kafka jars of `scripts/services up`, and PostgreSQL 15's initdb (run as the postgres user
when the tests run as root)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka.errors import KafkaConnectionError
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from sync_service.config import Settings
from sync_service.connections import kafka, postgres
from sync_service.db.engine import make_engine, make_sessionmaker
from sync_service.events.outbound import downstream_event_id
from sync_service.pipeline.consume import ChangeConsumer
from sync_service.pipeline.write import BatchWriter
from tests.factories import order_event, user_event
from tests.integration.harness import (
    as_environment,
    create_topics,
    produce,
    running,
    wait_until,
)
from tests.integration.private_servers import (
    CLIENT_USER,
    Pki,
    SecureKafka,
    SecurePostgres,
    make_pki,
    secure_kafka,
    secure_postgres,
)
from tests.integration.relay_helpers import (
    Downstream,
    assert_exactly_once,
    create_out_topics,
    free_port,
)
from tests.integration.test_cli import EXECUTABLE, Outcome, cli

REFUSAL_WITHIN_S = 30.0
"""A refused connection must end a command well within this (not hang, not retry)."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    with secure_kafka(tmp_path_factory.mktemp("kafka"), pki) as running:
        yield running


@pytest.fixture(scope="module")
def database_server(pki: Pki) -> Iterator[SecurePostgres]:
    with secure_postgres(pki) as running:
        yield running


@pytest.fixture(scope="module")
async def secure(pki: Pki, broker: SecureKafka, database_server: SecurePostgres) -> Settings:
    return await _fresh(pki, broker, database_server)


async def _fresh(pki: Pki, broker: SecureKafka, database_server: SecurePostgres) -> Settings:
    """Settings for both private servers, verified TLS throughout, with topics, group,
    relay and database of their own; the database is created over TLS and migrated by
    `sync-service db upgrade` over TLS."""
    run = f"conn{uuid.uuid4().hex[:6]}"
    settings = Settings(
        kafka_bootstrap=broker.sasl_ssl,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=broker.username,
        kafka_sasl_password=SecretStr(broker.password),
        kafka_ssl_cafile=pki.ca,
        database_url=database_server.url(database=run),
        database_sslmode="verify-full",
        database_sslrootcert=pki.ca,
        group_id=f"{run}-group",
        users_topic=f"{run}.users",
        orders_topic=f"{run}.orders",
        out_users_topic=f"{run}.out.users",
        out_orders_topic=f"{run}.out.orders",
        relay_transactional_id=f"{run}-relay",
        relay_position_topic=f"{run}.relay-position",
        http_port=0,
        batch_max_wait_ms=50,
        retry_initial_ms=50,
        retry_max_ms=1_000,
    )
    admin = create_async_engine(
        database_server.url(),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args=postgres.connect_args(settings),
    )
    async with admin.connect() as connection:
        await connection.execute(text(f'CREATE DATABASE "{run}"'))
    await admin.dispose()
    migrated = await cli(settings, "db", "upgrade")
    assert migrated.code == 0, migrated
    return settings


@pytest.fixture
def no_refusal() -> Iterator[None]:
    """No refusal recorded before or after, and no watch on aiokafka's log left behind
    (it describes refusals with the settings it was given)."""
    kafka.REFUSAL.set(None)
    yield
    kafka.REFUSAL.set(None)
    library = logging.getLogger("aiokafka")
    for watch in [f for f in library.filters if isinstance(f, kafka._Watch)]:
        library.removeFilter(watch)


async def test_the_service_drains_and_relays_exactly_once_over_sasl_ssl_and_verified_tls(
    secure: Settings, tmp_path: Path
) -> None:
    await create_topics(secure)
    await create_out_topics(secure)
    users = [user_event(i, 1) for i in range(1, 41)]
    users += [user_event(i, 2, name="Ada") for i in range(1, 41, 3)]
    orders = [order_event(100 + i, i, 1) for i in range(1, 41)]
    await produce(secure, secure.users_topic, users)
    await produce(secure, secure.orders_topic, orders)
    applied = [*users, *orders]

    log = tmp_path / "service.log"
    async with Downstream(secure) as downstream, _service(secure, log) as service:
        await downstream.wait_for(len(applied), patience_s=120)
        assert service.returncode is None, log.read_text()
        published = await downstream.drain()

    assert service.returncode == 0, log.read_text()
    assert_exactly_once(published, [downstream_event_id(uuid.UUID(e["event_id"])) for e in applied])
    engine = make_engine(secure)
    try:
        async with engine.connect() as connection:
            users_there = (await connection.execute(text("SELECT count(*) FROM users"))).scalar()
            over_tls = (
                await connection.execute(
                    text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                )
            ).scalar()
    finally:
        await engine.dispose()
    assert users_there == 40
    assert over_tls is True
    password = secure.kafka_sasl_password
    assert password is not None
    assert password.get_secret_value() not in log.read_text()  # nothing it wrote holds it


async def test_a_wrong_kafka_password_is_one_line_that_says_so_from_every_command(
    secure: Settings,
) -> None:
    replay = ("replay", "--topic", secure.users_topic, "--partition", "0", "--from-offset", "0")
    commands = [("offsets",), ("run",), ("consume",), ("relay",), replay, ("demo",)]
    lines = await asyncio.gather(
        *(_refused(secure, *c, SYNC_KAFKA_SASL_PASSWORD="not-the-password") for c in commands)
    )
    for line in lines:
        assert line == (
            f"sync-service: Kafka at {secure.kafka_bootstrap} refused the connection: wrong "
            f"credentials: SASL SCRAM-SHA-512 authentication of {secure.kafka_sasl_username!r} "
            "failed (SYNC_KAFKA_SASL_USERNAME, SYNC_KAFKA_SASL_PASSWORD)"
        )


async def test_a_broker_certificate_from_another_ca_is_one_line_that_says_so(
    secure: Settings, pki: Pki
) -> None:
    line = await _refused(secure, "offsets", SYNC_KAFKA_SSL_CAFILE=str(pki.other_ca))
    assert line.startswith(
        f"sync-service: Kafka at {secure.kafka_bootstrap} refused the connection: "
        "server certificate not trusted by SYNC_KAFKA_SSL_CAFILE ("
    )


async def test_a_broker_certificate_for_another_host_name_is_one_line_that_says_so(
    secure: Settings, broker: SecureKafka
) -> None:
    elsewhere = broker.sasl_ssl.replace("localhost", "127.0.0.1")
    line = await _refused(secure, "offsets", SYNC_KAFKA_BOOTSTRAP=elsewhere)
    assert line.startswith(
        f"sync-service: Kafka at {elsewhere} refused the connection: host name mismatch: "
        "the server's certificate is not valid for '127.0.0.1'"
    )
    # Without the host name check the chain alone is verified, and that passes.
    await create_topics(secure)
    unchecked = await cli(
        secure, "offsets", SYNC_KAFKA_BOOTSTRAP=elsewhere, SYNC_KAFKA_SSL_CHECK_HOSTNAME="false"
    )
    assert unchecked.code == 0, unchecked


async def test_plaintext_to_the_tls_only_listener_is_one_line_that_says_so(
    secure: Settings,
) -> None:
    plaintext = secure.model_copy(
        update={
            "kafka_security_protocol": "PLAINTEXT",
            "kafka_sasl_mechanism": None,
            "kafka_sasl_username": None,
            "kafka_sasl_password": None,
            "kafka_ssl_cafile": None,
        }
    )
    line = await _refused(plaintext, "offsets")
    assert line == (
        f"sync-service: Kafka at {secure.kafka_bootstrap} refused the connection: protocol "
        "mismatch: the broker closed the connection without answering: does the listener "
        "expect TLS or SASL (SASL_SSL, SSL)? (SYNC_KAFKA_SECURITY_PROTOCOL=PLAINTEXT)"
    )


async def test_tls_to_a_plaintext_listener_is_one_line_that_says_so(
    secure: Settings, broker: SecureKafka
) -> None:
    line = await _refused(secure, "offsets", SYNC_KAFKA_BOOTSTRAP=broker.plaintext)
    assert "refused the connection: protocol mismatch: the TLS handshake" in line


async def test_a_database_certificate_for_another_host_name_fails_verify_full_only(
    secure: Settings, database_server: SecurePostgres
) -> None:
    database = make_url(secure.database_url).database or ""
    by_address = database_server.url(host="127.0.0.1", database=database)
    line = await _refused(secure, "dlq", "list", SYNC_DATABASE_URL=by_address)
    assert line == (
        f"sync-service: PostgreSQL at 127.0.0.1:{database_server.port} refused TLS: host name "
        "mismatch: the server's certificate is not valid for '127.0.0.1' (connect by a name "
        "the certificate lists) (SYNC_DATABASE_SSLMODE=verify-full)"
    )
    # verify-ca checks the chain only, so the same address is accepted.
    accepted = await cli(
        secure, "dlq", "list", SYNC_DATABASE_URL=by_address, SYNC_DATABASE_SSLMODE="verify-ca"
    )
    assert accepted.code == 0, accepted


async def test_a_database_certificate_from_another_ca_is_one_line_that_says_so(
    secure: Settings, pki: Pki, database_server: SecurePostgres
) -> None:
    line = await _refused(secure, "dlq", "list", SYNC_DATABASE_SSLROOTCERT=str(pki.other_ca))
    assert line.startswith(
        f"sync-service: PostgreSQL at localhost:{database_server.port} refused TLS: server "
        "certificate not trusted by SYNC_DATABASE_SSLROOTCERT ("
    )


async def test_plaintext_to_the_tls_only_database_is_one_line_that_says_so(
    secure: Settings, database_server: SecurePostgres
) -> None:
    plaintext = secure.model_copy(
        update={"database_sslmode": "disable", "database_sslrootcert": None}
    )
    line = await _refused(plaintext, "dlq", "list")
    assert line == (
        f"sync-service: PostgreSQL at localhost:{database_server.port} accepts only TLS "
        "connections: set SYNC_DATABASE_SSLMODE=verify-full (and SYNC_DATABASE_SSLROOTCERT)"
    )


async def test_mutual_tls_to_kafka_needs_the_client_certificate(
    secure: Settings, broker: SecureKafka, pki: Pki
) -> None:
    mutual = secure.model_copy(
        update={
            "kafka_bootstrap": broker.mutual_tls,
            "kafka_security_protocol": "SSL",
            "kafka_sasl_mechanism": None,
            "kafka_sasl_username": None,
            "kafka_sasl_password": None,
        }
    )
    line = await _refused(mutual, "offsets")
    assert line.startswith(
        f"sync-service: Kafka at {broker.mutual_tls} refused the connection: the server "
        "requires a client certificate ("
    )
    assert line.endswith(
        "set SYNC_KAFKA_SSL_CERTFILE and SYNC_KAFKA_SSL_KEYFILE (SYNC_KAFKA_SECURITY_PROTOCOL=SSL)"
    )
    with_certificate = mutual.model_copy(
        update={"kafka_ssl_certfile": pki.client_cert, "kafka_ssl_keyfile": pki.client_key}
    )
    await create_topics(with_certificate)
    accepted = await cli(with_certificate, "offsets", "--json")
    assert accepted.code == 0, accepted
    assert {p["topic"] for p in orjson.loads(accepted.stdout)["partitions"]} == {
        secure.users_topic,
        secure.orders_topic,
    }


async def test_a_database_that_authenticates_by_certificate(
    secure: Settings, pki: Pki, database_server: SecurePostgres
) -> None:
    database = make_url(secure.database_url).database or ""
    as_client = secure.model_copy(
        update={"database_url": database_server.url(database=database, user=CLIENT_USER)}
    )
    line = await _refused(as_client, "dlq", "list")
    assert line == (
        f"sync-service: PostgreSQL at localhost:{database_server.port} requires a client "
        "certificate: set SYNC_DATABASE_SSLCERT and SYNC_DATABASE_SSLKEY"
    )
    with_certificate = as_client.model_copy(
        update={"database_sslcert": pki.client_cert, "database_sslkey": pki.client_key}
    )
    accepted = await cli(with_certificate, "dlq", "list")
    assert accepted.code == 0, accepted


async def test_the_consumer_retries_a_refusing_broker_and_says_why(
    secure: Settings, no_refusal: None, caplog: pytest.LogCaptureFixture
) -> None:
    """While running, a refusal is retried as an outage is; the log and what `/readyz`
    shows (the `kafka` check) say why."""
    wrong = secure.model_copy(update={"kafka_sasl_password": SecretStr("not-the-password")})
    engine = make_engine(wrong)
    consumer = ChangeConsumer(wrong, BatchWriter(make_sessionmaker(engine), wrong.group_id, 10))
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING)
    kafka.watch(wrong)  # as the service does when it starts
    task = asyncio.create_task(consumer.run(stop))
    try:

        async def said_why() -> bool:  # the cause is a field of the outage's line
            return any("wrong credentials" in str(getattr(r, "cause", "")) for r in caplog.records)

        # The outage is told once with its cause (then summaries), and retried meanwhile.
        await wait_until(said_why, within=60, what="a line that names the cause")
        await asyncio.sleep(3)
        assert not task.done()
        assert kafka.REFUSAL.cause is not None
        assert kafka.REFUSAL.cause.startswith("wrong credentials: SASL SCRAM-SHA-512")
    finally:
        stop.set()
        await asyncio.wait([task], timeout=30)
        await engine.dispose()
    assert all("not-the-password" not in r.getMessage() for r in caplog.records)


async def test_refusals_in_aiokafka_s_own_reconnects_are_recorded(
    secure: Settings, no_refusal: None
) -> None:
    """aiokafka retries failed broker connections by itself and only logs why; the
    service's watch on those records turns a refusal among them into the cause."""
    wrong = secure.model_copy(update={"kafka_sasl_password": SecretStr("not-the-password")})
    library = logging.getLogger("aiokafka")
    level = library.level
    library.setLevel(logging.WARNING)  # as the service's logging leaves it
    kafka.watch(wrong)
    client = kafka.consumer(wrong, group_id=None, request_timeout_ms=10_000)
    try:
        with pytest.raises(KafkaConnectionError):
            await client.start()  # aiokafka's own start: no diagnosis of ours
        assert kafka.REFUSAL.cause is not None
        assert kafka.REFUSAL.cause.startswith("wrong credentials: SASL SCRAM-SHA-512")
    finally:
        await client.stop()
        library.setLevel(level)
        for watch in [f for f in library.filters if isinstance(f, kafka._Watch)]:
            library.removeFilter(watch)


async def test_readyz_shows_a_refusal_while_the_service_runs(
    secure: Settings, no_refusal: None
) -> None:
    settings = secure.model_copy(update={"http_port": free_port()})
    await create_topics(settings)
    wrong = secure.model_copy(update={"kafka_sasl_password": SecretStr("not-the-password")})
    ready = f"http://127.0.0.1:{settings.http_port}/readyz"
    async with running(settings), aiohttp.ClientSession() as http:

        async def answers(status: int) -> bool:
            try:
                async with http.get(ready) as response:
                    return response.status == status
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(lambda: answers(200), what="/readyz to answer 200")
        probe = kafka.consumer(wrong, group_id=None)
        with pytest.raises(kafka.KafkaRefused):
            await kafka.start(probe, wrong)
        await probe.stop()
        async with http.get(ready) as response:
            body = await response.json()
            assert response.status == 503
    assert body["checks"]["kafka"].startswith("wrong credentials: SASL SCRAM-SHA-512")
    assert "not-the-password" not in str(body)


async def test_a_running_service_says_why_kafka_refuses_it_and_recovers(
    broker: SecureKafka, database_server: SecurePostgres, pki: Pki, tmp_path: Path
) -> None:
    """The broker comes back presenting a certificate from another CA: the service keeps
    running and retrying, `/readyz` and the log say why; when the broker is right again,
    it carries on where it was, exactly once."""
    fresh = await _fresh(pki, broker, database_server)  # a relay of its own: its own outbox
    settings = fresh.model_copy(update={"http_port": free_port()})
    await create_topics(settings)
    await create_out_topics(settings)
    ids = range(1, 21)
    before = [user_event(i, 1) for i in ids]
    after = [user_event(i, 2, name="Ada") for i in ids]
    await produce(settings, settings.users_topic, before)
    log = tmp_path / "service.log"
    ready = f"http://127.0.0.1:{settings.http_port}/readyz"
    engine = make_engine(settings)
    async with _service(settings, log) as service, aiohttp.ClientSession() as http:

        async def readiness() -> tuple[int, dict[str, Any]]:
            try:
                async with http.get(ready) as response:
                    return response.status, await response.json()
            except aiohttp.ClientConnectionError:
                return 0, {}

        async def applied(version: int) -> bool:
            async with engine.connect() as connection:
                rows = await connection.execute(
                    text("SELECT count(*) FROM users WHERE id BETWEEN :a AND :b AND version = :v"),
                    {"a": ids[0], "b": ids[-1], "v": version},
                )
                return rows.scalar() == 20

        await wait_until(lambda: applied(1), within=90, what="the first 20 users")
        try:
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.start, pki.other_server_p12)

            async def refused() -> bool:
                status, body = await readiness()
                why = body.get("checks", {}).get("kafka") or ""
                return status == 503 and "server certificate not trusted" in why

            await wait_until(refused, within=120, what="/readyz to say why Kafka refuses")
            assert service.returncode is None, log.read_text()
        finally:
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.start)
        await produce(settings, settings.users_topic, after)
        await wait_until(lambda: applied(2), within=120, what="the next 20 users")

        async def ready_again() -> bool:
            return (await readiness())[0] == 200

        await wait_until(ready_again, within=120, what="/readyz to answer 200 again")
        async with Downstream(settings) as downstream:
            await downstream.wait_for(len(before) + len(after), patience_s=120)
            published = await downstream.drain()
    await engine.dispose()

    assert service.returncode == 0, log.read_text()
    assert_exactly_once(
        published, [downstream_event_id(uuid.UUID(e["event_id"])) for e in [*before, *after]]
    )
    said = [line for line in log.read_text().splitlines() if "refuses this client" in line]
    assert said, log.read_text()[-3000:]
    assert "server certificate not trusted by SYNC_KAFKA_SSL_CAFILE" in said[0]
    assert "Traceback" not in log.read_text()


async def _refused(settings: Settings, *args: str, **env: str) -> str:
    started = time.monotonic()
    outcome: Outcome = await cli(settings, *args, **env)
    assert time.monotonic() - started < REFUSAL_WITHIN_S, outcome
    return outcome.failed_with_one_line()


@contextlib.asynccontextmanager
async def _service(settings: Settings, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`sync-service --debug run` in a subprocess (every log line, the libraries' too),
    stopped with SIGTERM as an orchestrator does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(EXECUTABLE),
            "--debug",
            "run",
            env={**env, **as_environment(settings)},
            cwd=log.parent,  # no `.env` there
            stdout=out,
            stderr=out,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=60)
            except TimeoutError:
                process.kill()
                await process.wait()
