"""The soak's picture: resident memory of each service process, p99 latency and lag,
stacked against minutes, each fault a vertical line. matplotlib is a bench-only extra
(`pip install -e '.[bench]'`); without it the results file is still written."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.soak.summary import processes


def plot(record: Mapping[str, Any], path: Path) -> Path:
    """Draw `record` (a soak's results) to the PNG at `path`; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = record["samples"]
    minutes = [s["t"] / 60.0 for s in samples]
    figure, (rss, p99, lag) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True, dpi=90)
    colours = {"consume-1": "tab:blue", "consume-2": "tab:orange", "relay": "tab:green"}
    labelled: set[str] = set()
    for key, series in processes(samples).items():
        role = key.split("#")[0]
        rss.plot(
            [t / 60.0 for t, _ in series],
            [mb for _, mb in series],
            color=colours.get(role, "grey"),
            linewidth=1.2,
            label=None if role in labelled else role,
        )
        labelled.add(role)
    rss.set_ylabel("RSS (MB)")
    rss.set_ylim(bottom=0)
    rss.legend(loc="lower right", fontsize=8, ncol=3)
    for name, colour, label in (
        ("commit", "tab:purple", "send -> committed"),
        ("downstream", "tab:red", "send -> downstream event"),
    ):
        p99.plot(
            minutes,
            [_none_nan(s["latency"][name]["p99_ms"]) for s in samples],
            color=colour,
            linewidth=1.0,
            label=label,
        )
    p99.set_ylabel("p99 latency (ms)")
    p99.set_yscale("log")
    p99.legend(loc="upper right", fontsize=8)
    lag.plot(minutes, [s["lag"] for s in samples], color="tab:brown", linewidth=1.0)
    lag.set_ylabel("lag (records)")
    lag.set_xlabel("minutes since the load started")
    warmup = record["settings"]["warmup_minutes"]
    for axes in (rss, p99, lag):
        axes.grid(alpha=0.3)
        axes.axvspan(0, warmup, color="grey", alpha=0.08, linewidth=0)
        for fault in record["faults"]:
            axes.axvline(fault["at_s"] / 60.0, color="black", linestyle="--", linewidth=0.8)
    for fault in record["faults"]:
        rss.annotate(
            f"{fault['kind']}\n{fault['target']}",
            (fault["at_s"] / 60.0, 0),
            xytext=(3, 4),
            textcoords="offset points",
            fontsize=7,
        )
    s = record["settings"]
    figure.suptitle(
        f"soak: {s['rate']:,.0f} events/s for {s['minutes']:g} min, "
        f"RSS after warm-up: {record['verdicts']['rss']} (loaded, shared machine)",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _none_nan(value: float | None) -> float:
    return float("nan") if value is None else value
