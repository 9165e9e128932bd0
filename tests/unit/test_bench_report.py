"""The benchmark's verdicts: percentiles, ratios within a run, the targets, and that a wrong
or failed contender never yields a figure to compare with."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from rich.console import Console

from bench.__main__ import parse_args
from bench.latency import latencies
from bench.report import Phase, distribution, goals, percentile, ratios, results, table


def _phase(name: str, events: int, seconds: float, **figures: object) -> Phase:
    return Phase(name, events=events, seconds=seconds, figures=dict(figures))


def _run() -> dict[str, Phase]:
    return {
        "sync_service": _phase("sync_service", 600_000, 20.0, peak_rss_bytes=250_000_000),
        "naive": _phase("naive", 20_000, 20.0),
        "bulk": _phase("bulk", 1_000_000, 50.0),
        "peer": _phase("peer", 990_000, 99.0),
        "quix": _phase("quix", 990_000, 49.5),
        "grown": _phase("grown", 600_000, 25.0),
        "debezium": _phase("debezium", 600_000, 21.0),
        "limit": _phase("limit", 1_000_000, 10.0),
        "latency": _phase("latency", 300_000, 60.0, to_row={"p99_ms": 70.0},
                          to_downstream={"p99_ms": 120.0}),
    }  # fmt: skip


def test_percentile_is_the_nearest_rank() -> None:
    values = [0.5, 0.1, 0.4, 0.2, 0.3]  # unsorted on purpose

    assert [percentile(values, q) for q in (20, 50, 60, 99, 100)] == [0.1, 0.3, 0.3, 0.5, 0.5]
    assert percentile(list(range(1, 101)), 95) == 95
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_distribution_in_milliseconds() -> None:
    assert distribution([0.010, 0.020, 0.030, 0.040]) == {
        "count": 4, "p50_ms": 20.0, "p95_ms": 40.0, "p99_ms": 40.0, "max_ms": 40.0,
    }  # fmt: skip
    assert distribution([]) == {"count": 0}


def test_ratios_compare_rates_within_the_run() -> None:
    assert ratios(_run()) == {
        "vs_naive": 30.0,  # 30,000 / 1,000 events/s
        "vs_bulk": 1.5,
        "vs_peer": 3.0,
        "vs_quix": 1.5,  # 30,000 / 20,000
        "share_of_limit": 0.3,
        "grown_over_empty": 0.8,  # 24,000 / 30,000: the grown target's rate as a share
        "debezium_over_native": 0.952,
    }


def test_a_wrong_or_failed_contender_has_no_figure_to_compare() -> None:
    phases = _run()
    phases["bulk"].status = "wrong"
    phases["peer"].status = "failed"

    assert phases["bulk"].events_per_s is None
    assert phases["bulk"].measured_events_per_s == 20_000
    within = ratios(phases)
    assert within["vs_bulk"] is None
    assert within["vs_peer"] is None
    assert within["vs_naive"] == 30.0


def test_goals_say_met_not_met_or_not_measured() -> None:
    phases = _run()
    del phases["latency"]

    verdicts = {goal.name: goal.met for goal in goals(phases)}

    assert verdicts == {
        "sync_service drain": True,
        "vs naive baseline": True,
        "vs bulk baseline": True,
        "vs Debezium JDBC sink": True,
        "vs Quix Streams sink": True,
        "share of the machine's limit": False,  # 30% < 40%
        "p99 produce -> row": None,
        "p99 produce -> downstream": None,
        "peak RSS of the service": True,
        "grown target / empty target": False,  # 80% < 85%
        "Debezium-format / native drain": True,  # 95% >= 90%
    }


def test_the_targets_are_the_issue_s() -> None:
    wants = {goal.name: goal.want for goal in goals(_run())}

    assert wants["vs Debezium JDBC sink"] == wants["vs Quix Streams sink"] == ">= 1.25 x"
    assert wants["share of the machine's limit"] == ">= 40% of limit"
    assert wants["p99 produce -> row"] == "<= 75 ms"
    assert wants["p99 produce -> downstream"] == "<= 100 ms"
    assert wants["grown target / empty target"] == ">= 85% of empty"
    assert wants["Debezium-format / native drain"] == ">= 90% of native"


def test_a_drain_slower_or_faster_than_its_bounds() -> None:
    phases = _run()
    phases["grown"].seconds = 23.5  # 25,532 events/s: 85.1% of 30,000
    phases["debezium"].seconds = 23.0  # 26,087 events/s: 87% of native
    phases["quix"].seconds = 25.0  # 39,600 events/s: sync_service is 0.76x of it

    verdicts = {goal.name: goal.met for goal in goals(phases)}

    assert verdicts["grown target / empty target"] is True
    assert verdicts["Debezium-format / native drain"] is False
    assert verdicts["vs Quix Streams sink"] is False


def test_a_ratio_just_short_of_its_target_is_not_met_though_it_rounds_to_it() -> None:
    phases = _run()
    phases["bulk"].seconds = 49.88  # 20,048 events/s: sync_service is 1.4964x of it

    assert ratios(phases)["vs_bulk"] == 1.5  # as a results file stores it
    [bulk] = [goal for goal in goals(phases) if goal.name == "vs bulk baseline"]
    assert bulk.met is False
    assert bulk.value == pytest.approx(1.4964, abs=1e-4)


def test_a_failed_grown_or_debezium_drain_has_no_share() -> None:
    phases = _run()
    phases["grown"].status = "wrong"
    del phases["debezium"]

    within = ratios(phases)

    assert within["grown_over_empty"] is None
    assert within["debezium_over_native"] is None
    assert within["vs_quix"] == 1.5


def test_latency_goals_use_the_p99() -> None:
    phases = _run()
    verdicts = {goal.name: goal.met for goal in goals(phases)}
    assert verdicts["p99 produce -> row"] is True  # 70 <= 75
    assert verdicts["p99 produce -> downstream"] is False  # 120 > 100

    phases["latency"].figures["to_row"] = {"p99_ms": 76.0}
    assert {g.name: g.met for g in goals(phases)}["p99 produce -> row"] is False


def test_the_run_is_not_ok_when_a_checked_contender_was_wrong() -> None:
    phases = _run()
    phases["sync_service"].status = "wrong"
    phases["sync_service"].problems = ["the tables' checksum differs from the expected"]

    record = results(started=_now(), command="python -m bench", machine_info=_MACHINE,
                     version_info={}, workload={"events": 1_000_000}, phases=phases)  # fmt: skip

    assert record["ok"] is False
    assert record["failures"] == ["sync_service: the tables' checksum differs from the expected"]
    assert record["phases"]["sync_service"]["events_per_s"] is None
    assert {t["name"]: t["met"] for t in record["targets"]}["sync_service drain"] is None


def test_the_table_shows_every_target_verdict() -> None:
    record = results(started=_now(), command="python -m bench", machine_info=_MACHINE,
                     version_info={}, workload={"events": 1_000_000}, phases=_run())  # fmt: skip
    console = Console(width=200, record=True)

    console.print(table(record))

    text = console.export_text()
    assert text.count("NOT met") == 3  # the limit share, the downstream p99, the grown target
    assert "30,000 ev/s" in text
    assert "30.00x" in text
    assert "peer: Quix Streams PostgreSQL sink" in text
    assert "1.50x" in text  # sync_service over the Quix Streams sink
    assert "80% of empty" in text
    assert "95% of native" in text


def test_a_skipped_phase_says_why() -> None:
    phases = _run()
    phases["debezium"] = Phase("debezium", status="skipped", notes=["no encoder for it"])
    record = results(started=_now(), command="python -m bench", machine_info=_MACHINE,
                     version_info={}, workload={"events": 1_000_000}, phases=phases)  # fmt: skip
    console = Console(width=200, record=True)

    console.print(table(record))

    assert "skipped; no encoder for it" in console.export_text()
    assert record["ok"] is True  # a skipped phase is no failure


def test_latencies_count_only_events_sent_after_the_warm_up_and_seen() -> None:
    sent = {"a": 10.0, "b": 11.0, "c": 12.0}
    seen = {"a": 10.5, "b": 11.25, "x": 13.0}  # "c" never seen, "x" never sent

    assert latencies(sent, seen, since=11.0) == [0.25]


def test_skip_names_are_checked() -> None:
    assert parse_args(["--skip", "peer,quix,grown,debezium"]).skip == {
        "peer", "quix", "grown", "debezium",
    }  # fmt: skip
    with pytest.raises(SystemExit):
        parse_args(["--skip", "kafka_connect"])


_MACHINE = {"cpu_model": "test CPU", "logical_cpus": 2}


def _now() -> datetime:
    return datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def test_other_work_on_the_machine_is_called_out() -> None:
    phases = _run()
    phases["sync_service"].figures["usage"] = {"other_cores_busy": 1.2}
    phases["bulk"].figures["usage"] = {"other_cores_busy": 0.1}
    record = results(started=_now(), command="python -m bench", machine_info=_MACHINE,
                     version_info={}, workload={"events": 1_000_000}, phases=phases)  # fmt: skip
    console = Console(width=200, record=True)

    console.print(table(record))

    assert record["interference"] == {"sync_service": 1.2, "bulk": 0.1}
    text = console.export_text()
    assert "sync_service 1.2" in text
    assert "bulk 0.1" not in text  # below a quarter of a core: not worth a word
