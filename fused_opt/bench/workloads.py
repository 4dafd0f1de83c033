"""The parameter lists an optimizer step is benchmarked on.

A workload is only a list of shapes; tensors are made per case (see implementations.make_tensors) so that
each case can pick its own dtype and free its memory before the next one.
"""

import math
from dataclasses import dataclass

WORKLOAD_NAMES = ("large", "gpt2")

# One huge tensor measures bandwidth with no per-tensor overhead. On a GPU 1B params match the field notes'
# floor (AdamW's 28 B/param at 3.0 TB/s is ~9.3 ms); on CPU, 64M keeps four optimizers' copies and the default
# run's time small.
LARGE_NUMEL = {"cpu": 64_000_000, "cuda": 1_000_000_000}
QUICK_LARGE_NUMEL = 1_000_000


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)


def gpt2_shapes(n_layer: int = 12, n_embd: int = 768, vocab_size: int = 50257,
                n_positions: int = 1024) -> tuple[tuple[int, ...], ...]:
    """Parameter shapes of a GPT-2 model in the order the model registers them (GPT-2 small by default).

    Linear weights are stored (in, out) as GPT-2's Conv1D keeps them; for a step only the sizes matter.
    """
    block = (
        (n_embd,), (n_embd,),                          # ln_1 weight, bias
        (n_embd, 3 * n_embd), (3 * n_embd,),           # attn.c_attn
        (n_embd, n_embd), (n_embd,),                   # attn.c_proj
        (n_embd,), (n_embd,),                          # ln_2 weight, bias
        (n_embd, 4 * n_embd), (4 * n_embd,),           # mlp.c_fc
        (4 * n_embd, n_embd), (n_embd,),               # mlp.c_proj
    )
    embeddings = ((vocab_size, n_embd), (n_positions, n_embd))
    final_norm = ((n_embd,), (n_embd,))
    return embeddings + block * n_layer + final_norm


def make_workload(name: str, device_type: str, quick: bool = False) -> Workload:
    """The named workload sized for the device; `quick` keeps its structure (one tensor, or GPT-2's 148
    tensors) at a size a test can step in milliseconds."""
    if name == "large":
        numel = QUICK_LARGE_NUMEL if quick else LARGE_NUMEL[device_type]
        return Workload(name, ((numel,),))
    if name == "gpt2":
        shapes = gpt2_shapes(n_embd=64, vocab_size=1000, n_positions=128) if quick else gpt2_shapes()
        return Workload(name, shapes)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")
