"""What low-precision optimizer storage costs in training quality: the same small model trained to
the same budget with float32 states, with state_dtype=torch.bfloat16 and torch.uint8 (blockwise
8-bit), with bfloat16 params (with and without float32 masters), and with torch.optim. Nothing is downloaded; the data is generated.

Two tasks (--task):
- mlp: a 3-layer MLP regressing a fixed random teacher of the same shape on fresh Gaussian
  batches. Its loss goes towards zero, where small differences of the trajectory are large
  relative ones.
- lm: a 2-layer causal transformer language model on sequences drawn from a fixed random
  second-order Markov source over 32 tokens. The source's entropy rate (the loss of its own
  conditional probabilities on the held-out sequences) is the floor no model goes below, so the
  table gives each run's loss above that floor too.

Reports the final loss (mlp: the mean over the last 100 steps; lm: on 512 held-out sequences)
and its ratio to the float32-state run of fused_opt.

    python benchmarks/state_dtype_quality.py --task lm [--steps 3000] [--output benchmarks/results/state-dtype]
        [--runs 8-bit]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

import fused_opt

MLP_WIDTH, MLP_DEPTH, MLP_FEATURES, MLP_BATCH = 256, 3, 64, 256
LM_VOCAB, LM_WIDTH, LM_HEADS, LM_LAYERS, LM_LENGTH, LM_BATCH, LM_HELD_OUT = 32, 64, 4, 2, 64, 32, 512
LR = 1e-3
WEIGHT_DECAY = 0.01
LM_CLIP = 1.0  # global gradient norm: a trial run of torch.optim at lr 3e-3 without it went to NaN


def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers, width = [], MLP_FEATURES
    for _ in range(MLP_DEPTH - 1):
        layers += [torch.nn.Linear(width, MLP_WIDTH), torch.nn.GELU()]
        width = MLP_WIDTH
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


class CausalLM(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = torch.nn.Embedding(LM_VOCAB, LM_WIDTH)
        self.position = torch.nn.Parameter(torch.randn(LM_LENGTH, LM_WIDTH) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(LM_WIDTH, LM_HEADS, 4 * LM_WIDTH, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, LM_LAYERS, enable_nested_tensor=False)
        self.head = torch.nn.Linear(LM_WIDTH, LM_VOCAB)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(LM_LENGTH),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(tokens) + self.position
        return self.head(self.body(hidden, mask=self.mask.to(hidden.dtype), is_causal=True))


class MarkovSource:
    """Sequences whose every token depends on the two before it, through transition rows drawn
    once from a sparse Dirichlet (most of each row's mass on a few tokens)."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        rows = torch.distributions.Dirichlet(torch.full((LM_VOCAB, LM_VOCAB, LM_VOCAB), 0.1)).sample()
        # Draws at concentration 0.1 can underflow to zero; the clamp keeps every row a distribution.
        rows = rows.clamp_min(1e-30)
        self.transitions = rows / rows.sum(-1, keepdim=True)

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        tokens = torch.empty(count, LM_LENGTH + 1, dtype=torch.long)
        tokens[:, :2] = torch.randint(LM_VOCAB, (count, 2), generator=generator)
        for i in range(2, LM_LENGTH + 1):
            rows = self.transitions[tokens[:, i - 2], tokens[:, i - 1]]
            tokens[:, i] = torch.multinomial(rows, 1, generator=generator).squeeze(1)
        return tokens

    def entropy_rate(self, tokens: torch.Tensor) -> float:
        """The source's own cross-entropy on the positions a model predicts from two tokens."""
        rows = self.transitions[tokens[:, :-2], tokens[:, 1:-1]]
        return -rows.gather(-1, tokens[:, 2:, None]).log().mean().item()


def lm_loss(model: CausalLM, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1]).float()
    # The first position has one token of context, which no model can predict from; the floor
    # counts positions 2 on, and so does the loss.
    return torch.nn.functional.cross_entropy(logits[:, 1:].flatten(0, 1), tokens[:, 2:].flatten())


def train_mlp(make_optimizer, dtype: torch.dtype, steps: int) -> float:
    teacher, student = mlp(1), mlp(2).to(dtype)
    optimizer = make_optimizer(student.parameters())
    data = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        x = torch.randn(MLP_BATCH, MLP_FEATURES, generator=data)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(student(x.to(dtype)).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-100:]
    return sum(tail) / len(tail)


def train_lm(make_optimizer, dtype: torch.dtype, steps: int, source: MarkovSource,
             held_out: torch.Tensor) -> float:
    model = CausalLM(2).to(dtype)
    optimizer = make_optimizer(model.parameters())
    data = torch.Generator().manual_seed(4)
    for _ in range(steps):
        loss = lm_loss(model, source.sample(LM_BATCH, data))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), LM_CLIP)
        optimizer.step()
    with torch.no_grad():
        return lm_loss(model, held_out).item()


# name: (the params' dtype, the optimizer given params and lr)
Run = tuple[torch.dtype, Callable[..., torch.optim.Optimizer]]
RUNS: dict[str, Run] = {
    "torch.optim.AdamW": (torch.float32, lambda params, lr: torch.optim.AdamW(
        params, lr=lr, weight_decay=WEIGHT_DECAY)),
    "fused_opt.AdamW, float32 states": (torch.float32, lambda params, lr: fused_opt.AdamW(
        params, lr=lr, weight_decay=WEIGHT_DECAY)),
    "fused_opt.AdamW, bfloat16 states": (torch.float32, lambda params, lr: fused_opt.AdamW(
        params, lr=lr, weight_decay=WEIGHT_DECAY, state_dtype=torch.bfloat16)),
    "bfloat16 params, float32 masters and states": (torch.bfloat16, lambda params, lr: fused_opt.AdamW(
        params, lr=lr, weight_decay=WEIGHT_DECAY, master_weights=True)),
    "bfloat16 params, float32 masters, bfloat16 states": (torch.bfloat16, lambda params, lr: fused_opt.AdamW(
        params, lr=lr, weight_decay=WEIGHT_DECAY, master_weights=True, state_dtype=torch.bfloat16)),
    "fused_opt.AdamW, 8-bit states": (torch.float32, lambda params, lr: fused_opt.AdamW(
        params, lr=lr, weight_decay=WEIGHT_DECAY, state_dtype=torch.uint8)),
    "bfloat16 params, float32 masters, 8-bit states": (torch.bfloat16, lambda params, lr: fused_opt.AdamW(
        params, lr=lr, weight_decay=WEIGHT_DECAY, master_weights=True, state_dtype=torch.uint8)),
    "bfloat16 params and states, no masters (nearest rounding)": (torch.bfloat16, lambda params, lr: fused_opt.AdamW(
        params, lr=lr, weight_decay=WEIGHT_DECAY)),
    "bfloat16 params and states, no masters (stochastic rounding)": (
        torch.bfloat16, lambda params, lr: fused_opt.AdamW(
            params, lr=lr, weight_decay=WEIGHT_DECAY, param_rounding="stochastic")),
    "bfloat16 params and states, no masters (Kahan compensation)": (
        torch.bfloat16, lambda params, lr: fused_opt.AdamW(
            params, lr=lr, weight_decay=WEIGHT_DECAY, param_rounding="kahan")),
}
BASELINE = "fused_opt.AdamW, float32 states"


def _peer_runs() -> dict[str, Run]:
    """The peers' 8-bit AdamW, where they are importable (neither is a dependency of fused_opt).
    Both keep float32 states below 4,096 elements and quantize in blocks, as fused_opt does:
    bitsandbytes with its dynamic lookup-table codes and blocks of 256 (on the CPU as unfused
    torch ops), torchao with the same kind of codes in a tensor subclass whose step
    torch.compile builds."""
    runs: dict[str, Run] = {}
    try:
        import bitsandbytes
    except ImportError:
        pass
    else:
        runs["bitsandbytes.optim.AdamW8bit (8-bit states)"] = (torch.float32, lambda params, lr: (
            bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=WEIGHT_DECAY)))
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        pass
    else:
        runs["torchao.optim.AdamW8bit (8-bit states)"] = (torch.float32, lambda params, lr: (
            AdamW8bit(params, lr=lr, weight_decay=WEIGHT_DECAY)))
    return runs


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe(task: str, steps: int) -> str:
    if task == "mlp":
        return (f"a {MLP_DEPTH}-layer MLP (width {MLP_WIDTH}) regressing a fixed random teacher of the same shape "
                f"on fresh Gaussian batches of {MLP_BATCH}x{MLP_FEATURES}, AdamW lr {LR}, weight decay "
                f"{WEIGHT_DECAY}, {steps} steps, same seeds for every run; final loss: the mean over the last "
                "100 steps")
    return (f"a {LM_LAYERS}-layer causal transformer (width {LM_WIDTH}, {LM_HEADS} heads) on sequences of "
            f"{LM_LENGTH} tokens from a fixed random second-order Markov source over {LM_VOCAB} tokens, fresh "
            f"batches of {LM_BATCH}, AdamW lr {LR}, weight decay {WEIGHT_DECAY}, gradient norm clipped to "
            f"{LM_CLIP}, {steps} steps, same seeds for every run; final loss: cross-entropy (nats) on "
            f"{LM_HELD_OUT} held-out sequences")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("mlp", "lm"), default="lm")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for quality-TASK.md (default: print only)")
    parser.add_argument("--runs", default=None,
                        help="comma-separated words: only the runs whose name has one of them, and "
                             f"'{BASELINE}', which the ratios need (output: quality-TASK-WORDS.md)")
    args = parser.parse_args()
    words = args.runs.split(",") if args.runs else None
    runs = {name: run for name, run in {**RUNS, **_peer_runs()}.items()
            if words is None or name == BASELINE or any(word in name for word in words)}
    torch.set_num_threads(1)
    floor = None
    if args.task == "lm":
        source = MarkovSource(0)
        held_out = source.sample(LM_HELD_OUT, torch.Generator().manual_seed(5))
        floor = source.entropy_rate(held_out)
    losses = {}
    for name, (dtype, make) in runs.items():
        def make_optimizer(params, make=make):
            return make(params, LR)
        if args.task == "mlp":
            losses[name] = train_mlp(make_optimizer, dtype, args.steps)
        else:
            losses[name] = train_lm(make_optimizer, dtype, args.steps, source, held_out)
    lines = [
        f"# Low-precision optimizer storage: training quality ({args.task})",
        "",
        f"- when: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"{platform.machine()} CPU, one thread; torch {torch.__version__}; commit {commit()}",
        f"- command: `python benchmarks/state_dtype_quality.py --task {args.task} --steps {args.steps}"
        + (f" --runs {args.runs}" if args.runs else "") + "`",
        f"- {describe(args.task, args.steps)}",
    ]
    if floor is not None:
        lines.append(f"- the source's entropy rate on the held-out sequences (the floor): {floor:.4f} nats")
    lines += ["", "| run | final loss | ratio to float32 states |"
              + (" above the floor | ratio above the floor |" if floor is not None else ""),
              "|---|---:|---:|" + ("---:|---:|" if floor is not None else "")]
    for name, loss in losses.items():
        row = f"| {name} | {loss:.5g} | {loss / losses[BASELINE]:.4f} |"
        if floor is not None:
            above, baseline_above = loss - floor, losses[BASELINE] - floor
            row += f" {above:.4f} | {above / baseline_above:.3f} |"
        if not math.isfinite(loss):
            row += " (diverged)"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        suffix = "-" + "-".join(word.replace(" ", "_") for word in words) if words else ""
        (args.output / f"quality-{args.task}{suffix}.md").write_text(text)


if __name__ == "__main__":
    main()
