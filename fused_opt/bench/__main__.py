"""Command line of the benchmark: `python -m fused_opt.bench [--full] [--workloads gpt2] ...`."""

import argparse
import shlex
import sys
import textwrap
import time
from pathlib import Path

import torch

from . import harness, implementations, peers, plot, report, sweep
from .implementations import CASES, REFERENCE, TORCH_IMPLEMENTATIONS
from .progress import ProgressBar
from .workloads import DEFAULT_WORKLOADS, WORKLOAD_NAMES, device_memory_bytes, make_workload

# The quick default stays under about two minutes on a 2-core CPU; --full takes as long as it takes.
DEFAULTS = {"rounds": 5, "steps": 1, "warmup": 1}
FULL_DEFAULTS = {"rounds": 7, "steps": 1, "warmup": 1}
TINY_DEFAULTS = {"rounds": 3, "steps": 2, "warmup": 1}
IMPLEMENTATION_NAMES = (REFERENCE, *TORCH_IMPLEMENTATIONS, *peers.PEER_IMPLEMENTATIONS)


def _name_list(choices):
    lowered = {choice.lower() for choice in choices}

    def parse(text: str) -> list[str]:
        names = [name.strip().lower() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in lowered]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(sorted(lowered))}")
        return names

    return parse


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _numel(text: str) -> int:
    """A whole number of elements, also written as 1e7."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of elements such as 1e7, got {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text}")
    return int(value)


def _non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def program_name() -> str:
    """How the user started the benchmark, for the usage line and the recorded command."""
    return "fused-opt-bench" if Path(sys.argv[0]).name == "fused-opt-bench" else "python -m fused_opt.bench"


def _case_label(case) -> str:
    return f"{case.name} {case.dtype}"


def _epilog() -> str:
    def item(text: str) -> str:
        return textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="    ",
                             break_on_hyphens=False)

    default_cases = ", ".join(_case_label(case) for case in CASES if case.in_default)
    all_cases = ", ".join(_case_label(case) for case in CASES)
    return "\n".join([
        "what runs:",
        item(f"quick default (no --full): workloads {', '.join(DEFAULT_WORKLOADS)}; cases {default_cases}; "
             "every implementation found except those too slow here for a quick run (bitsandbytes on CPU); "
             f"{DEFAULTS['rounds']} rounds; under two minutes on a 2-core CPU."),
        item(f"--full: workloads {', '.join(WORKLOAD_NAMES)} (llama-1b scaled down to fit half the device's "
             f"memory where it must); cases {all_cases}; every implementation found; "
             f"{FULL_DEFAULTS['rounds']} rounds."),
        item("--workloads, --optimizers, --cases, --implementations given explicitly replace the default's "
             "choice; --optimizers and --cases together run the cases that both name."),
        "peers (measured when importable, else named in a one-line note):",
        item("apex FusedAdam/FusedSGD and DeepSpeed FusedAdam (CUDA), DeepSpeed CPUAdam (CPU), bitsandbytes "
             "32-bit and 8-bit (both)."),
        "output:",
        item("the tables and a one-line summary per case on stdout, progress and warnings on stderr; in the "
             f"results folder (default {report.user_results_dir()}, or --output DIR): results.jsonl (one row per "
             "implementation, appended), latest-<device>.md (the tables) and latest-<device>.png (the plot, "
             "with matplotlib: pip install 'fused_opt[plot]'). The project's published results "
             "(benchmarks/results/ of a clone) are written only with --record."),
        "--sweep (the cost curve; AdamW fp32 of fused_opt and torch.optim's three):",
        item("time per step against params on one tensor (1e3 to 1e8; on CPU to "
             f"{sweep.DEFAULT_MAX_NUMEL['cpu']:.0e} unless --sweep-max-numel says more) and against tensor count "
             f"(1 to {sweep.TENSOR_COUNTS[-1]:,} tensors, {sweep.TENSORS_TOTAL:,} params in all), each with its "
             f"byte floor, and the host cost per param of {', '.join(map(str, sweep.HOST_COUNTS))} one-element "
             f"params (fused_opt also with max_grad_norm={sweep.CLIP_NORM:g} and under its GradScaler); about half "
             "a minute on a 2-core CPU. Writes sweep.jsonl (appended), sweep-<device>.md and "
             "sweep-<device>.png into the results folder."),
    ])


def parse_args(argv: list[str]) -> argparse.Namespace:
    case_names = {case.name for case in CASES}
    parser = argparse.ArgumentParser(
        prog=program_name(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Times one optimizer step of fused_opt, torch.optim (for-loop, foreach, fused) and the "
                    "peer libraries found, in interleaved rounds beside a memory bandwidth probe (the "
                    "ceiling), and draws the result.",
        epilog=_epilog())
    parser.add_argument("--full", action="store_true",
                        help="every workload, case and implementation (see below); takes much longer")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--workloads", type=_name_list(WORKLOAD_NAMES),
                        help=f"comma-separated, from {','.join(WORKLOAD_NAMES)}")
    parser.add_argument("--optimizers", type=_name_list(set(implementations.OPTIMIZER_NAMES) | case_names),
                        help="comma-separated optimizer classes (adam,adamw,sgd,adagrad,rmsprop) or case "
                             "names (e.g. sgd-nesterov, adamw-amp-clip); all their cases run")
    parser.add_argument("--cases", dest="case_names", type=_name_list(case_names),
                        help=f"comma-separated case names, from {','.join(sorted(case_names))}")
    parser.add_argument("--dtypes", type=_name_list(implementations.DTYPES), default=list(implementations.DTYPES),
                        help="comma-separated param dtypes, from fp32,bf16 (default: both)")
    parser.add_argument("--implementations", type=_name_list(IMPLEMENTATION_NAMES),
                        help=f"comma-separated, from {','.join(IMPLEMENTATION_NAMES)}")
    parser.add_argument("--rounds", type=_positive_int,
                        help=f"interleaved rounds (default {DEFAULTS['rounds']}, "
                             f"--full {FULL_DEFAULTS['rounds']})")
    parser.add_argument("--steps", type=_positive_int,
                        help=f"timed steps per implementation per round (default {DEFAULTS['steps']})")
    parser.add_argument("--warmup", type=_non_negative_int,
                        help=f"untimed steps per implementation before the rounds (default {DEFAULTS['warmup']})")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny workloads with the same tensor structure and few rounds: a smoke test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the params and grads (default 0)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output", type=Path,
                       help=f"directory for results.jsonl, latest-<device>.md and .png (default: "
                            f"{report.user_results_dir()})")
    where.add_argument("--record", action="store_true",
                       help="write into the project's published results, benchmarks/results/ of the clone "
                            "this runs from (for maintainers recording a run for the README)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--sweep", action="store_true",
                        help="the cost curve instead of the workloads (see below)")
    parser.add_argument("--sweep-max-numel", type=_numel,
                        help=f"largest one-tensor size of --sweep, e.g. 1e8 (default: "
                             f"{sweep.DEFAULT_MAX_NUMEL['cpu']:.0e} on cpu, {sweep.DEFAULT_MAX_NUMEL['cuda']:.0e} "
                             f"on cuda, {sweep.TINY_MAX_NUMEL:.0e} with --tiny)")
    parser.add_argument("--sweep-panels", type=_name_list(sweep.PANELS), default=list(sweep.PANELS),
                        help=f"comma-separated parts of --sweep, from {','.join(sweep.PANELS)} (default: all)")
    args = parser.parse_args(argv)
    if args.sweep:
        fixed = [flag for flag, value in (("--full", args.full), ("--workloads", args.workloads),
                                          ("--optimizers", args.optimizers), ("--cases", args.case_names),
                                          ("--implementations", args.implementations)) if value]
        if fixed:
            parser.error(f"--sweep measures AdamW fp32 of fused_opt and torch.optim alone; {', '.join(fixed)} "
                         "do not apply")
    elif args.sweep_max_numel is not None or "--sweep-panels" in argv:
        parser.error("--sweep-max-numel and --sweep-panels go with --sweep")
    if args.record:
        args.output = report.recorded_results_dir()
        if args.output is None:
            parser.error("--record writes benchmarks/results/ of a clone of fused_opt, and this fused_opt "
                         f"({Path(__file__).resolve().parents[1]}) is not run from one; use --output DIR")
    elif args.output is None:
        args.output = report.user_results_dir()
    defaults = TINY_DEFAULTS if args.tiny else FULL_DEFAULTS if args.full else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.workloads is None:
        args.workloads = list(WORKLOAD_NAMES if args.full else DEFAULT_WORKLOADS)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch.cuda.is_available() is False")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device} is not supported; use cpu or cuda")
    if args.device.type == "cuda" and args.device.index is None:
        # torch.cuda.set_device and the events need a numbered device.
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.cases = implementations.select_cases(args.optimizers, args.dtypes, args.full, args.case_names)
    if not args.cases:
        parser.error(f"no case has optimizer in {args.optimizers}, name in {args.case_names} and dtype in "
                     f"{args.dtypes}")
    return args


def choose_implementations(args, fused_opt) -> tuple[list[implementations.Implementation], str]:
    """The implementations to measure and the one-line note on the peers: found, not found and why, left
    out of the quick default and why."""
    wanted = set(args.implementations) if args.implementations else None
    loading = ProgressBar([])
    found = peers.discover(args.device, wanted, announce=lambda label: loading.status(f"loading {label} ..."))
    loading.clear()
    available = [impl for impl in implementations.core_implementations(fused_opt) + found.implementations
                 if wanted is None or impl.name in wanted]
    slow = [impl for impl in available if impl.slow_here and wanted is None and not args.full]
    chosen = [impl for impl in available if impl not in slow]
    parts = [f"peers found: {', '.join(found.found) or 'none'}"]
    if found.missing:
        parts.append(f"not measured: {', '.join(found.missing)}")
    reasons = dict.fromkeys(impl.slow_here for impl in slow)
    for reason in reasons:
        names = ", ".join(impl.name for impl in slow if impl.slow_here == reason)
        parts.append(f"left out of the quick default: {names} ({reason}; --full runs it)")
    return chosen, "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events and synchronize act on the current device
    fused_opt = implementations.load_fused_opt()
    command = " ".join([program_name(), *map(shlex.quote, argv)])
    metadata = report.run_metadata(device, command, fused_opt)
    start_warning = report.load_warning(metadata["load_average"]) if device.type == "cpu" else None
    if start_warning:
        print(f"warning: at start, {start_warning}", file=sys.stderr)
    if args.sweep:
        return sweep.run(args, fused_opt, metadata, started)

    memory = device_memory_bytes(device)
    workloads = [make_workload(name, device.type, tiny=args.tiny, memory_bytes=memory) for name in args.workloads]
    candidates, peers_line = choose_implementations(args, fused_opt)
    print(f"note: {peers_line}", file=sys.stderr)
    # A case that no chosen implementation runs would time the probe alone: it is left out, and a run
    # left with nothing to measure stops here.
    plan = [(workload, [(case, chosen) for case in args.cases
                        if (chosen := [impl for impl in candidates if impl.runs(case)])])
            for workload in workloads]
    unmeasured = [_case_label(case) for case in args.cases if not any(impl.runs(case) for impl in candidates)]
    if not any(cases for _, cases in plan):
        print(f"error: nothing to measure: no implementation among those available "
              f"({', '.join(impl.name for impl in candidates) or 'none'}) runs the cases asked for "
              f"({', '.join(unmeasured)}); {peers_line}", file=sys.stderr)
        return 2
    if unmeasured:
        print(f"note: not measured, no chosen implementation runs them: {', '.join(unmeasured)}",
              file=sys.stderr)
    # Weighted by the bytes each case moves, times its contenders: a rough share of the run's time.
    bar = ProgressBar([workload.numel * case.bytes_per_param * (len(chosen) * len(case.variants) + 1)
                       for workload, cases in plan for case, chosen in cases])

    jsonl_path = args.output / "results.jsonl"
    run_rows = []
    for workload, cases in plan:
        if workload.note:
            bar.message(f"note: {workload.name} {workload.note}")
        probe = harness.Probe(workload.numel, device)
        workload_rows = []
        for case, chosen in cases:
            bar.begin(f"{workload.name} {_case_label(case)}")
            results = harness.measure_case(
                case, workload, device, probe, chosen, rounds=args.rounds, steps=args.steps,
                warmup=args.warmup, seed=args.seed,
                progress=lambda label, done, total: bar.update(done / total, label))
            bar.end()
            context = {**metadata, "workload": workload.name, "workload_note": workload.note,
                       "num_tensors": workload.num_tensors, "case": case.name, "case_note": case.note,
                       "optimizer": case.optimizer, "rounds": args.rounds, "steps_per_round": args.steps,
                       "warmup_steps": args.warmup, "launches_counted": harness.launches_counted(device)}
            workload_rows += report.make_rows(context, results)
        del probe  # before the next workload allocates its own
        bar.clear()
        print(report.format_table(workload_rows) + "\n", flush=True)
        # Appended per workload so that an interrupted run keeps what it measured.
        report.append_jsonl(workload_rows, jsonl_path)
        run_rows += workload_rows

    summaries = report.case_summaries(run_rows)
    print("summary (speed-up: median of per-round ratios; > 1: fused_opt is faster)")
    for line in summaries:
        print("\n".join(report.wrap(line)))
    end_load = report.load_average()
    warning = (report.load_warning(max(metadata["load_average"] or 0, end_load or 0))
               if device.type == "cpu" else None)
    plot_name = None
    if not args.no_plot:
        plot_path = args.output / f"latest-{device.type}.png"
        try:
            plot.plot_run(run_rows, plot_path, warning=warning)
            plot_name = plot_path.name
        except plot.PlotUnavailable as exc:
            print(f"note: {exc}", file=sys.stderr)
    markdown_path = args.output / f"latest-{device.type}.md"
    report.write_markdown(run_rows, markdown_path, peers_line, plot_name)
    written = [str(jsonl_path) + " (appended)", str(markdown_path)] + ([str(plot_path)] if plot_name else [])
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    measured = [row for row in run_rows if row["status"] == "ok" and not report.is_probe(row)]
    if not measured:
        print(f"error: no requested case was measured: every implementation was skipped or failed (see the "
              f"notes); rows written to {args.output}", file=sys.stderr)
        return 1
    print(f"done in {time.monotonic() - started:.0f} s; results in {args.output}: {', '.join(written)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
