"""The soak's picture: resident memory of each service process, p99 latency and lag,
stacked against minutes, each fault a vertical line. matplotlib is a bench-only extra
(`pip install -e '.[bench]'`); without it the results file is still written."""

from __future__ import annotations

import json
import sys
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
    top = max((mb for series in processes(samples).values() for _, mb in series), default=1.0)
    rss.set_ylim(0, top * 1.35)  # room for the legend above the lines
    rss.legend(loc="upper left", fontsize=8, ncol=3)
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
    p99.set_ylabel(f"p99 per {record['settings']['sample_seconds']:g} s (ms)")
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
    s, machine = record["settings"], record["machine"]
    figure.suptitle(
        f"soak: {s['rate']:,.0f} events/s for {s['minutes']:g} min, "
        f"RSS after warm-up: {record['verdicts']['rss']} ({machine['logical_cpus']} CPUs, "
        f"load average {machine['load_average'][0]:g} at the end)",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _none_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def main() -> int:
    """`python -m bench.soak.plot RESULTS.json`: draw (again) the PNG beside a results file."""
    if len(sys.argv) != 2:
        print("usage: python -m bench.soak.plot RESULTS.json", file=sys.stderr)
        return 2
    path = Path(sys.argv[1])
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"soak: cannot read {path}: {error}", file=sys.stderr)
        return 2
    print(plot(record, path.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
