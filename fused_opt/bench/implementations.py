"""What is benchmarked: the optimizer cases, the implementations of each, and their byte counts."""

import sys
from dataclasses import dataclass, field

import torch

from .workloads import Workload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTIMIZER_NAMES = ("Adam", "AdamW", "SGD", "Adagrad", "RMSprop")

REFERENCE = "fused_opt"
IMPLEMENTATIONS = (REFERENCE, "torch-forloop", "torch-foreach", "torch-fused")
_TORCH_FLAGS = {
    "torch-forloop": {"foreach": False},
    "torch-foreach": {"foreach": True},
    "torch-fused": {"fused": True},
}


def step_bytes_per_param(n_states: int, element_size: int) -> int:
    """Memory traffic of one optimizer step per parameter, in bytes.

    Every tensor the step touches is counted once per read and once per write, each element `element_size`
    bytes (params, grads and states all in the params' dtype, as torch.optim keeps them): the param is read
    and written, the grad only read, and each of the `n_states` state tensors read and written. Scalars and
    per-tensor step counters are left out, as are temporaries an implementation may add: this is the
    traffic the math needs, so GB/s computed from it compares implementations on equal terms.

    Adam fp32 (m, v): 2*4 + 4 + 2*2*4 = 28 B; SGD momentum fp32: 20 B; AdamW bf16: 14 B.
    """
    return element_size * (2 + 1 + 2 * n_states)


@dataclass(frozen=True)
class Case:
    """One optimizer configuration; `name` plus `dtype` identify it in the results."""
    name: str
    optimizer: str
    kwargs: dict = field(hash=False)
    dtype: str
    n_states: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bytes_per_param(self) -> int:
        return step_bytes_per_param(self.n_states, self.torch_dtype.itemsize)


CASES = (
    Case("adam", "Adam", {"lr": 1e-3}, "fp32", n_states=2),
    Case("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 0.01}, "fp32", n_states=2),
    Case("sgd-momentum", "SGD", {"lr": 1e-2, "momentum": 0.9}, "fp32", n_states=1),
    Case("sgd-nesterov", "SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True}, "fp32", n_states=1),
    Case("adagrad", "Adagrad", {"lr": 1e-2}, "fp32", n_states=1),
    Case("rmsprop", "RMSprop", {"lr": 1e-2}, "fp32", n_states=1),
    Case("rmsprop-centered-momentum", "RMSprop", {"lr": 1e-2, "centered": True, "momentum": 0.9}, "fp32",
         n_states=3),
    Case("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 0.01}, "bf16", n_states=2),
)


def select_cases(optimizers: list[str], dtypes: list[str]) -> list[Case]:
    """Cases whose optimizer class (e.g. "sgd") or case name (e.g. "sgd-nesterov") is listed, in a listed
    dtype; names are case-insensitive."""
    wanted = {name.lower() for name in optimizers}
    return [case for case in CASES
            if (case.optimizer.lower() in wanted or case.name in wanted) and case.dtype in dtypes]


class Unsupported(Exception):
    """torch has no kernel for this implementation of the case; reported as skipped, not as an error."""


def load_fused_opt():
    """The fused_opt package, or None (after a one-line note) when it cannot be imported or exports none of
    the optimizers yet, so that the benchmark still measures torch.optim alone."""
    try:
        import fused_opt
    except Exception as exc:  # a half-built extension can fail in many ways; all mean "not available"
        print(f"note: fused_opt not importable ({type(exc).__name__}: {exc}); measuring torch.optim only",
              file=sys.stderr)
        return None
    if not any(hasattr(fused_opt, name) for name in OPTIMIZER_NAMES):
        print("note: fused_opt exports no optimizer classes yet; measuring torch.optim only", file=sys.stderr)
        return None
    return fused_opt


def implementation_names(fused_opt) -> list[str]:
    return [name for name in IMPLEMENTATIONS if name != REFERENCE or fused_opt is not None]


def make_tensors(workload: Workload, dtype: torch.dtype, device: torch.device,
                 seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Seeded random params and grads for the workload. The grads are random rather than zero so that the
    optimizer states hold ordinary values, as in training, instead of staying at zero."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(shape, generator=generator, device=device, dtype=dtype) for shape in workload.shapes]
    grads = [torch.randn(shape, generator=generator, device=device, dtype=dtype) for shape in workload.shapes]
    return params, grads


def build(name: str, case: Case, params: list[torch.Tensor], grads: list[torch.Tensor],
          fused_opt) -> torch.optim.Optimizer:
    """An optimizer of implementation `name` over its own copies of `params`, with `grads` attached.

    Raises Unsupported when torch has no fused kernel for the case; that is found by constructing it and
    taking one step, since torch only rejects some dtype and device combinations inside step().
    """
    own_params = [torch.nn.Parameter(p.clone()) for p in params]
    for param, grad in zip(own_params, grads):
        param.grad = grad.clone()
    if name == REFERENCE:
        return getattr(fused_opt, case.optimizer)(own_params, **case.kwargs)
    optimizer_class = getattr(torch.optim, case.optimizer)
    if name != "torch-fused":
        return optimizer_class(own_params, **case.kwargs, **_TORCH_FLAGS[name])
    try:
        optimizer = optimizer_class(own_params, **case.kwargs, **_TORCH_FLAGS[name])
        optimizer.step()
    except Exception as exc:
        raise Unsupported(f"torch has no fused {case.optimizer} for {case.dtype} on {params[0].device.type}: "
                          f"{type(exc).__name__}: {exc}") from exc
    return optimizer
