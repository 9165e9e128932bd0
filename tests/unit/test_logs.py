"""The log's two formats and its secrets: text stays `time LEVEL logger: message` with the
event's fields as key=value; JSON is one object per line with time, level, logger and
message first; a registered secret never comes out of a record, whatever part of it
carries it; URLs and the settings' repr show no password."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr

from sync_service.config import Settings
from sync_service.observability.logging import OffsetRange, formatter
from sync_service.observability.redact import (
    RedactSecrets,
    masked_url,
    redact,
    register,
    secrets_of,
)
from sync_service.retry import describe


@pytest.fixture
def canary() -> str:
    value = f"canary-{uuid.uuid4().hex[:12]}"
    register([value])
    return value


def _logger(fmt: str) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(formatter(fmt))  # type: ignore[arg-type]
    logger = logging.getLogger(f"sync_service.test.{uuid.uuid4().hex[:6]}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)


@pytest.fixture
def text_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    yield from _logger("text")


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    yield from _logger("json")


BATCH = {
    "partitions": [OffsetRange("cdc.users", 0, 10, 19), OffsetRange("cdc.orders", 3, 5, 5)],
    "applied": 9,
    "stale": 1,
    "waiting": 0,
    "dead_letters": 1,
}


def test_text_is_the_old_line_with_fields_as_key_value(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = text_log
    logger.info("batch written", extra=BATCH)
    logger.warning("write batch failed, retrying", extra={"cause": "TimeoutError (while x)"})
    first, second = stream.getvalue().splitlines()
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d INFO {logger.name}: batch written "
        r"partitions=cdc\.users\[0\]:10-19,cdc\.orders\[3\]:5-5 applied=9 stale=1 waiting=0 "
        r"dead_letters=1",
        first,
    ), first
    assert second.endswith('retrying cause="TimeoutError (while x)"'), second


def test_json_is_one_object_per_line_with_the_fields(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_log
    logger.info("batch written", extra=BATCH)
    try:
        raise TimeoutError
    except TimeoutError:
        logger.error("it failed: %s", "badly", exc_info=True)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    batch, failure = map(orjson.loads, lines)
    assert list(batch)[:4] == ["time", "level", "logger", "message"]
    assert batch["level"] == "info"
    assert batch["logger"] == logger.name
    assert batch["message"] == "batch written"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", batch["time"])
    assert batch["partitions"] == [
        {"topic": "cdc.users", "partition": 0, "first": 10, "last": 19},
        {"topic": "cdc.orders", "partition": 3, "first": 5, "last": 5},
    ]
    assert (batch["applied"], batch["stale"], batch["dead_letters"]) == (9, 1, 1)
    assert failure["message"] == "it failed: badly"
    assert failure["exception"].startswith("Traceback")
    assert "TimeoutError" in failure["exception"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_secret_in_any_part_of_a_record_is_redacted(canary: str, fmt: str) -> None:
    (logger, stream) = next(_logger(fmt))
    logger.info(f"in the message {canary}")
    logger.info("in the arguments %s", f"x{canary}x")
    logger.info("in a field", extra={"url": f"postgresql://u:{canary}@h/db"})
    try:
        raise RuntimeError(f"in the exception {canary}")
    except RuntimeError:
        logger.exception("with a traceback")
    output = stream.getvalue()
    assert canary not in output
    assert output.count("***") == 4, output  # the traceback's source line shows `{canary}`


def test_url_encoded_secrets_are_redacted_too() -> None:
    secret = f"p@ss/{uuid.uuid4().hex[:6]} w"
    register([secret])
    assert redact(f"postgresql://u:p%40ss%2F{secret[5:11]}%20w@h/db") == "postgresql://u:***@h/db"
    assert redact(secret) == "***"


def test_urls_and_settings_show_no_password(canary: str) -> None:
    url = f"postgresql+asyncpg://sync:{canary}@db.example:5432/sync"
    settings = Settings(database_url=url)
    assert masked_url(url) == "postgresql+asyncpg://sync:***@db.example:5432/sync"
    assert canary not in repr(settings)
    assert canary not in str(settings)
    assert "sync:***@db.example" in repr(settings)
    assert secrets_of(settings) == [canary]
    assert masked_url("not a url at all " + canary) == "<a database URL that does not parse>"


def test_an_error_without_a_message_is_described_by_its_type(canary: str) -> None:
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ConnectionRefusedError(111, f"refused {canary}")) == (
        "ConnectionRefusedError: [Errno 111] refused ***"
    )


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SYNC_LOG_FORMAT", "jsn", "Input should be 'text' or 'json'"),
        (
            "SYNC_LOG_LEVEL",
            "infoo",
            "Input should be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'",
        ),
        ("SYNC_LOG_OUTAGE_SUMMARY_S", "0", "Input should be greater than 0"),
    ],
)
def test_a_misspelt_log_setting_is_one_line(variable: str, value: str, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    process = subprocess.run(
        [str(Path(sys.executable).with_name("sync-service")), "offsets"],
        env={**env, variable: value},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == 2
    assert process.stderr.splitlines() == [f"sync-service: bad setting {variable}: {expected}"]
    assert Settings(log_level="warning").log_level == "WARNING"  # any case


class _WithKeyPassword(Settings):
    kafka_ssl_key_password: str = ""  # password-like by its name, though not a SecretStr


def test_every_password_like_setting_is_a_secret(canary: str) -> None:
    settings = _WithKeyPassword(
        database_url="postgresql+asyncpg://sync@db/sync",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="sync",
        kafka_sasl_password=SecretStr(f"sasl-{canary}"),
        kafka_ssl_key_password=f"key-{canary}",
    )
    assert sorted(secrets_of(settings)) == [f"key-{canary}", f"sasl-{canary}"]
    assert canary not in repr(settings)
    assert "kafka_ssl_key_password='***'" in repr(settings)
