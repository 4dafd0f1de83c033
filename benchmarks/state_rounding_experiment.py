"""What rounding the 8-bit states' codes stochastically would give, measured before the kernels do it.

fused_opt's 8-bit states (state_dtype=torch.uint8) round each new state to the nearest code. A
second moment moves by 1 - beta2 = 0.1% of itself per step, far below the codes' steps of up to
1/16, so where the gradient shrinks its decay rounds away and the step stays too small. Rounding
up or down at random, with the probabilities that make the rounding unbiased, lets it decay on
average. This script trains the tasks of benchmarks/state_dtype_quality.py (same models, data,
seeds and optimizer settings) with fused_opt.AdamW over float32 states that, after every step,
are encoded to the 8-bit format (fused_opt/_quantize.py: the block maxima, the codes) and decoded
back: rounding to nearest, that is the kernels' own step with state_dtype=torch.uint8; or
stochastically, for the second moments only or for both moments, from torch's generator. Params
below 4,096 elements keep float32 states, as in the kernels.

It measures quality only (the round trips run as unfused torch ops after each step).
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

import fused_opt
from fused_opt import _quantize
from state_dtype_quality import (
    LM_HELD_OUT,
    LR,
    WEIGHT_DECAY,
    MarkovSource,
    commit,
    describe,
    train_lm,
    train_mlp,
)

# name: (round the first moments stochastically, round the second moments stochastically)
VARIANTS = {
    "nearest (the kernels' rounding)": (False, False),
    "stochastic, second moments only": (False, True),
    "stochastic, both moments": (True, True),
}


def round_trip(state: torch.Tensor, signed: bool, generator: torch.Generator | None) -> None:
    """`state` encoded to the 8-bit format and decoded, in place: to the nearest code without a
    generator, else up or down at random."""
    flat = state.reshape(-1)
    packed = _quantize.quantize(flat, signed, generator)
    flat.copy_(_quantize.dequantize(packed, flat.numel(), signed))


class RoundTripAdamW(fused_opt.AdamW):
    def __init__(self, params, stochastic: tuple[bool, bool]) -> None:
        super().__init__(params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.generators = [torch.Generator().manual_seed(index) if on else None
                           for index, on in enumerate(stochastic)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and p.numel() >= _quantize.MIN_NUMEL:
                    round_trip(state["exp_avg"], True, self.generators[0])
                    round_trip(state["exp_avg_sq"], False, self.generators[1])
        return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("mlp", "lm"), default="lm")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for state-rounding-TASK.md (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = {"fused_opt.AdamW, float32 states": None}
    losses = {}
    for name, stochastic in {**baseline, **VARIANTS}.items():
        def make_optimizer(params, stochastic=stochastic):
            if stochastic is None:
                return fused_opt.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
            return RoundTripAdamW(params, stochastic)
        if args.task == "mlp":
            losses[name] = train_mlp(make_optimizer, torch.float32, args.steps)
        else:
            source = MarkovSource(0)
            held_out = source.sample(LM_HELD_OUT, torch.Generator().manual_seed(5))
            losses[name] = train_lm(make_optimizer, torch.float32, args.steps, source, held_out)
    first = next(iter(baseline))
    lines = [
        f"# 8-bit states rounded to nearest or stochastically: training quality ({args.task})",
        "",
        f"- when: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"{platform.machine()} CPU, one thread; torch {torch.__version__}; commit {commit()}",
        f"- command: `python benchmarks/state_rounding_experiment.py --task {args.task} --steps {args.steps}`",
        f"- {describe(args.task, args.steps)}",
        "- 8-bit runs: float32 states encoded to fused_opt's 8-bit format and decoded after every step "
        "(benchmarks/state_rounding_experiment.py); the kernels round to nearest",
        "",
        "| run | final loss | ratio to float32 states |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {loss:.5g} | {loss / losses[first]:.4f} |" for name, loss in losses.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / f"state-rounding-{args.task}.md").write_text(text)


if __name__ == "__main__":
    main()
