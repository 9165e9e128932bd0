"""The benchmark's drains without a server: the environment a run gives the service (its
input format among it), the second peer's progress totals, and a format nobody encodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.quix.phase import expected_totals
from bench.quix.rows import NULL, delete_row, upsert_row
from bench.service.formats import FORMATS, run_format
from bench.service.names import Run
from bench.workload import Workload
from sync_service.config import Settings


def _run(inbound_format: str = "native") -> Run:
    return Run("bench.x.y", Settings(group_id="bench.x.y.group", http_port=18080), inbound_format)


def test_a_run_names_its_own_group_and_port_and_only_a_foreign_format() -> None:
    native = _run().env()
    debezium = _run("debezium").env()

    assert native["SYNC_GROUP_ID"] == "bench.x.y.group"
    assert native["SYNC_HTTP_PORT"] == "18080"
    assert "SYNC_INBOUND_FORMAT" not in native
    assert debezium["SYNC_INBOUND_FORMAT"] == "debezium"


def test_the_quix_totals_are_the_expected_rows_versions_and_soft_deletes() -> None:
    expected = Workload.generate(3_000, seed=3).expected

    found = expected_totals(expected)

    for table, lines in (("users", expected.users), ("orders", expected.orders)):
        rows, versions, deleted = found[table]
        assert rows == len(lines)
        assert versions > rows  # every row has a version of at least 1, many more
        assert 0 < deleted < rows


def test_the_quix_rows_keep_nulls_and_soft_delete() -> None:
    upsert = {"op": "upsert", "version": 3, "occurred_at": "2026-01-01T00:00:00Z",
              "data": {"id": 7, "email": "a@example.com", "country": None}}  # fmt: skip
    delete = {"op": "delete", "version": 4, "occurred_at": "2026-01-02T00:00:00Z",
              "data": {"id": 7}}  # fmt: skip

    row = upsert_row(upsert)

    assert row["country"] is NULL  # the sink would leave a None field out
    assert row["version"] == 3
    assert row["email"] == "a@example.com"
    assert delete_row(delete) == {"id": 7, "version": 4, "deleted_at": "2026-01-02T00:00:00Z"}


async def test_a_format_without_an_encoder_is_skipped_with_its_reason() -> None:
    assert "native" in FORMATS

    phase = await run_format(None, Workload.generate(10, seed=1), "nonesuch")  # type: ignore[arg-type]

    assert phase.status == "skipped"
    assert "nonesuch" in phase.notes[0]


@pytest.fixture(autouse=True)
def _no_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # Settings() must not read a developer's .env
