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
from datetime import datetime, timezone
from pathlib import Path

import torch

from .harness import Result

ROW_KEYS = (
    "timestamp", "device", "device_name", "torch_version", "fused_opt_version", "git_commit", "command",
    "load_average",
    "workload", "num_tensors", "case", "optimizer", "implementation", "status", "note", "dtype", "numel",
    "bytes_per_param", "rounds", "steps_per_round", "warmup_steps",
    "ms_median", "ms_min", "ms_max", "gbps", "frac_of_probe",
    "speedup_vs_fused_opt_median", "speedup_vs_fused_opt_min", "speedup_vs_fused_opt_max",
)

_REPO_ROOT = Path(__file__).resolve().parents[2]


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
    """HEAD of the checkout this package runs from; None for an installed copy, where the enclosing
    repository (if any) would not be fused_opt's."""
    if not (_REPO_ROOT / ".git").exists():
        return None
    try:
        completed = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True,
                                   text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


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


def _significant(value: float) -> str:
    """Three significant digits without an exponent: 231, 31.2, 0.0512."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


_COLUMNS = ("case", "dtype", "implementation", "ms/step median [min-max]", "GB/s", "% of probe",
            "fused_opt speed-up [min-max]", "note")
_NUMERIC_COLUMNS = {3, 4, 5, 6}


def _cells(row: dict) -> list[str]:
    ok = row["status"] == "ok"
    speedup = row["speedup_vs_fused_opt_median"]
    return [
        row["case"],
        row["dtype"],
        row["implementation"],
        f"{_significant(row['ms_median'])} [{_significant(row['ms_min'])}-{_significant(row['ms_max'])}]"
        if ok else "-",
        f"{row['gbps']:.1f}" if ok else "-",
        f"{100 * row['frac_of_probe']:.0f}%" if ok and row["frac_of_probe"] is not None else "-",
        f"{speedup:.2f}x [{row['speedup_vs_fused_opt_min']:.2f}-{row['speedup_vs_fused_opt_max']:.2f}]"
        if speedup is not None else "-",
        "" if ok else f"{row['status']}: {row['note']}",
    ]


def _load_text(load: float | None) -> str:
    return "unknown" if load is None else f"{load:.2f}"


def _is_probe(row: dict) -> bool:
    return row["implementation"].startswith("probe")


def table_title(rows: list[dict]) -> str:
    first = rows[0]
    tensors = f"{first['num_tensors']} tensor" + ("s" if first["num_tensors"] != 1 else "")
    return (f"{first['workload']}: {tensors}, {first['numel'] / 1e6:.1f}M params, "
            f"{first['device']} ({first['device_name']}), {first['rounds']} rounds x "
            f"{first['steps_per_round']} steps after {first['warmup_steps']} warm-up")


def format_table(rows: list[dict], max_note: int = 50) -> str:
    """A plain-text table of one workload's rows."""
    cells = [[cell if len(cell) <= max_note else cell[:max_note - 3] + "..." for cell in _cells(row)]
             for row in rows]
    widths = [max(len(line[i]) for line in [list(_COLUMNS)] + cells) for i in range(len(_COLUMNS))]

    def render(line):
        return "  ".join(cell.rjust(width) if i in _NUMERIC_COLUMNS else cell.ljust(width)
                         for i, (cell, width) in enumerate(zip(line, widths))).rstrip()

    lines = [table_title(rows), render(_COLUMNS), render(["-" * width for width in widths])]
    for row, line in zip(rows, cells):
        lines.append(render(line))
        # Each case lists its probe row last, so the probe closes the case's block.
        if _is_probe(row) and row is not rows[-1]:
            lines.append("")
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    """The whole run as markdown: the run's identity, then one table per workload."""
    first = rows[0]
    lines = [
        f"# fused_opt benchmark on {first['device']}",
        "",
        f"- when: {first['timestamp']}",
        f"- device: {first['device_name']}",
        f"- torch {first['torch_version']}, fused_opt {first['fused_opt_version'] or '-'}, "
        f"commit {first['git_commit'] or 'unknown'}",
        f"- command: `{first['command']}`",
        f"- load average at start: {_load_text(first['load_average'])} on {os.cpu_count()} cores",
        "- times are the median over rounds of each round's median step time; % of probe and speed-up are "
        "medians of per-round ratios (speed-up > 1: fused_opt is faster)",
    ]
    for workload in dict.fromkeys(row["workload"] for row in rows):
        workload_rows = [row for row in rows if row["workload"] == workload]
        lines += ["", f"## {table_title(workload_rows)}", "",
                  "| " + " | ".join(_COLUMNS) + " |",
                  "|" + "|".join("---:" if i in _NUMERIC_COLUMNS else "---" for i in range(len(_COLUMNS))) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in _cells(row)) + " |"
                  for row in workload_rows]
    return "\n".join(lines) + "\n"


def write_markdown(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(rows))
