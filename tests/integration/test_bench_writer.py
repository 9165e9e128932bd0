"""`python -m bench.writer` shows a figure only for rounds that left the expected state."""

from __future__ import annotations

import json

import pytest

from bench import writer
from tests.conftest import Endpoints

pytestmark = pytest.mark.integration

_SMALL = ["--events", "3000", "--batch", "500", "--rounds", "1"]


@pytest.fixture(autouse=True)
def _server(endpoints: Endpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench.writer` makes its databases on the test server."""
    monkeypatch.setenv("SYNC_DATABASE_URL", endpoints.database_url)


def test_a_round_per_arm_is_checked_and_measured(capsys: pytest.CaptureFixture[str]) -> None:
    status = writer.main([*_SMALL, "--variant", "ALTER TABLE users SET (fillfactor = 70)"])

    assert status == 0
    found = json.loads(capsys.readouterr().out)
    assert found["batches"] == 6
    for arm in ("head", "variant"):
        figures = found["per_event"][arm]
        assert figures["write_us_per_event"]["best"] > 0
        assert figures["postgresql_cpu_us_per_event"]["best"] > 0


def test_a_variant_that_changes_the_outcome_fails_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A user already at a version no change reaches: every change to it is stale.
    squatter = (
        "INSERT INTO users (id, email, name, active, created_at, updated_at, version)"
        " VALUES (1, 'squatter@example.com', 'S', true, now(), now(), 1000000000000)"
    )

    status = writer.main([*_SMALL, "--variant", squatter])

    assert status == 1
    assert "checksum differs" in capsys.readouterr().err


def test_a_variant_the_server_refuses_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    status = writer.main([*_SMALL, "--variant", "ALTER TABLE no_such_table SET (fillfactor = 70)"])

    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the head round's progress line
    assert last.startswith("bench.writer: the variant's SQL was refused:")
    assert "no_such_table" in last


def test_empty_batches_are_measured_per_batch(capsys: pytest.CaptureFixture[str]) -> None:
    status = writer.main(["--empty", "20", "--rounds", "1"])

    assert status == 0
    found = json.loads(capsys.readouterr().out)
    assert (found["empty_batches"], found["partitions"]) == (20, 24)
    figures = found["per_batch"]["head"]
    assert figures["write_us_per_batch"]["best"] > 0
    assert figures["postgresql_cpu_us_per_batch"]["best"] > 0


def test_a_negative_count_of_empty_batches_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert writer.main(["--empty", "-1"]) == 2
    assert capsys.readouterr().err.startswith("bench.writer: --events, --batch and --rounds")
