"""Plotting: one PNG per run, each implementation's time per step beside the floor its bytes set at the
measured ceiling, so a reader sees at a glance how close each comes to the limit.

It reads result rows only (those of the run, or of results.jsonl), so it is apart from the measuring code.
matplotlib is an optional extra (`pip install 'fused_opt[plot]'`), imported only when a plot is drawn.

    python -m fused_opt.bench.plot [RESULTS.jsonl] --device cpu [--output PNG]

redraws the latest run of one device from the stored rows.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from .implementations import REFERENCE, TORCH_IMPLEMENTATIONS
from .report import implementation_label, load_warning, significant, table_title, user_results_dir

# fused_opt stands out; torch.optim's three share a hue, darkest for its fastest kind; peers get their own.
_COLORS = {
    REFERENCE: "#d62728",
    "torch-fused": "#1f4e99",
    "torch-foreach": "#5b8fd6",
    "torch-forloop": "#a9c6ee",
}
_PEER_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_FLOOR_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}
_ROW_INCHES = 0.2
_LEGEND_COLUMNS = 8


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise PlotUnavailable("matplotlib is not installed: pip install 'fused_opt[plot]' (or matplotlib) "
                              "to draw the plot") from exc
    return Figure, FigureCanvasAgg, Line2D, Patch


def latest_run(rows: list[dict], device: str) -> list[dict]:
    """The rows of `device`'s most recent run: a plot never mixes devices, nor runs taken at other times."""
    own = [row for row in rows if row.get("device") == device and "timestamp" in row]
    if not own:
        return []
    latest = max(row["timestamp"] for row in own)
    return [row for row in own if row["timestamp"] == latest]


def _color_map(rows: list[dict]) -> dict[str, str]:
    colors = dict(_COLORS)
    peers = sorted({row["implementation"] for row in rows} - set(colors)
                   - {row["implementation"] for row in rows if row["implementation"].startswith("probe")})
    for index, name in enumerate(peers):
        colors[name] = _PEER_COLORS[index % len(_PEER_COLORS)]
    return colors


def _lines(rows: list[dict]) -> list[tuple[str, dict | None]]:
    """The plot's rows top to bottom: a header per case, then its implementations (the probe left out: its
    bandwidth is what the floor line shows)."""
    lines = []
    previous = None
    for row in rows:
        if row["implementation"].startswith("probe"):
            continue
        case = f"{row['case']} {row['dtype']}"
        if case != previous:
            lines.append((case, None))
            previous = case
        lines.append((implementation_label(row), row))
    return lines


def plot_run(rows: list[dict], path: Path, warning: str | None = None) -> Path:
    """Draws one run's rows (one device) into `path`: per workload, horizontal bars of the median time per
    step with the min-max spread, the byte floor of each implementation as a dashed line, log time axis;
    `warning` (a busy machine, say) goes into the subtitle, in red."""
    Figure, FigureCanvasAgg, Line2D, Patch = _matplotlib()
    devices = {row["device"] for row in rows}
    if len(devices) != 1:
        raise ValueError(f"a plot shows one device's run; got rows of {sorted(devices)}")
    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    per_workload = {name: [row for row in rows if row["workload"] == name] for name in workloads}
    line_counts = [len(_lines(per_workload[name])) for name in workloads]
    height = sum(count * _ROW_INCHES + 0.9 for count in line_counts) + 1.5 + (0.2 if warning else 0)
    figure = Figure(figsize=(11, height))
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(len(workloads), 1, squeeze=False,
                                gridspec_kw={"height_ratios": [count + 4 for count in line_counts]})[:, 0]
    colors = _color_map(rows)

    for axes, name in zip(axes_list, workloads):
        lines = _lines(per_workload[name])
        labels = []
        times = []
        for y, (label, row) in enumerate(lines):
            labels.append(label)
            if row is None:
                continue
            if row["status"] != "ok":
                axes.text(0.005, y, f"{row['status']}", transform=axes.get_yaxis_transform(),
                          va="center", fontsize=7, color="gray", style="italic")
                continue
            median, low, high = row["ms_median"], row["ms_min"], row["ms_max"]
            times += [low, high]
            axes.barh(y, median, height=0.75, color=colors.get(row["implementation"], "gray"),
                      xerr=[[median - low], [high - median]], error_kw={"elinewidth": 0.8, "capsize": 2})
            if row.get("floor_ms") is not None:
                times.append(row["floor_ms"])
                axes.plot([row["floor_ms"]] * 2, [y - 0.5, y + 0.5], **_FLOOR_STYLE)
                label = f"{significant(median)} ms, {100 * row['frac_of_probe']:.0f}% of ceiling"
                # Right of both the whisker and the floor line, so that neither crosses the text.
                axes.text(max(high, row["floor_ms"]) * 1.06, y, label, va="center", fontsize=7)
        axes.set_yticks(range(len(lines)), labels, fontsize=8)
        for tick, (_, row) in zip(axes.get_yticklabels(), lines):
            if row is None:
                tick.set_fontweight("bold")
        axes.set_ylim(len(lines) - 0.5, -0.5)
        axes.set_xscale("log")
        if times:
            # Room on the right for the labels written after each bar.
            axes.set_xlim(min(times) / 1.5, max(times) * 4)
        axes.grid(axis="x", which="both", alpha=0.25)
        axes.set_title(table_title(per_workload[name]), fontsize=9, loc="left")
        axes.set_xlabel("ms per step (log scale): lower is better", fontsize=8)
        axes.tick_params(axis="x", labelsize=8)

    first = rows[0]
    ceiling = "device-to-device copy" if first["device"] == "cuda" else "in-place add"
    figure.suptitle(f"fused_opt benchmark on {first['device']} ({first['device_name']}), torch "
                    f"{first['torch_version']}, {first['timestamp']}\n"
                    f"bars: median time per step (lower is better), whiskers: min-max over rounds\n"
                    f"dashed: the floor, bytes the step must move / bandwidth of an {ceiling} measured in the "
                    f"same rounds\n"
                    f"% of ceiling above 100: the step moved its bytes faster than that {ceiling} did; the "
                    f"probe is a measured reference, not a bound",
                    fontsize=9, x=0.01, y=1 - 0.08 / height, ha="left", va="top")
    if warning:
        figure.text(0.01, 1 - 0.82 / height, f"warning: {warning}", color="#b00000", fontsize=9,
                    ha="left", va="top")
    present = list(dict.fromkeys(row["implementation"] for row in rows if row["implementation"] in colors))
    ordered = [name for name in (REFERENCE, *TORCH_IMPLEMENTATIONS) if name in present] + \
              [name for name in present if name not in _COLORS]
    handles = [Patch(color=colors[name], label=name) for name in ordered]
    handles.append(Line2D([], [], label="floor: bytes / ceiling", **_FLOOR_STYLE))
    columns = min(len(handles), _LEGEND_COLUMNS)
    legend_top = 0.8 + (0.2 if warning else 0)
    figure.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.01, 1 - legend_top / height), fontsize=8,
                  ncols=columns, frameon=False)
    figure.tight_layout()
    # After tight_layout, which would otherwise lay the axes over the titles and the legend.
    legend_rows = math.ceil(len(handles) / columns)
    figure.subplots_adjust(top=1 - (legend_top + 0.35 + 0.25 * legend_rows) / height)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_opt.bench.plot",
                                     description="Draws the latest run of one device from stored result rows.")
    parser.add_argument("results", type=Path, nargs="?", default=user_results_dir() / "results.jsonl",
                        help="result rows (default: the benchmark's own results folder, %(default)s)")
    parser.add_argument("--device", required=True, help="cpu or cuda: whose latest run to draw")
    parser.add_argument("--output", type=Path, help="PNG path (default: latest-<device>.png beside results)")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    run = latest_run(rows, args.device)
    if not run:
        parser.error(f"no rows of device {args.device!r} in {args.results}")
    output = args.output or args.results.parent / f"latest-{args.device}.png"
    try:
        plot_run(run, output, warning=load_warning(run[0].get("load_average")))
    except PlotUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"plot written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
