"""Reporting: result rows with the run's identity, the printed tables, results.jsonl and the markdown file.

Rows are tidy (one JSON object per implementation per case per workload) so that results from many runs
and machines can be appended to one file and compared later.
"""

import dataclasses
import json
import math
import os
import platform
import subprocess
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import torch

from .harness import Result
from .implementations import REFERENCE

ROW_KEYS = (
    "timestamp", "device", "device_name", "torch_version", "fused_opt_version", "git_commit", "command",
    "load_average",
    "workload", "workload_note", "num_tensors", "case", "case_note", "optimizer", "implementation", "variant",
    "status",
    "note", "dtype", "numel", "bytes_per_param", "rounds", "steps_per_round", "warmup_steps",
    "launches_per_step", "launches_counted", "state_bytes_per_param",
    "ms_median", "ms_min", "ms_max", "floor_ms", "gbps", "frac_of_probe",
    "speedup_vs_fused_opt_median", "speedup_vs_fused_opt_min", "speedup_vs_fused_opt_max",
    "time_vs_baseline_median", "time_vs_baseline_min", "time_vs_baseline_max",
)

_REPO_ROOT = Path(__file__).resolve().parents[2]


def user_results_dir() -> Path:
    """Where a run writes by default: a folder of the user's own, the same from any working directory,
    never the project's published results (benchmarks/results/ of a clone, written only with --record)."""
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "fused_opt" / "bench"


def recorded_results_dir() -> Path | None:
    """The project's published results, benchmarks/results/ of the clone this package runs from; None for
    an installed copy, which has none."""
    path = _REPO_ROOT / "benchmarks" / "results"
    return path if path.is_dir() else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, with "-dirty" when tracked files differ from it; None
    for an installed copy, where the enclosing repository (if any) would not be fused_opt's."""
    if not (_REPO_ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True,
                              timeout=10)
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO_ROOT,
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if changes.returncode == 0 and changes.stdout.strip() else "")


def load_average() -> float | None:
    """The 1-minute load average when the run starts: on a machine with few cores, other busy processes
    slow every step and make rounds disagree, and this is the record of whether that was so."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_metadata(device: torch.device, command: str, fused_opt) -> dict:
    """The columns every row of one run shares."""
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "fused_opt_version": getattr(fused_opt, "__version__", None),
        "git_commit": git_commit(),
        "command": command,
        "load_average": load_average(),
    }


def make_rows(context: dict, results: list[Result]) -> list[dict]:
    """One row per result; `context` supplies every other key of ROW_KEYS (a missing one raises)."""
    rows = []
    for result in results:
        merged = {**context, **dataclasses.asdict(result)}
        rows.append({key: merged[key] for key in ROW_KEYS})
    return rows


def append_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


def significant(value: float) -> str:
    """Three significant digits without an exponent: 231, 31.2, 0.0512."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def implementation_label(row: dict) -> str:
    """The implementation, and which variant of it when it is a case's baseline; rows stored before
    variants existed have none."""
    variant = row.get("variant")
    return f"{row['implementation']} ({variant})" if variant else row["implementation"]


def _ratio_cell(row: dict, key: str) -> str:
    return f"{row[key + '_median']:.2f}x [{row[key + '_min']:.2f}-{row[key + '_max']:.2f}]"


def _columns(rows: list[dict]) -> tuple[str, ...]:
    launches = "kernels/step" if rows[0]["device"] == "cuda" else "ops/step"
    return ("case", "dtype", "implementation", "B/param", "ms/step median [min-max]", "GB/s", "% of ceiling",
            launches, "state B/param", "fused_opt speed-up [min-max]", "note")


_NUMERIC_COLUMNS = {3, 4, 5, 6, 7, 8, 9}


def _cells(row: dict, first_of_case: bool) -> list[str]:
    ok = row["status"] == "ok"
    speedup = row["speedup_vs_fused_opt_median"]
    if speedup is None:
        speedup_cell = "-"
    elif row["implementation"] == REFERENCE:
        speedup_cell = f"{speedup:.2f}x"
    else:
        speedup_cell = _ratio_cell(row, "speedup_vs_fused_opt")
    launches = row["launches_per_step"]
    state = row["state_bytes_per_param"]
    return [
        row["case"] if first_of_case else "",
        row["dtype"] if first_of_case else "",
        implementation_label(row),
        str(row["bytes_per_param"]),
        f"{significant(row['ms_median'])} [{significant(row['ms_min'])}-{significant(row['ms_max'])}]"
        if ok else "-",
        f"{row['gbps']:.1f}" if ok else "-",
        f"{100 * row['frac_of_probe']:.0f}%" if ok and row["frac_of_probe"] is not None else "-",
        "-" if launches is None else str(launches),
        "-" if state is None else f"{state:.1f}",
        speedup_cell,
        "" if ok else f"{row['status']}: {row['note']}",
    ]


def _table_cells(rows: list[dict]) -> list[list[str]]:
    """Cells of one workload's rows, the case and dtype written only on the first row of each case."""
    cells = []
    previous = None
    for row in rows:
        # The probe row closes its case's block; its own dtype is the probe's fp32, not the case's.
        identity = None if is_probe(row) else (row["case"], row["dtype"])
        cells.append(_cells(row, identity is not None and identity != previous))
        previous = identity
    return cells


BASELINE_COLUMNS = ("case", "dtype", "implementation", "ms/step median", "baseline", "baseline ms/step median",
                    "time / baseline [min-max]")
_BASELINE_NUMERIC_COLUMNS = {3, 5, 6}
BASELINE_TITLE = ("cost of the pipeline: each implementation's time against its own bare step (the baseline), "
                  "timed in the same rounds; median [min-max] of per-round ratios")


def _baseline_cells(rows: list[dict]) -> list[list[str]]:
    """A line per implementation measured against its baseline."""
    cells = []
    for row in rows:
        if row.get("time_vs_baseline_median") is None:
            continue
        baseline = next(other for other in rows if other.get("variant") and other["case"] == row["case"]
                        and other["dtype"] == row["dtype"] and other["implementation"] == row["implementation"])
        cells.append([row["case"], row["dtype"], row["implementation"], significant(row["ms_median"]),
                      baseline["variant"], significant(baseline["ms_median"]),
                      _ratio_cell(row, "time_vs_baseline")])
    return cells


def _load_text(load: float | None) -> str:
    return "unknown" if load is None else f"{load:.2f}"


def is_probe(row: dict) -> bool:
    return row["implementation"].startswith("probe")


def table_title(rows: list[dict]) -> str:
    first = rows[0]
    tensors = f"{first['num_tensors']} tensor" + ("s" if first["num_tensors"] != 1 else "")
    steps = f"{first['steps_per_round']} step" + ("s" if first["steps_per_round"] != 1 else "")
    return (f"{first['workload']}: {tensors}, {first['numel'] / 1e6:.1f}M params, "
            f"{first['device']} ({first['device_name']}), {first['rounds']} rounds x {steps} "
            f"after {first['warmup_steps']} warm-up")


def notes(rows: list[dict]) -> list[str]:
    """The workload's note and each case's, once each, as lines to print under its table."""
    lines = []
    if rows[0]["workload_note"]:
        lines.append(f"{rows[0]['workload']}: {rows[0]['workload_note']}")
    for (case, dtype), note in dict.fromkeys(((row["case"], row["dtype"]), row["case_note"]) for row in rows
                                             if row["case_note"] and not is_probe(row)):
        lines.append(f"{case} {dtype}: {note}")
    return lines


def _render_table(columns: tuple[str, ...], cells: list[list[str]], numeric: set[int]) -> list[str]:
    """A plain-text table's lines, columns padded to their widest cell, numbers right-aligned; a None in
    `cells` stands for an empty line between blocks, a str for a line of its own (a block's heading)."""
    filled = [line for line in cells if isinstance(line, list)]
    widths = [max(len(line[i]) for line in [list(columns)] + filled) for i in range(len(columns))]

    def render(line):
        return "  ".join(cell.rjust(width) if i in numeric else cell.ljust(width)
                         for i, (cell, width) in enumerate(zip(line, widths))).rstrip()

    return ([render(columns), render(["-" * width for width in widths])]
            + ["" if line is None else line if isinstance(line, str) else render(line) for line in cells])


TERMINAL_WIDTH = 100
# The terminal table's columns that give way, first to last, when its lines would pass TERMINAL_WIDTH;
# the markdown file and results.jsonl keep all of them.
_OPTIONAL_COLUMNS = ("state B/param", "GB/s", "ops/step", "kernels/step", "B/param")
# Shorter headers for the terminal, explained by SPEEDUP_LEGEND under its table.
_TERMINAL_HEADERS = {"ms/step median [min-max]": "ms/step [min-max]",
                     "fused_opt speed-up [min-max]": "speed-up [min-max]"}
SPEEDUP_LEGEND = ("ms/step: median [min-max] over rounds; speed-up: the row's time over fused_opt's, median "
                  "[min-max] of per-round ratios (> 1: fused_opt is faster)")
CEILING_OVER_100 = ("% of ceiling above 100: the step moved its bytes faster than the probe did in the same "
                    "rounds; the probe is a measured reference, not a bound (a loop with several read streams "
                    "can draw more bandwidth than one add, and the bandwidth moves between rounds)")


def wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, width=TERMINAL_WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False, break_long_words=False)


def _terminal_cells(rows: list[dict]) -> tuple[tuple[str, ...], list[list[str] | str | None]]:
    """The terminal table: the case and dtype on a line of their own above each case's block (a str), a
    row per implementation without the note column (the notes follow the table), None between blocks."""
    columns = _columns(rows)
    keep = [i for i, name in enumerate(columns) if name not in ("case", "dtype", "note")]
    lines: list[list[str] | str | None] = []
    previous = None
    for row in rows:
        if not is_probe(row) and (row["case"], row["dtype"]) != previous:
            if previous is not None:
                lines.append(None)
            lines.append(f"{row['case']} {row['dtype']}")
            previous = (row["case"], row["dtype"])
        cells = _cells(row, False)
        if row["status"] != "ok":
            cells[4] = row["status"]
        lines.append([cells[i] for i in keep])
    return tuple(_TERMINAL_HEADERS.get(columns[i], columns[i]) for i in keep), lines


def _fit(columns: tuple[str, ...], lines: list) -> tuple[list[str], list[str]]:
    """The rendered table, with optional columns dropped until it fits TERMINAL_WIDTH, and the dropped."""
    dropped: list[str] = []
    while True:
        keep = [i for i, name in enumerate(columns) if name not in dropped]
        kept = tuple(columns[i] for i in keep)
        cells = [line if not isinstance(line, list) else [line[i] for i in keep] for line in lines]
        rendered = _render_table(kept, cells, {j for j, name in enumerate(kept) if name != "implementation"})
        removable = [name for name in _OPTIONAL_COLUMNS if name in kept]
        if max(map(len, rendered)) <= TERMINAL_WIDTH or not removable:
            return rendered, dropped
        dropped.append(removable[0])


def format_table(rows: list[dict]) -> str:
    """One workload's rows as plain text within TERMINAL_WIDTH columns: the table (columns that do not fit
    are named below it), the cost of each pipeline against its baseline, then every note, wrapped."""
    columns, lines = _terminal_cells(rows)
    table, dropped = _fit(columns, lines)
    out = wrap(table_title(rows), indent="") + table
    if dropped:
        out += wrap(f"(left out to fit {TERMINAL_WIDTH} columns: {', '.join(dropped)}; all columns are in "
                     f"latest-{rows[0]['device']}.md)", indent="")
    baseline_cells = _baseline_cells(rows)
    out += wrap(SPEEDUP_LEGEND, indent="")
    if baseline_cells:
        # Narrower than the markdown's: case and dtype in one cell, the baseline named in the title.
        baselines = ", ".join(dict.fromkeys(line[4] for line in baseline_cells))
        out += ["", *wrap(f"{BASELINE_TITLE} (baseline: {baselines})", indent="")]
        narrow = [[f"{line[0]} {line[1]}", line[2], line[3], line[5], line[6]] for line in baseline_cells]
        out += _render_table(("case", "implementation", "ms/step", "baseline ms/step",
                              "time / baseline [min-max]"), narrow, {2, 3, 4})
    for line in notes(rows) + status_notes(rows):
        out += wrap(f"note: {line}")
    if any(row["status"] == "ok" and (row["frac_of_probe"] or 0) > 1 for row in rows):
        out += wrap(f"note: {CEILING_OVER_100}")
    return "\n".join(out)


def status_notes(rows: list[dict]) -> list[str]:
    """Why an implementation was skipped or failed, one line each, in full."""
    return [f"{row['case']} {row['dtype']}, {implementation_label(row)}: {row['status']}: {row['note']}"
            for row in rows if row["status"] != "ok" and row["note"]]


def case_summaries(rows: list[dict]) -> list[str]:
    """One line per workload and case: fused_opt's time and share of the ceiling, and its speed-up over
    each other implementation (> 1: fused_opt is faster); for a case fused_opt did not run, the fastest."""
    lines = []
    for key in dict.fromkeys((row["workload"], row["case"], row["dtype"]) for row in rows if not is_probe(row)):
        own = [row for row in rows if (row["workload"], row["case"], row["dtype"]) == key and not is_probe(row)
               and not row.get("variant")]
        label = " ".join(key)
        ours = next((row for row in own if row["implementation"] == REFERENCE and row["status"] == "ok"), None)
        measured = [row for row in own if row["status"] == "ok"]
        if ours is None:
            if measured:
                best = min(measured, key=lambda row: row["ms_median"])
                lines.append(f"{label}: fused_opt not measured; fastest {best['implementation']} "
                             f"{significant(best['ms_median'])} ms")
            else:
                lines.append(f"{label}: nothing measured")
            continue
        ceiling = f", {100 * ours['frac_of_probe']:.0f}% of ceiling" if ours["frac_of_probe"] else ""
        others = [f"{row['implementation']} {row['speedup_vs_fused_opt_median']:.2f}x" for row in measured
                  if row is not ours and row["speedup_vs_fused_opt_median"] is not None]
        lines.append(f"{label}: fused_opt {significant(ours['ms_median'])} ms{ceiling}"
                     + (f"; speed-up over {', '.join(others)}" if others else ""))
    return lines


def load_warning(load: float | None, cores: int | None = None) -> str | None:
    """A warning when the machine was busy (load average of at least half its cores), else None."""
    cores = cores or os.cpu_count() or 1
    if load is None or load < 0.5 * cores:
        return None
    return (f"load average {load:.2f} on {cores} cores: other processes were running, so times and ratios "
            "are noisy; rerun on an idle machine before trusting them")


def _explanations(rows: list[dict]) -> list[str]:
    first = rows[0]
    ceiling = ("a device-to-device copy" if first["device"] == "cuda"
               else "an in-place `a.add_(b)` (a copy pays a read-for-ownership and would understate it)")
    launches = _columns(rows)[7]
    return [
        "- times are the median over rounds of each round's median step time, implementations interleaved "
        "round by round; % of ceiling and speed-up are medians of per-round ratios (speed-up > 1: fused_opt "
        "is faster; a baseline row is compared with fused_opt's baseline row)",
        f"- ceiling: {ceiling}, timed in the same rounds (the probe rows); B/param: bytes the implementation's "
        "step moves per parameter, with the passes over grads or copies its way of running the case's "
        "pipeline adds (each tensor counted once per read and once per write), from which GB/s, % of ceiling "
        "and the floor follow",
        f"- {CEILING_OVER_100}",
        f"- {launches}: {first['launches_counted']} in one step (torch.profiler); state B/param: bytes of the "
        "optimizer's state tensors per parameter, and of the fp32 copies a pipeline keeps beside them",
    ]


def _markdown_table(columns: tuple[str, ...], cells: list[list[str]], numeric: set[int]) -> list[str]:
    return (["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if i in numeric else "---" for i in range(len(columns))) + "|"]
            + ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in cells])


def run_identity(first: dict) -> list[str]:
    """The markdown lines that say when, where, with what and how a run was measured."""
    return [
        f"- when: {first['timestamp']}",
        f"- device: {first['device_name']}",
        f"- torch {first['torch_version']}, fused_opt {first['fused_opt_version'] or '-'}, "
        f"commit {first['git_commit'] or 'unknown'}",
        f"- command: `{first['command']}`",
        f"- load average at start: {_load_text(first['load_average'])} on {os.cpu_count()} cores",
    ]


def format_markdown(rows: list[dict], peers: str = "", plot_name: str | None = None) -> str:
    """The whole run as markdown: the run's identity, the plot, then one table per workload."""
    first = rows[0]
    lines = [f"# fused_opt benchmark on {first['device']}", "", *run_identity(first)]
    if peers:
        lines.append(f"- {peers}")
    lines += _explanations(rows)
    if plot_name:
        lines += ["", f"![time per step against the byte floor]({plot_name})"]
    for workload in dict.fromkeys(row["workload"] for row in rows):
        workload_rows = [row for row in rows if row["workload"] == workload]
        lines += ["", f"## {table_title(workload_rows)}", ""]
        lines += _markdown_table(_columns(workload_rows), _table_cells(workload_rows), _NUMERIC_COLUMNS)
        baseline_cells = _baseline_cells(workload_rows)
        if baseline_cells:
            lines += ["", f"{BASELINE_TITLE}:", ""]
            lines += _markdown_table(BASELINE_COLUMNS, baseline_cells, _BASELINE_NUMERIC_COLUMNS)
        workload_notes = notes(workload_rows)
        if workload_notes:
            lines += [""] + [f"- {line}" for line in workload_notes]
    return "\n".join(lines) + "\n"


def write_markdown(rows: list[dict], path: Path, peers: str = "", plot_name: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(rows, peers, plot_name))
