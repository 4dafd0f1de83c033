"""The parameter lists an optimizer step is benchmarked on.

A workload is only a list of shapes; tensors are made per case (see implementations.make_tensors) so that
each case can pick its own dtype and free its memory before the next one.
"""

import math
import os
import random
from dataclasses import dataclass

import torch

WORKLOAD_NAMES = ("large", "gpt2", "llama-1b", "many-small")
# The quick default: one tensor for raw bandwidth and a real model's shapes; --full adds the rest.
DEFAULT_WORKLOADS = ("large", "gpt2")

# One huge tensor measures bandwidth with no per-tensor overhead. On a GPU 1B params match the field notes'
# floor (AdamW's 28 B/param at 3.0 TB/s is ~9.3 ms); on CPU, 64M keeps several optimizers' copies and the
# default run's time small.
LARGE_NUMEL = {"cpu": 64_000_000, "cuda": 1_000_000_000}
TINY_LARGE_NUMEL = 1_000_000

# Memory a case holds per parameter of its workload at most: the fp32 grads its implementations share (4 B)
# and, for each of up to five implementations, fp32 params and two states (12 B each).
HELD_BYTES_PER_PARAM = 64
# The Llama workload is scaled down until it fits in this share of the device's memory, leaving the rest to
# whatever else runs on the machine.
MEMORY_SHARE = 0.5

MANY_SMALL_COUNT = 4096
MANY_SMALL_MAX_NUMEL = 65_535  # "small": under 64K elements, below one multi-tensor chunk of the peers
TINY_MANY_SMALL_COUNT = 256
TINY_MANY_SMALL_MAX_NUMEL = 1023


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    note: str = ""

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


def llama_shapes(n_layer: int = 22, hidden: int = 2048, intermediate: int = 5632, kv_dim: int = 256,
                 vocab_size: int = 32000) -> tuple[tuple[int, ...], ...]:
    """Parameter shapes of a Llama-style decoder: 1.1B params in 201 tensors by default (the TinyLlama-1.1B
    layout: grouped-query attention with 4 KV heads of 64, a SwiGLU MLP, RMSNorm vectors without bias, an
    untied output head)."""
    layer = (
        (hidden,),                                                       # input_layernorm
        (hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden),  # q, k, v, o
        (hidden,),                                                       # post_attention_layernorm
        (intermediate, hidden), (intermediate, hidden), (hidden, intermediate),  # gate, up, down
    )
    return ((vocab_size, hidden),) + layer * n_layer + ((hidden,), (vocab_size, hidden))


def many_small_shapes(count: int = MANY_SMALL_COUNT, max_numel: int = MANY_SMALL_MAX_NUMEL,
                      seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """`count` vectors with sizes spread log-uniformly from 64 elements to `max_numel`, the same on every
    run: per-tensor overhead, which one huge tensor hides, dominates here."""
    rng = random.Random(seed)
    low = min(64, max_numel)
    return tuple((round(math.exp(rng.uniform(math.log(low), math.log(max_numel)))),) for _ in range(count))


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _llama_fitting(memory_bytes: int) -> Workload:
    """The Llama list at the widest of 1, 1/2, 1/4, ... of its widths whose case fits in the memory share;
    the layer count, and so the 201 tensors and the small norm vectors among them, stay."""
    full = llama_shapes()
    budget = MEMORY_SHARE * memory_bytes
    divisor = 1
    while True:
        shapes = llama_shapes(hidden=2048 // divisor, intermediate=5632 // divisor, kv_dim=256 // divisor)
        numel = sum(math.prod(shape) for shape in shapes)
        if numel * HELD_BYTES_PER_PARAM <= budget or divisor == 64:
            break
        divisor *= 2
    if divisor == 1:
        return Workload("llama-1b", shapes)
    full_numel = sum(math.prod(shape) for shape in full)
    note = (f"scaled down to 1/{divisor} of the widths ({numel / 1e6:.0f}M of {full_numel / 1e9:.2f}B params) "
            f"so that a case fits in {MEMORY_SHARE:.0%} of this device's {memory_bytes / 2**30:.0f} GiB")
    return Workload("llama-1b", shapes, note)


def make_workload(name: str, device_type: str, *, tiny: bool = False, memory_bytes: int | None = None) -> Workload:
    """The named workload sized for the device; `tiny` keeps its structure (one tensor, GPT-2's 148 tensors,
    Llama's 201, thousands of small ones) at a size a test can step in milliseconds. `memory_bytes`, the
    device's memory, sizes llama-1b."""
    if name == "large":
        numel = TINY_LARGE_NUMEL if tiny else LARGE_NUMEL[device_type]
        return Workload(name, ((numel,),))
    if name == "gpt2":
        shapes = gpt2_shapes(n_embd=64, vocab_size=1000, n_positions=128) if tiny else gpt2_shapes()
        return Workload(name, shapes)
    if name == "llama-1b":
        if tiny:
            return Workload(name, llama_shapes(hidden=64, intermediate=176, kv_dim=16, vocab_size=1000),
                            "tiny widths for tests")
        if memory_bytes is None:
            raise ValueError("llama-1b is sized by the device's memory; pass memory_bytes")
        return _llama_fitting(memory_bytes)
    if name == "many-small":
        if tiny:
            return Workload(name, many_small_shapes(TINY_MANY_SMALL_COUNT, TINY_MANY_SMALL_MAX_NUMEL))
        return Workload(name, many_small_shapes())
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")
