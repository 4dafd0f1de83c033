"""Optimizer step of an FSDP2-sharded GPT-2 on CPU ranks (gloo): fused_opt against torch.optim.

Every rank holds GPT-2 small's 148 params sharded by ``fully_shard`` (Shard(0) DTensors) and
random grads with the params' placements, and times ``optimizer.step()`` alone; a case's time is
the slowest rank's, the median over interleaved rounds (each round runs every case once, so drift
in the machine's speed hits all cases alike), and its ratio to fused_opt's is taken within each
round: the median and range of those per-round ratios. The clip cases add global-norm clipping to 1.0:
fused_opt's ``max_grad_norm`` (a read-only pass and one all_reduce) against torch's
``clip_grad_norm_`` on the DTensor grads followed by the step, and torch's clip alone. Every case
steps the same params and grads (each optimizer its own states), which keeps a full-size run in
memory; the values do not change the time of a step.

    python benchmarks/fsdp2_step.py [--ranks 2] [--rounds 5] [--steps 3] [--tiny]

Prints a markdown table; ``--output FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

import fused_opt
from fused_opt.bench.workloads import gpt2_shapes

LR = 1e-4
MAX_NORM = 1.0


def _cases():
    def torch_adamw(impl):
        def build(params):
            return torch.optim.AdamW(params, lr=LR, **{impl: True})

        return build

    def clipped(build):
        def step(model, optimizer):
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)
            optimizer.step()

        return build, step

    def clip_alone(model, optimizer):
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)

    plain = lambda model, optimizer: optimizer.step()  # noqa: E731
    return {
        "fused_opt AdamW": (lambda params: fused_opt.AdamW(params, lr=LR), plain),
        "torch AdamW foreach": (torch_adamw("foreach"), plain),
        "torch AdamW fused": (torch_adamw("fused"), plain),
        "fused_opt AdamW, max_grad_norm": (
            lambda params: fused_opt.AdamW(params, lr=LR, max_grad_norm=MAX_NORM), plain),
        "torch clip_grad_norm_ + AdamW foreach": clipped(torch_adamw("foreach")),
        "torch clip_grad_norm_ + AdamW fused": clipped(torch_adamw("fused")),
        "torch clip_grad_norm_ alone": (lambda params: None, clip_alone),
    }


def _model(tiny: bool) -> torch.nn.Module:
    shapes = gpt2_shapes(n_embd=64, vocab_size=1000, n_positions=128) if tiny else gpt2_shapes()
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(shape) * 0.02)
                                    for shape in shapes])
    return fully_shard(model)


def _worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        runs = {}
        model = _model(args.tiny)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        for name, (build, step) in _cases().items():
            try:
                optimizer = build(list(model.parameters()))
                step(model, optimizer)  # states made outside the timing
            except Exception as error:  # noqa: BLE001 - a peer that cannot run is reported
                runs[name] = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
                continue
            runs[name] = (model, optimizer, step)
        times = {name: [] for name, run in runs.items() if not isinstance(run, str)}
        for _ in range(args.rounds):
            for name in times:
                model, optimizer, step = runs[name]
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(model, optimizer)
                elapsed = torch.tensor((time.perf_counter() - start) / args.steps)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[name].append(elapsed.item())
        if rank == 0:
            results["times"] = times
            results["failed"] = {name: run for name, run in runs.items() if isinstance(run, str)}
    finally:
        dist.destroy_process_group()
    # torch 2.13 and 2.14 abort now and then in the C++ static destructors of a process that ran
    # FSDP2 over gloo (tests/test_distributed.py says more); the results are already handed over.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="GPT-2's structure at toy sizes")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    # Other work on the machine slows every case of a round alike, but widens the spread.
    load = os.getloadavg()[0]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(args.ranks, _free_port(), args, results), nprocs=args.ranks,
             join=True)
    times, failed = results["times"], results["failed"]
    base_name, clip_name = "fused_opt AdamW", "fused_opt AdamW, max_grad_norm"
    lines = [
        f"FSDP2 GPT-2 {'(tiny) ' if args.tiny else 'small '}optimizer step, {args.ranks} CPU ranks "
        f"(gloo), torch {torch.__version__}, commit {_commit()}, {_cpu()}, "
        f"{os.cpu_count()} cores; median of {args.rounds} interleaved rounds of {args.steps} "
        "steps, slowest rank (lower is better)",
        "",
        f"command: `python {' '.join(sys.argv)}`; load average at start: {load:.2f}",
        "",
        "| case | ms per step | time / fused_opt's, per round: median [min-max] |",
        "|---|---:|---:|",
    ]

    def ratio(name: str, reference: str) -> str:
        ratios = [a / b for a, b in zip(times[name], times[reference])]
        return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"

    for name, rounds in times.items():
        reference = clip_name if ("clip" in name or "max_grad_norm" in name) else base_name
        if reference in times:
            lines.append(f"| {name} | {statistics.median(rounds) * 1e3:.1f} | "
                         f"{ratio(name, reference)} |")
    for name, reason in failed.items():
        lines.append(f"| {name} | {reason} | |")
    if clip_name in times:
        added = [a - b for a, b in zip(times[clip_name], times[base_name])]
        lines += ["", f"Global clipping costs fused_opt {ratio(clip_name, base_name)} its plain "
                  f"step (+{statistics.median(added) * 1e3:.1f} ms, median over rounds)."]
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
