"""What L1 costs inside a fused step: each optimizer's step with l1_decay set, in both modes,
against the same step without it (the same bytes move: L1 reads and writes nothing more).

Timed in interleaved rounds (none, subgradient, proximal, in an order that rotates each round):
the machine's memory bandwidth drifts between levels, so only ratios taken within a round mean
something. Reports the median over rounds of each round's ratio to the step without L1.

    python benchmarks/l1_cost.py [--numel 16000000] [--rounds 9] [--steps 5] [--threads 1]
        [--clock wall|thread] [--output benchmarks/results/l1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import fused_opt

CASES = {
    "adam": ("Adam", {"lr": 1e-3}),
    "adamw": ("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}),
    "sgd-momentum": ("SGD", {"lr": 1e-3, "momentum": 0.9}),
    "rmsprop": ("RMSprop", {"lr": 1e-3}),
    "adagrad": ("Adagrad", {"lr": 1e-3}),
}
VARIANTS = {
    "none": {},
    "subgradient": {"l1_decay": 1e-4, "l1_mode": "subgradient"},
    "proximal": {"l1_decay": 1e-4, "l1_mode": "proximal"},
}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# wall: elapsed time. thread: CPU time of the calling thread, which runs the whole step with one
# intra-op thread; unlike wall time it leaves out the time the OS gives other processes, the
# largest noise on a shared, loaded machine (it still counts memory stalls, so bandwidth shared
# with others still shows).
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def step_ms(optimizer: torch.optim.Optimizer, steps: int, clock) -> float:
    """The median time of `steps` steps, in milliseconds."""
    times = []
    for _ in range(steps):
        start = clock()
        optimizer.step()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def measure(
    name: str, options: dict, numel: int, rounds: int, steps: int, clock
) -> dict[str, list]:
    generator = torch.Generator().manual_seed(0)
    initial = torch.randn(numel, generator=generator)
    grad = torch.randn(numel, generator=generator)
    optimizers = {}
    for variant, l1 in VARIANTS.items():
        p = torch.nn.Parameter(initial.clone())
        p.grad = grad.clone()
        optimizers[variant] = getattr(fused_opt, name)([p], **options, **l1)
        optimizers[variant].step()  # states made, pages touched
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    order = list(VARIANTS)
    for round_index in range(rounds):
        rotated = order[round_index % len(order):] + order[: round_index % len(order)]
        for variant in rotated:
            times[variant].append(step_ms(optimizers[variant], steps, clock))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16_000_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=CLOCKS, default="wall")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread times the calling thread only: use --threads 1")
    torch.set_num_threads(args.threads)

    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {
        "timestamp": when,
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "threads": args.threads,
        "clock": args.clock,
        "torch_version": torch.__version__,
        "git_commit": commit(),
        "numel": args.numel,
        "dtype": "fp32",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "load_average": os.getloadavg()[0],
    }
    rows = []
    lines = [
        "# Cost of L1 in the fused step (cpu)",
        "",
        f"- when: {when}; device: cpu ({meta['device_name']}), {args.threads} thread(s); "
        f"torch {torch.__version__}; commit {meta['git_commit']}",
        f"- command: `python benchmarks/l1_cost.py --numel {args.numel} --rounds {args.rounds} "
        f"--steps {args.steps} --threads {args.threads} --clock {args.clock}`",
        f"- one fp32 tensor of {args.numel / 1e6:.1f}M params; {args.rounds} interleaved rounds "
        f"of {args.steps} steps per variant, timed by the {args.clock} clock; ms/step: median "
        "over rounds of each round's median; "
        "ratio: median [min-max] over rounds of the round's time over the same round's time "
        "without L1 (same bytes moved)",
        f"- load average at start: {meta['load_average']:.2f} on {os.cpu_count()} cores (other "
        "work on the machine slows every variant of a round alike, but widens the spread)",
        "",
        "| case | L1 | ms/step | ratio to no L1 [min-max] |",
        "|---|---|---:|---:|",
    ]
    for case, (name, options) in CASES.items():
        times = measure(name, options, args.numel, args.rounds, args.steps, CLOCKS[args.clock])
        for variant, variant_times in times.items():
            ratios = [t / base for t, base in zip(variant_times, times["none"])]
            row = {
                **meta,
                "case": case,
                "optimizer": name,
                "l1": variant,
                "ms_median": statistics.median(variant_times),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
            rows.append(row)
            ratio = (
                "1.00x"
                if variant == "none"
                else f"{row['ratio_median']:.3f}x [{row['ratio_min']:.3f}-{row['ratio_max']:.3f}]"
            )
            lines.append(f"| {case} | {variant} | {row['ms_median']:.1f} | {ratio} |")
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        threads = "" if args.threads == 1 else f"-{args.threads}-threads"
        (args.output / f"cost-cpu-{args.clock}{threads}.md").write_text(report)
        with open(args.output / "cost-cpu.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
