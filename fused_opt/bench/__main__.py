"""Command line of the benchmark: `python -m fused_opt.bench [--quick] [--workloads gpt2] ...`."""

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from . import harness, implementations, report
from .workloads import WORKLOAD_NAMES, make_workload

# Sized so that the default run (both workloads, all eight cases) stays near two minutes on a 2-core CPU.
DEFAULTS = {"rounds": 7, "steps": 1, "warmup": 1}
QUICK_DEFAULTS = {"rounds": 3, "steps": 2, "warmup": 1}


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    case_names = {case.name for case in implementations.CASES}
    parser = argparse.ArgumentParser(
        prog="python -m fused_opt.bench",
        description="Times one optimizer step of fused_opt and torch.optim (for-loop, foreach, fused) in "
                    "interleaved rounds, next to an in-place memory bandwidth probe.")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--workloads", type=_name_list(WORKLOAD_NAMES), default=list(WORKLOAD_NAMES),
                        help=f"comma-separated, from {','.join(WORKLOAD_NAMES)} (default: all)")
    parser.add_argument("--optimizers", type=_name_list(set(implementations.OPTIMIZER_NAMES) | case_names),
                        default=[name.lower() for name in implementations.OPTIMIZER_NAMES],
                        help="comma-separated optimizer classes (adam,adamw,sgd,adagrad,rmsprop) or case "
                             "names (e.g. sgd-nesterov) (default: all)")
    parser.add_argument("--dtypes", type=_name_list(implementations.DTYPES), default=list(implementations.DTYPES),
                        help="comma-separated param dtypes, from fp32,bf16 (default: all)")
    parser.add_argument("--rounds", type=_positive_int,
                        help=f"interleaved rounds (default {DEFAULTS['rounds']}, quick {QUICK_DEFAULTS['rounds']})")
    parser.add_argument("--steps", type=_positive_int,
                        help=f"timed steps per implementation per round (default {DEFAULTS['steps']}, "
                             f"quick {QUICK_DEFAULTS['steps']})")
    parser.add_argument("--warmup", type=_non_negative_int,
                        help=f"untimed steps per implementation before the rounds (default {DEFAULTS['warmup']})")
    parser.add_argument("--quick", action="store_true",
                        help="small workloads with the same tensor structure and few rounds, for tests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the params and grads (default 0)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"),
                        help="directory for results.jsonl (appended) and latest-<device>.md "
                             "(default: benchmarks/results)")
    args = parser.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch.cuda.is_available() is False")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device} is not supported; use cpu or cuda")
    if args.device.type == "cuda" and args.device.index is None:
        # torch.cuda.set_device and the events need a numbered device.
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.cases = implementations.select_cases(args.optimizers, args.dtypes)
    if not args.cases:
        parser.error(f"no case has optimizer in {args.optimizers} and dtype in {args.dtypes}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events and synchronize act on the current device
    fused_opt = implementations.load_fused_opt()
    metadata = report.run_metadata(device, "python -m fused_opt.bench " + shlex.join(argv), fused_opt)
    load = metadata["load_average"]
    if device.type == "cpu" and load is not None and load >= 0.5 * os.cpu_count():
        print(f"note: load average {load:.2f} on {os.cpu_count()} cores at start; while other processes run, "
              "times are noisy", file=sys.stderr)
    jsonl_path = args.output / "results.jsonl"
    run_rows = []
    for workload_name in args.workloads:
        workload = make_workload(workload_name, device.type, quick=args.quick)
        probe = harness.Probe(workload.numel, device)
        workload_rows = []
        for case in args.cases:
            print(f"measuring {workload.name} / {case.name} {case.dtype} ...", file=sys.stderr, flush=True)
            results = harness.measure_case(case, workload, device, probe, fused_opt, rounds=args.rounds,
                                           steps=args.steps, warmup=args.warmup, seed=args.seed)
            context = {**metadata, "workload": workload.name, "num_tensors": workload.num_tensors,
                       "case": case.name, "optimizer": case.optimizer, "rounds": args.rounds,
                       "steps_per_round": args.steps, "warmup_steps": args.warmup}
            workload_rows += report.make_rows(context, results)
        del probe  # before the next workload allocates its own
        print(report.format_table(workload_rows) + "\n", flush=True)
        # Appended per workload so that an interrupted run keeps what it measured.
        report.append_jsonl(workload_rows, jsonl_path)
        run_rows += workload_rows
    markdown_path = args.output / f"latest-{device.type}.md"
    report.write_markdown(run_rows, markdown_path)
    print(f"rows appended to {jsonl_path}; tables in {markdown_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
