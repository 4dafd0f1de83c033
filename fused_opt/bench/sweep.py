"""The cost curve, `python -m fused_opt.bench --sweep`: time per AdamW fp32 step of fused_opt and torch.optim's
for-loop, foreach and fused

- against total params on one tensor (1e3 to 1e8 elements; "numel"),
- against tensor count at a fixed total (1 to 16,384 tensors; "tensors"),
- and the host cost per param: N one-element params, whose bytes are nothing, so the time is the work done per
  param around the op call ("host"), with fused_opt also clipping (max_grad_norm) and under its GradScaler.

It answers from what model size on fused_opt pays off and where each implementation stands against the byte
floor. Every point is measured by harness.py in interleaved rounds, the numel and tensors points beside the
bandwidth probe that sets their floor; no step is profiled for its launches, which the for-loop's ops on
thousands of tensors would make take minutes. The rows (report.ROW_KEYS) go to sweep.jsonl, apart from results.jsonl
so that the main benchmark's plot never takes a sweep for its latest run; the tables to sweep-<device>.md and
the log-log plot to sweep-<device>.png.
"""

import gc
import itertools
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from . import harness, implementations, plot, report
from .implementations import CASES, REFERENCE
from .progress import ProgressBar
from .workloads import Workload

ADAMW = next(case for case in CASES if case.name == "adamw" and case.dtype == "fp32")

NUMEL, TENSORS, HOST = "numel", "tensors", "host"
PANELS = (NUMEL, TENSORS, HOST)

NUMEL_SIZES = tuple(10**k for k in range(3, 9))
# A run to 1e8 peaked at 6.9 GB resident on CPU (four implementations, the shared grads, the probe): a CPU run
# stops at 1e7 unless asked.
DEFAULT_MAX_NUMEL = {"cpu": 10**7, "cuda": 10**8}
TINY_MAX_NUMEL = 10**5
TENSOR_COUNTS = tuple(4**k for k in range(8))  # 1 to 16,384
TENSORS_TOTAL = 2**22
TINY_TENSOR_COUNTS = TENSOR_COUNTS[:5]
TINY_TENSORS_TOTAL = 2**14
HOST_COUNTS = (1, 16, 148, 1024, 4096)  # 148: GPT-2 small's tensor count
TINY_HOST_COUNTS = HOST_COUNTS[:3]

CLIP_NORM = 1.0
CLIPPED = "fused_opt-clip"
SCALED = "fused_opt-scaler"
HOST_NOTES = {
    CLIPPED: f"fused_opt.AdamW(max_grad_norm={CLIP_NORM:g})",
    SCALED: "fused_opt.GradScaler.step(fused_opt.AdamW) and update(), scale 1.0",
}

# Issue #13's targets for the host cost, checked as ratios within the run, never as timed assertions.
TARGET_COUNT = 148
TARGET_US_AT_COUNT = 100.0
TARGET_US_PER_PARAM = 0.5
TARGET_SPEEDUP_OVER_TORCH_FUSED = 8.0
TARGET_PIPELINE_RATIO = 1.5

# A small step is timed several times a round, so that a round's median is not one sample of timer and
# scheduler noise; the count falls with the step's size, so that rounds of large steps stay short.
STEP_BUDGET = {NUMEL: 2**20, TENSORS: 2**20, HOST: 2048}  # elements, elements, params
MAX_STEPS = 20
TINY_MAX_STEPS = 5


@dataclass(frozen=True)
class Point:
    panel: str
    workload: Workload
    steps: int

    @property
    def x(self) -> int:
        """The panel's abscissa: total params on one tensor, else the tensor count."""
        return self.workload.numel if self.panel == NUMEL else self.workload.num_tensors


def points(device_type: str, *, tiny: bool, max_numel: int | None, min_steps: int,
           panels: tuple[str, ...] = PANELS) -> list[Point]:
    """What a sweep measures, in order; `max_numel` caps the numel panel (default by device, or tiny)."""
    max_numel = max_numel or (TINY_MAX_NUMEL if tiny else DEFAULT_MAX_NUMEL[device_type])
    total = TINY_TENSORS_TOTAL if tiny else TENSORS_TOTAL
    max_steps = TINY_MAX_STEPS if tiny else MAX_STEPS

    def point(panel: str, shapes: tuple, note: str, units: int) -> Point:
        steps = max(min_steps, min(max_steps, math.ceil(STEP_BUDGET[panel] / units)))
        return Point(panel, Workload(f"sweep-{panel}", shapes, note), steps)

    planned = []
    if NUMEL in panels:
        planned += [point(NUMEL, ((numel,),), "one tensor", numel) for numel in NUMEL_SIZES if numel <= max_numel]
    if TENSORS in panels:
        planned += [point(TENSORS, ((total // count,),) * count,
                          f"{count} tensors of {total // count} elements, {total} in all", total)
                    for count in (TINY_TENSOR_COUNTS if tiny else TENSOR_COUNTS)]
    if HOST in panels:
        planned += [point(HOST, ((1,),) * count, f"{count} one-element params: the host cost", count)
                    for count in (TINY_HOST_COUNTS if tiny else HOST_COUNTS)]
    return planned


def _host_builders(fused_opt) -> list[tuple[str, Callable[[list[torch.nn.Parameter]], implementations.Prepared]]]:
    """(name, build(params) -> implementations.Prepared) of the host panel's contenders."""
    builders = []
    for implementation in implementations.core_implementations(fused_opt):
        make = partial(implementation.make_optimizer, ADAMW)
        builders.append((implementation.name, partial(implementations.bare_step, make)))
        if implementation.name == REFERENCE:
            clipped = partial(implementation.make_optimizer, ADAMW, max_grad_norm=CLIP_NORM)
            builders.append((CLIPPED, partial(implementations.bare_step, clipped)))
            builders.append((SCALED, partial(implementations._fused_scaler_step(fused_opt), make)))
    return builders


def _host_contenders(fused_opt, workload: Workload, device: torch.device, seed: int,
                     progress) -> list[harness.Contender]:
    """Each contender over its own copy of the params; the grads, which none of them writes, are shared."""
    params, grads = implementations.make_tensors(workload, ADAMW.torch_dtype, device, seed)
    contenders = []
    for name, build in _host_builders(fused_opt):
        contender = harness.Contender(name, ADAMW.dtype, workload.numel, ADAMW.bytes_per_param, step=None)
        progress(f"building {name}")
        own = [torch.nn.Parameter(p.clone()) for p in params]
        for param, grad in zip(own, grads):
            param.grad = grad
        try:
            prepared = build(own)
            contender.step, contender.optimizer = prepared.step, prepared.optimizer
        except Exception as exc:
            contender.drop("error", exc)
        contenders.append(contender)
    return contenders


def _measure_host(point: Point, fused_opt, device: torch.device, *, rounds: int, warmup: int, seed: int,
                  progress) -> list[harness.Result]:
    """The host panel's contenders in interleaved rounds, without the probe: their bytes are nothing."""
    contenders = _host_contenders(fused_opt, point.workload, device, seed, progress)
    clock = harness.Clock(device)
    harness.warm_up(contenders, clock, warmup, device, progress, launches=False)
    harness.run_rounds(contenders, clock, rounds, point.steps, progress)
    results = harness.summarize(contenders, None)
    del contenders
    # torch.optim's for-loop optimizers sit in reference cycles, which only the collector frees.
    gc.collect()
    return results


def measure(planned: list[Point], fused_opt, device: torch.device, context: dict, *, rounds: int, warmup: int,
            seed: int, bar: ProgressBar, on_panel) -> list[dict]:
    """Measures every point in order; `on_panel(rows)` is called with each panel's rows once it is done."""
    candidates = implementations.core_implementations(fused_opt)
    host_contenders = len(_host_builders(fused_opt))
    probe = None
    rows, panel_rows = [], []
    for index, point in enumerate(planned):
        bar.begin(f"{point.panel} {point.x}")
        if point.panel == HOST:
            total = (2 + rounds) * host_contenders  # builds and warm-ups, then the rounds
            done = itertools.count()
            results = _measure_host(point, fused_opt, device, rounds=rounds, warmup=warmup, seed=seed,
                                    progress=lambda label: bar.update(next(done) / total, label))
        else:
            if probe is None or probe.numel != harness.probe_numel(point.workload.numel):
                probe = None  # freed before the next one is allocated
                probe = harness.Probe(point.workload.numel, device)
            results = harness.measure_case(
                ADAMW, point.workload, device, probe, candidates, rounds=rounds, steps=point.steps,
                warmup=warmup, seed=seed, progress=lambda label, done, total: bar.update(done / total, label),
                launches=False)
        bar.end()
        panel_rows += report.make_rows(
            {**context, "workload": point.workload.name, "workload_note": point.workload.note,
             "num_tensors": point.workload.num_tensors, "case": ADAMW.name,
             "case_note": (f"{CLIPPED}: {HOST_NOTES[CLIPPED]}; {SCALED}: {HOST_NOTES[SCALED]}"
                           if point.panel == HOST else ""),
             "optimizer": ADAMW.optimizer, "rounds": rounds, "steps_per_round": point.steps,
             "warmup_steps": warmup, "launches_counted": harness.launches_counted(device)}, results)
        if index + 1 == len(planned) or planned[index + 1].panel != point.panel:
            on_panel(panel_rows)
            rows += panel_rows
            panel_rows = []
    return rows


# ---------------------------------------------------------------------------------------------------------
# Tables


def _panel_rows(rows: list[dict], panel: str) -> list[dict]:
    return [row for row in rows if row["workload"] == f"sweep-{panel}"]


def _x(row: dict) -> int:
    return row["numel"] if row["workload"] == f"sweep-{NUMEL}" else row["num_tensors"]


def _grid(rows: list[dict]) -> tuple[list[str], list[tuple[int, dict[str, dict]]]]:
    """The implementations (probe left out) and, per abscissa in order, each implementation's row."""
    names = list(dict.fromkeys(row["implementation"] for row in rows if not report.is_probe(row)))
    by_x: dict[int, dict[str, dict]] = {}
    for row in rows:
        if not report.is_probe(row):
            by_x.setdefault(_x(row), {})[row["implementation"]] = row
    return names, sorted(by_x.items())


def _time_cell(row: dict | None, per_param: bool) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    value = row["ms_median"] * 1e3 / row["numel"] if per_param else row["ms_median"]
    if row["implementation"] != REFERENCE:
        ratio = row["speedup_vs_fused_opt_median"]
        return report.significant(value) + ("" if ratio is None else f" ({ratio:.2f}x)")
    if per_param or row["frac_of_probe"] is None:
        return report.significant(value)
    return f"{report.significant(value)} ({100 * row['frac_of_probe']:.0f}%)"


def _floor_ms(by_name: dict[str, dict]) -> float | None:
    """Every implementation moves AdamW's bytes, so any measured row's floor is the point's floor."""
    return next((row["floor_ms"] for row in by_name.values() if row["floor_ms"] is not None), None)


def _floor_cell(by_name: dict[str, dict]) -> str:
    floor = _floor_ms(by_name)
    return "-" if floor is None else report.significant(floor)


def panel_table(rows: list[dict], panel: str) -> tuple[str, tuple[str, ...], list[list[str]], str]:
    """(title, columns, cells, legend) of one panel."""
    own = _panel_rows(rows, panel)
    names, grid = _grid(own)
    first = own[0]
    where = f"{first['device']} ({first['device_name']}), {first['rounds']} rounds"
    if panel == HOST:
        title = f"Host cost: AdamW fp32 over N one-element params, us per param, {where}"
        columns = ("params", *names)
        cells = [[f"{x:,}", *(_time_cell(by_name.get(name), per_param=True) for name in names)]
                 for x, by_name in grid]
        legend = ("us per param: the median step time over N; (x): the row's time over plain fused_opt's, "
                  f"median of per-round ratios; {CLIPPED}: {HOST_NOTES[CLIPPED]}; {SCALED}: {HOST_NOTES[SCALED]}")
        return title, columns, cells, legend
    if panel == NUMEL:
        title = f"AdamW fp32 ms per step against params on one tensor, {where}"
        columns = ("params", "floor ms", *names)
        cells = [[f"{x:,}", _floor_cell(by_name), *(_time_cell(by_name.get(name), False) for name in names)]
                 for x, by_name in grid]
    else:
        total = first["numel"]
        title = f"AdamW fp32 ms per step against tensor count, {total:,} params in all, {where}"
        columns = ("tensors", "params each", "floor ms", *names)
        cells = [[f"{x:,}", f"{total // x:,}", _floor_cell(by_name),
                  *(_time_cell(by_name.get(name), False) for name in names)] for x, by_name in grid]
    legend = ("ms per step, median over rounds; fused_opt (%): share of the ceiling; others (x): the row's time "
              "over fused_opt's, median of per-round ratios (> 1: fused_opt is faster); floor: 28 B/param at the "
              "bandwidth of the probe timed in the same rounds")
    if any(row["status"] == "ok" and (row["frac_of_probe"] or 0) > 1 for row in own):
        legend += f"; {report.CEILING_OVER_100}"
    return title, columns, cells, legend


def target_lines(rows: list[dict]) -> list[str]:
    """Issue #13's host-cost targets against this run's numbers: at 148 params and at the most params."""
    _, grid = _grid(_panel_rows(rows, HOST))
    lines = []
    for x, by_name in grid:
        if x not in (TARGET_COUNT, grid[-1][0]):
            continue
        ours = by_name.get(REFERENCE)
        if ours is None or ours["status"] != "ok":
            continue
        us = ours["ms_median"] * 1e3
        parts = [f"fused_opt {report.significant(us / x)} us/param (target <= {TARGET_US_PER_PARAM:g})"]
        if x == TARGET_COUNT:
            parts.append(f"{report.significant(us)} us per step (target <= {TARGET_US_AT_COUNT:g})")
        torch_fused = by_name.get("torch-fused")
        if torch_fused and torch_fused["speedup_vs_fused_opt_median"] is not None:
            parts.append(f"torch-fused {torch_fused['speedup_vs_fused_opt_median']:.2f}x fused_opt's time "
                         f"(target >= {TARGET_SPEEDUP_OVER_TORCH_FUSED:g}x)")
        for name in (CLIPPED, SCALED):
            row = by_name.get(name)
            if row and row["speedup_vs_fused_opt_median"] is not None:
                parts.append(f"{name} {row['speedup_vs_fused_opt_median']:.2f}x the plain step "
                             f"(target <= {TARGET_PIPELINE_RATIO:g}x)")
        lines.append(f"at {x:,} params: " + "; ".join(parts))
    return lines


def format_text(rows: list[dict], panel: str) -> str:
    title, columns, cells, legend = panel_table(rows, panel)
    numeric = set(range(1, len(columns)))
    out = report.wrap(title, indent="") + report._render_table(columns, cells, numeric)
    out += report.wrap(legend, indent="")
    if panel == HOST:
        out += [line for target in target_lines(rows) for line in report.wrap(f"issue #13: {target}")]
    out += [line for note in report.status_notes(_panel_rows(rows, panel)) for line in report.wrap(f"note: {note}")]
    return "\n".join(out)


def format_markdown(rows: list[dict], plot_name: str | None = None) -> str:
    first = rows[0]
    lines = [
        f"# fused_opt sweep on {first['device']}: the cost curve of an AdamW fp32 step",
        "",
        *report.run_identity(first),
        "- each point times every implementation in interleaved rounds (the numel and tensors points beside the "
        f"bandwidth probe, {'a device-to-device copy' if first['device'] == 'cuda' else 'an in-place `a.add_(b)`'}, "
        "which sets the floor); a round's time is the median of its steps, of which the smallest points take the "
        "most (steps_per_round in sweep.jsonl)",
    ]
    if plot_name:
        lines += ["", f"![time per step against params, tensor count, and the host cost per param]({plot_name})"]
    for panel in PANELS:
        if not _panel_rows(rows, panel):
            continue
        title, columns, cells, legend = panel_table(rows, panel)
        lines += ["", f"## {title}", ""]
        lines += report._markdown_table(columns, cells, set(range(1, len(columns))))
        lines += ["", f"- {legend}"]
        if panel == HOST:
            lines += [f"- issue #13: {target}" for target in target_lines(rows)]
        lines += [f"- {note}" for note in report.status_notes(_panel_rows(rows, panel))]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Plot

# fused_opt's pipelines in its colour, told apart by the line.
_COLOR_OF = {CLIPPED: REFERENCE, SCALED: REFERENCE}
_VARIANT_STYLE = {CLIPPED: {"linestyle": "--"}, SCALED: {"linestyle": ":"}}


def plot_sweep(rows: list[dict], path: Path, warning: str | None = None) -> Path:
    """Log-log lines of the panels present: ms per step against params (one tensor) and against tensor
    count, each with the byte floor dashed, and us per param of the host cost with its target."""
    Figure, FigureCanvasAgg, Line2D, _ = plot._matplotlib()
    panels = [panel for panel in PANELS if _panel_rows(rows, panel)]
    figure = Figure(figsize=(5.2 * len(panels), 5.4))
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, panel in zip(axes_list, panels):
        names, grid = _grid(_panel_rows(rows, panel))
        for name in names:
            points_ok = [(x, by_name[name]) for x, by_name in grid
                         if name in by_name and by_name[name]["status"] == "ok"]
            ys = [row["ms_median"] * (1e3 / row["numel"] if panel == HOST else 1) for _, row in points_ok]
            color = plot._COLORS.get(_COLOR_OF.get(name, name), "gray")
            axes.plot([x for x, _ in points_ok], ys, marker="o", markersize=3.5, color=color, label=name,
                      **_VARIANT_STYLE.get(name, {}))
        if panel == HOST:
            axes.axhline(TARGET_US_PER_PARAM, color="gray", linestyle="-.", linewidth=1,
                         label=f"target {TARGET_US_PER_PARAM:g} us/param")
            axes.set_ylabel("us per param (log)")
            axes.set_xlabel("one-element params (log)")
            axes.set_title("host cost per param", fontsize=10, loc="left")
        else:
            floors = [(x, floor) for x, by_name in grid if (floor := _floor_ms(by_name)) is not None]
            axes.plot([x for x, _ in floors], [floor for _, floor in floors], label="floor: 28 B/param / ceiling",
                      **plot._FLOOR_STYLE)
            axes.set_ylabel("ms per step (log)")
            first = _panel_rows(rows, panel)[0]
            if panel == NUMEL:
                axes.set_xlabel("params on one tensor (log)")
                axes.set_title("time per step against params", fontsize=10, loc="left")
            else:
                axes.set_xlabel(f"tensors, {first['numel']:,} params in all (log)")
                axes.set_title("time per step against tensor count", fontsize=10, loc="left")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.grid(which="both", alpha=0.25)
        axes.tick_params(labelsize=8)
        axes.legend(fontsize=7, frameon=False)
    first = rows[0]
    figure.suptitle(f"fused_opt sweep, AdamW fp32 on {first['device']} ({first['device_name']}), torch "
                    f"{first['torch_version']}, {first['timestamp']}; medians over {first['rounds']} interleaved "
                    "rounds, lower is better", fontsize=9, x=0.01, ha="left")
    if warning:
        figure.text(0.01, 0.005, f"warning: {warning}", color="#b00000", fontsize=8, ha="left", va="bottom")
    figure.tight_layout(rect=(0, 0.03 if warning else 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------------------
# The command


def run(args, fused_opt, metadata: dict, started: float) -> int:
    """The sweep for __main__.main: measures, prints each panel's table as it ends, writes the files."""
    device = args.device
    planned = points(device.type, tiny=args.tiny, max_numel=args.sweep_max_numel, min_steps=args.steps,
                     panels=tuple(args.sweep_panels))
    if fused_opt is None:
        print("note: the sweep measures torch.optim only", file=sys.stderr)
    bar = ProgressBar([1.0] * len(planned))
    jsonl_path = args.output / "sweep.jsonl"

    def on_panel(panel_rows: list[dict]) -> None:
        bar.clear()
        panel = panel_rows[0]["workload"].removeprefix("sweep-")
        print(format_text(panel_rows, panel) + "\n", flush=True)
        # Appended per panel so that an interrupted run keeps what it measured.
        report.append_jsonl(panel_rows, jsonl_path)

    rows = measure(planned, fused_opt, device, metadata, rounds=args.rounds, warmup=args.warmup, seed=args.seed,
                   bar=bar, on_panel=on_panel)
    end_load = report.load_average()
    warning = (report.load_warning(max(metadata["load_average"] or 0, end_load or 0))
               if device.type == "cpu" else None)
    written = [f"{jsonl_path} (appended)"]
    plot_name = None
    if not args.no_plot:
        plot_path = args.output / f"sweep-{device.type}.png"
        try:
            plot_sweep(rows, plot_path, warning=warning)
            plot_name = plot_path.name
            written.append(str(plot_path))
        except plot.PlotUnavailable as exc:
            print(f"note: {exc}", file=sys.stderr)
    markdown_path = args.output / f"sweep-{device.type}.md"
    markdown_path.write_text(format_markdown(rows, plot_name))
    written.insert(1, str(markdown_path))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if not any(row["status"] == "ok" and not report.is_probe(row) for row in rows):
        print(f"error: nothing was measured: every implementation failed (see the notes); rows written to "
              f"{args.output}", file=sys.stderr)
        return 1
    print(f"done in {time.monotonic() - started:.0f} s; results in {args.output}: {', '.join(written)}",
          file=sys.stderr)
    return 0
