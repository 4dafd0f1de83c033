"""What bfloat16 optimizer states cost in training quality: the same small model trained to the
same budget with float32 states and with state_dtype=torch.bfloat16, and with torch.optim.

The task is a regression whose targets a fixed random teacher network computes from Gaussian
inputs (nothing is downloaded); the student, a 3-layer MLP, trains with AdamW on fresh batches,
the same seeds for every run. Reports the final loss (the mean over the last 100 steps) and its
ratio to the float32-state run.

    python benchmarks/state_dtype_quality.py [--steps 3000] [--output benchmarks/results/state-dtype]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
from pathlib import Path

import torch

import fused_opt

WIDTH, DEPTH, FEATURES, BATCH = 256, 3, 64, 256


def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers, width = [], FEATURES
    for _ in range(DEPTH - 1):
        layers += [torch.nn.Linear(width, WIDTH), torch.nn.GELU()]
        width = WIDTH
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def train(make_optimizer, steps: int) -> float:
    teacher, student = mlp(1), mlp(2)
    optimizer = make_optimizer(student.parameters())
    data = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        x = torch.randn(BATCH, FEATURES, generator=data)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(student(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-100:]
    return sum(tail) / len(tail)


RUNS = {
    "torch.optim.AdamW": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
    "fused_opt.AdamW, float32 states": lambda params: fused_opt.AdamW(params, lr=1e-3, weight_decay=0.01),
    "fused_opt.AdamW, bfloat16 states": lambda params: fused_opt.AdamW(
        params, lr=1e-3, weight_decay=0.01, state_dtype=torch.bfloat16),
}
BASELINE = "fused_opt.AdamW, float32 states"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--output", type=Path, default=None, help="folder for quality.md (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    losses = {name: train(make, args.steps) for name, make in RUNS.items()}
    lines = [
        "# bfloat16 optimizer states: training quality",
        "",
        f"- when: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"{platform.machine()} CPU, one thread; torch {torch.__version__}; commit {commit()}",
        f"- command: `python benchmarks/state_dtype_quality.py --steps {args.steps}`",
        f"- a {DEPTH}-layer MLP (width {WIDTH}) regressing a fixed random teacher of the same shape on fresh "
        f"Gaussian batches of {BATCH}x{FEATURES}, AdamW lr 1e-3, weight decay 0.01, {args.steps} steps, same "
        "seeds for every run; final loss: the mean over the last 100 steps",
        "",
        "| optimizer | final loss | ratio to float32 states |",
        "|---|---:|---:|",
    ]
    for name, loss in losses.items():
        lines.append(f"| {name} | {loss:.4g} | {loss / losses[BASELINE]:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "quality.md").write_text(text)


if __name__ == "__main__":
    main()
