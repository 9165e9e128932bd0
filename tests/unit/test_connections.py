"""Connection settings: one place builds every client, settings that cannot be meant are
refused with one line, and refusals read as what they are."""

from __future__ import annotations

import ast
import logging
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.errors import IllegalSaslStateError, KafkaConnectionError, SaslAuthenticationFailed
from cryptography.hazmat.primitives import serialization
from pydantic import SecretStr, ValidationError

from sync_service.config import Settings
from sync_service.connections import kafka, postgres, tls
from sync_service.errors import UserError

PACKAGE = Path(__file__).resolve().parents[2] / "sync_service"
KAFKA_CLIENTS = {"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"}
BUILDER = PACKAGE / "connections" / "kafka.py"
ENGINE_PLACE = PACKAGE / "db" / "engine.py"


def _called_names(tree: ast.AST) -> set[tuple[str, int]]:
    calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else None
            if isinstance(function, ast.Name):
                name = function.id
            if name is not None:
                calls.add((name, node.lineno))
    return calls


def test_every_kafka_client_is_built_in_one_place() -> None:
    """A client built anywhere else would miss TLS and SASL: it could not reach a
    production broker, or would reach one it must not."""
    outside = []
    for module in PACKAGE.rglob("*.py"):
        if module == BUILDER:
            continue
        for name, line in _called_names(ast.parse(module.read_text(), str(module))):
            if name in KAFKA_CLIENTS:
                outside.append(f"{module.relative_to(PACKAGE.parent)}:{line} {name}(...)")
    assert not outside, "build Kafka clients with sync_service.connections.kafka: " + ", ".join(
        outside
    )
    assert {name for name, _ in _called_names(ast.parse(BUILDER.read_text()))} >= KAFKA_CLIENTS


def test_every_database_engine_is_built_in_one_place() -> None:
    outside = []
    for module in PACKAGE.rglob("*.py"):
        if module == ENGINE_PLACE:
            continue
        tree = ast.parse(module.read_text(), str(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                owner = node.func.value if isinstance(node.func, ast.Attribute) else None
                direct = name in {"create_async_engine", "create_engine"}
                raw = name == "connect" and isinstance(owner, ast.Name) and owner.id == "asyncpg"
                if direct or raw:
                    outside.append(f"{module.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not outside, "build engines with sync_service.db.engine.make_engine: " + ", ".join(
        outside
    )


def _sasl_ssl(**overrides: object) -> Settings:
    fields: dict[str, object] = {
        "kafka_bootstrap": "broker-1:9093,broker-2:9093",
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "sync",
        "kafka_sasl_password": SecretStr("s3cret"),
    }
    fields.update(overrides)
    return Settings(**fields)  # type: ignore[arg-type]


def test_an_empty_connection_setting_is_an_unset_one() -> None:
    settings = Settings(kafka_sasl_mechanism="", kafka_ssl_cafile="", database_sslmode="")
    assert settings.kafka_sasl_mechanism is None
    assert settings.kafka_ssl_cafile is None
    assert settings.database_sslmode is None


def test_plaintext_options_carry_no_tls_and_no_sasl() -> None:
    options = kafka.client_options(Settings(kafka_bootstrap="localhost:9092"))
    assert options == {"bootstrap_servers": "localhost:9092", "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_options_verify_the_server_and_its_host_name(tmp_path: Path) -> None:
    options = kafka.client_options(_sasl_ssl())
    context = options.pop("ssl_context")
    assert options == {
        "bootstrap_servers": "broker-1:9093,broker-2:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "sync",
        "sasl_plain_password": "s3cret",
    }
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True


def test_host_name_checking_can_be_turned_off_but_not_verification(tmp_path: Path) -> None:
    context = kafka.client_options(_sasl_ssl(kafka_ssl_check_hostname=False))["ssl_context"]
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED


async def test_each_client_gets_the_options() -> None:
    settings = _sasl_ssl()
    clients = [
        kafka.consumer(settings, group_id=None)._client,
        kafka.producer(settings, acks="all").client,
        kafka.admin(settings)._client,
    ]
    for client in clients:
        assert client._bootstrap_servers == "broker-1:9093,broker-2:9093"
        assert client._security_protocol == "SASL_SSL"
        assert client._sasl_plain_password == "s3cret"
        assert client._ssl_context.check_hostname is True


def test_the_password_is_never_shown_by_the_settings(tmp_path: Path) -> None:
    settings = _sasl_ssl()
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"kafka_security_protocol": "SASL_SSL"},
            "SYNC_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs SYNC_KAFKA_SASL_MECHANISM, "
            "SYNC_KAFKA_SASL_USERNAME, SYNC_KAFKA_SASL_PASSWORD",
        ),
        (
            {"kafka_sasl_username": "sync", "kafka_sasl_password": "x"},
            "SYNC_KAFKA_SASL_USERNAME, SYNC_KAFKA_SASL_PASSWORD set, but "
            "SYNC_KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use SASL: set it to SASL_SSL",
        ),
        ({"kafka_ssl_cafile": "/no/such/ca.pem"}, "no such file: /no/such/ca.pem"),
        (
            {"database_sslmode": "disable", "database_sslrootcert": __file__},
            "SYNC_DATABASE_SSLROOTCERT set, but SYNC_DATABASE_SSLMODE is disable: "
            "set it to verify-full",
        ),
        (
            {"database_sslmode": "require", "database_sslrootcert": __file__},
            "SYNC_DATABASE_SSLROOTCERT set, but SYNC_DATABASE_SSLMODE=require does not verify "
            "the server: set it to verify-full",
        ),
        (
            {"database_sslmode": "verify-full", "database_sslcert": __file__},
            "SYNC_DATABASE_SSLCERT and SYNC_DATABASE_SSLKEY go together",
        ),
    ],
)
def test_settings_that_cannot_be_meant_are_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(**fields)  # type: ignore[arg-type]
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("variables", "line"),
    [
        (
            {"SYNC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SYNC_KAFKA_SASL_MECHANISM": "PLAIN"},
            "sync-service: bad settings: SYNC_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs "
            "SYNC_KAFKA_SASL_USERNAME, SYNC_KAFKA_SASL_PASSWORD",
        ),
        (
            {"SYNC_KAFKA_SECURITY_PROTOCOL": "SASL-SSL"},
            "sync-service: bad setting SYNC_KAFKA_SECURITY_PROTOCOL: Input should be "
            "'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or 'SASL_SSL'",
        ),
        (
            {"SYNC_DATABASE_SSLMODE": "verify-full", "SYNC_DATABASE_SSLROOTCERT": "/nope.pem"},
            "sync-service: bad setting SYNC_DATABASE_SSLROOTCERT: no such file: /nope.pem",
        ),
    ],
)
def test_a_bad_connection_setting_is_one_line_before_anything_connects(
    variables: dict[str, str], line: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("sync-service")), "offsets"],
        env={**env, **variables},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [line]


@pytest.mark.parametrize(
    ("mode", "verified", "host_checked"),
    [("require", False, False), ("verify-ca", True, False), ("verify-full", True, True)],
)
def test_database_sslmodes_read_as_libpq_s(mode: str, verified: bool, host_checked: bool) -> None:
    context = postgres.ssl_argument(Settings(database_sslmode=mode))
    assert isinstance(context, ssl.SSLContext)
    assert (context.verify_mode == ssl.CERT_REQUIRED) is verified
    assert context.check_hostname is host_checked


def test_database_tls_left_to_the_url_or_turned_off() -> None:
    assert postgres.connect_args(Settings()) == {}
    assert postgres.connect_args(Settings(database_sslmode="disable")) == {"ssl": False}


def _verification_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code = code
    error.verify_message = message
    return error


def test_tls_failures_read_as_their_cause() -> None:
    mismatch = _verification_error(62, "Hostname mismatch, certificate is not valid for 'x'.")
    untrusted = _verification_error(20, "unable to get local issuer certificate")
    assert tls.explain(mismatch, "x", "SYNC_KAFKA_SSL_CAFILE", "", has_cert=False) == (
        "host name mismatch: the server's certificate is not valid for 'x' "
        "(connect by a name the certificate lists)"
    )
    assert tls.explain(untrusted, "x", "SYNC_KAFKA_SSL_CAFILE", "", has_cert=False) == (
        "server certificate not trusted by SYNC_KAFKA_SSL_CAFILE "
        "(unable to get local issuer certificate)"
    )
    assert (
        tls.explain(ConnectionRefusedError(), "x", "SYNC_KAFKA_SSL_CAFILE", "", has_cert=False)
        is None
    )


def test_kafka_refusals_read_as_their_cause(tmp_path: Path) -> None:
    settings = _sasl_ssl()
    assert kafka.explain(SaslAuthenticationFailed(), "broker-1", settings).startswith(
        "wrong credentials: SASL SCRAM-SHA-512 authentication of 'sync' failed"
    )
    assert kafka.explain(IllegalSaslStateError(), "broker-1", settings).startswith(
        "protocol mismatch: the listener does not use SASL"
    )
    closed = KafkaConnectionError("Connection at broker-1:9093 closed")
    plaintext = Settings(kafka_bootstrap="broker-1:9093")
    assert kafka.explain(closed, "broker-1", plaintext) == (
        "protocol mismatch: the broker closed the connection without answering: does the "
        "listener expect TLS or SASL (SASL_SSL, SSL)? (SYNC_KAFKA_SECURITY_PROTOCOL=PLAINTEXT)"
    )
    assert "s3cret" not in str(kafka.KafkaRefused(settings.kafka_bootstrap, "x"))


async def test_a_broker_that_is_not_there_is_an_outage_not_a_refusal() -> None:
    assert await kafka.diagnose(Settings(kafka_bootstrap="localhost:1")) is None


def test_every_setting_the_deployment_files_name_exists() -> None:
    """A misspelt name in a manifest would be silently ignored (extra="ignore")."""
    deploy = PACKAGE.parent / "deploy"
    known = {f"SYNC_{name.upper()}" for name in Settings.model_fields}
    compose_only = {"SYNC_PARTITIONS"}  # the compose file's own variable (kafka-init)
    named = {
        (path.name, name)
        for path in [*deploy.rglob("*.yaml"), deploy / "managed.env.example"]
        for name in re.findall(r"\bSYNC_[A-Z0-9_]+\b", path.read_text())
    }
    assert named, "no SYNC_* settings found under deploy/"
    unknown = sorted((f, n) for f, n in named if n not in known | compose_only)
    assert not unknown


def _aiokafka_error(*args: object) -> logging.LogRecord:
    return logging.LogRecord("aiokafka", logging.ERROR, "client.py", 1, "%s: %s", args, None)


def test_the_watch_records_refusals_in_aiokafka_s_reconnects_but_not_outages() -> None:
    kafka.REFUSAL.set(None)
    watch = kafka._Watch(_sasl_ssl())
    try:
        watch.filter(_aiokafka_error(1, KafkaConnectionError("Connection at b:9093 closed")))
        watch.filter(_aiokafka_error(1, ssl.SSLEOFError(8, "EOF occurred")))
        assert kafka.REFUSAL.cause is None
        assert watch.filter(_aiokafka_error(1, SaslAuthenticationFailed())) is True
        assert kafka.REFUSAL.cause is not None
        assert kafka.REFUSAL.cause.startswith("wrong credentials")
    finally:
        kafka.REFUSAL.set(None)


def test_a_refusal_no_longer_seen_no_longer_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    refusals = kafka._Refusals()
    assert refusals.set("wrong credentials") is True
    assert refusals.set("wrong credentials") is False
    assert refusals.cause == "wrong credentials"
    monkeypatch.setattr(kafka._Refusals, "FRESH_S", -1.0)
    assert refusals.cause is None


def test_tls_files_that_cannot_be_used_are_one_line(tmp_path: Path) -> None:
    from tests.integration.private_servers import make_pki

    pki = make_pki(tmp_path / "pki")
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    encrypted = tmp_path / "client.key"
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert tls.client_context(pki.ca, pki.client_cert, pki.client_key).verify_mode
    with pytest.raises(UserError, match=f"^cannot use the CA file {not_pem}: "):
        tls.client_context(not_pem)
    with pytest.raises(UserError, match="the key is encrypted; give an unencrypted"):
        tls.client_context(None, pki.client_cert, encrypted)
    with pytest.raises(UserError, match="are not a PEM certificate and its private key"):
        tls.client_context(None, not_pem, not_pem)
