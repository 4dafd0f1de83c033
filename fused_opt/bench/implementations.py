"""What is benchmarked: the optimizer cases, the implementations of each, and their byte counts.

A case is one optimizer configuration (class, options, dtype, and optionally a pipeline around the step);
an implementation is a library's way of running it. fused_opt and torch.optim's three are defined here; the
other libraries' adapters live in peers.py and produce the same Implementation objects.
"""

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from .workloads import Workload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTIMIZER_NAMES = ("Adam", "AdamW", "SGD", "Adagrad", "RMSprop")

REFERENCE = "fused_opt"
TORCH_IMPLEMENTATIONS = ("torch-forloop", "torch-foreach", "torch-fused")
_TORCH_FLAGS = {
    "torch-forloop": {"foreach": False},
    "torch-foreach": {"foreach": True},
    "torch-fused": {"fused": True},
}

# Passes over the grads that a pipeline adds to the step, counted in grad elements read or written per param.
# amp-clip: GradScaler.unscale_ reads and writes the grads (2), clip_grad_norm_ reads them for the norm (1)
# and then reads and writes them to scale by the clip coefficient (2), which it does on every step.
PIPELINE_GRAD_PASSES = {"amp-clip": 5}


def step_bytes_per_param(n_states: int, element_size: int, state_size: int | None = None,
                         grad_passes: int = 0) -> int:
    """Memory traffic of one optimizer step per parameter, in bytes.

    Every tensor the step touches is counted once per read and once per write: the param is read and written
    and the grad only read, each `element_size` bytes; each of the `n_states` state tensors is read and
    written, `state_size` bytes per element (default: the params' size, as torch.optim keeps them); a
    pipeline around the step adds `grad_passes` more grad reads or writes. Scalars and per-tensor step
    counters are left out, as are temporaries an implementation may add: this is the traffic the math
    needs, so GB/s computed from it compares implementations on equal terms.

    Adam fp32 (m, v): 2*4 + 4 + 2*2*4 = 28 B; SGD momentum fp32: 20 B; AdamW bf16: 14 B; AdamW fp32 with
    GradScaler.unscale_ and clip_grad_norm_: 28 + 5*4 = 48 B.
    """
    state_size = element_size if state_size is None else state_size
    return element_size * (2 + 1 + grad_passes) + 2 * n_states * state_size


@dataclass(frozen=True)
class Case:
    """One optimizer configuration; `name` plus `dtype` identify it in the results.

    `pipeline` names what runs around the optimizer step (None: the bare step); `implementations`, when
    set, limits the case to those implementations; `in_default` puts it in the quick default run.
    """
    name: str
    optimizer: str
    kwargs: dict = field(hash=False)
    dtype: str
    n_states: int
    note: str = ""
    pipeline: str | None = None
    implementations: tuple[str, ...] | None = None
    in_default: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bytes_per_param(self) -> int:
        return self.bytes_per_param_with(state_size=None)

    def bytes_per_param_with(self, state_size: int | None) -> int:
        """The case's traffic for an implementation that keeps its states in `state_size`-byte elements."""
        return step_bytes_per_param(self.n_states, self.torch_dtype.itemsize, state_size,
                                    PIPELINE_GRAD_PASSES.get(self.pipeline, 0))


_ADAMW = {"lr": 1e-3, "weight_decay": 0.01}
# clip_grad_norm_'s threshold lies above the grads' norm: nothing is clipped, as in most steps of training, so
# the grads keep their values from step to step, while the norm and the scaling pass run as always.
CLIP_MAX_NORM = 1e9

# A master-weights case (bf16 params with an fp32 master copy) is one more entry in this table once
# fused_opt has that mode.
CASES = (
    Case("adam", "Adam", {"lr": 1e-3}, "fp32", n_states=2),
    Case("adam-amsgrad", "Adam", {"lr": 1e-3, "amsgrad": True}, "fp32", n_states=3),
    Case("adamw", "AdamW", _ADAMW, "fp32", n_states=2, in_default=True),
    Case("sgd-momentum", "SGD", {"lr": 1e-2, "momentum": 0.9}, "fp32", n_states=1, in_default=True),
    Case("sgd-nesterov", "SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True}, "fp32", n_states=1),
    Case("adagrad", "Adagrad", {"lr": 1e-2}, "fp32", n_states=1, in_default=True),
    Case("rmsprop", "RMSprop", {"lr": 1e-2}, "fp32", n_states=1, in_default=True),
    Case("rmsprop-centered-momentum", "RMSprop", {"lr": 1e-2, "centered": True, "momentum": 0.9}, "fp32",
         n_states=3),
    Case("adamw", "AdamW", _ADAMW, "bf16", n_states=2, in_default=True,
         note="bf16 params, grads and states, as torch.optim keeps them; no master weights"),
    Case("adamw-amp-clip", "AdamW", _ADAMW, "fp32", n_states=2, pipeline="amp-clip",
         implementations=(REFERENCE, "torch-fused"), in_default=True,
         note="per step: GradScaler.scale(loss), unscale_, clip_grad_norm_(foreach=True), GradScaler.step, "
              "update; torch-fused: AdamW(fused=True), which takes found_inf from the scaler; fused_opt: "
              "fused_opt.AdamW behind the same unscale_ and clip (no fused scaler yet, so the scaler reads "
              f"found_inf on the host first); scale 1.0 and max_norm {CLIP_MAX_NORM:g} so the grads keep "
              "their values"),
)


def select_cases(optimizers: list[str] | None, dtypes: list[str], full: bool) -> list[Case]:
    """Cases whose optimizer class (e.g. "sgd") or case name (e.g. "sgd-nesterov") is listed, in a listed
    dtype; names are case-insensitive. Without a list, every case with --full, else the quick default's."""
    if optimizers is None:
        return [case for case in CASES if (full or case.in_default) and case.dtype in dtypes]
    wanted = {name.lower() for name in optimizers}
    return [case for case in CASES
            if (case.optimizer.lower() in wanted or case.name in wanted) and case.dtype in dtypes]


class Unsupported(Exception):
    """The implementation has no kernel for this case; reported as skipped, not as an error."""


@dataclass(frozen=True)
class Implementation:
    """A library's way of running a case.

    `make_optimizer(case, params)` returns an optimizer over `params` (their grads attached) or raises
    Unsupported. `state_size` is the element size of its states when it does not keep them in the params'
    dtype (bitsandbytes' 8-bit states: 1). `optimizers`, when set, are the only optimizer classes it has:
    cases of others do not list it at all. `slow_here`, when set, says why the quick default leaves it out
    on this device.
    """
    name: str
    make_optimizer: Callable[[Case, list[torch.nn.Parameter]], torch.optim.Optimizer]
    state_size: int | None = None
    optimizers: tuple[str, ...] | None = None
    slow_here: str = ""

    def runs(self, case: Case) -> bool:
        """Whether the case lists this implementation (maybe as skipped, when an option is missing)."""
        return ((self.optimizers is None or case.optimizer in self.optimizers)
                and (case.implementations is None or self.name in case.implementations))

    def bytes_per_param(self, case: Case) -> int:
        return case.bytes_per_param_with(self.state_size)


@dataclass
class Prepared:
    """A built implementation: `step` runs one step of the case, `optimizer` holds its state."""
    step: Callable[[], object]
    optimizer: torch.optim.Optimizer


def load_fused_opt():
    """The fused_opt package, or None (after a one-line note) when it cannot be imported or exports none of
    the optimizers yet, so that the benchmark still measures the others."""
    try:
        import fused_opt
    except Exception as exc:  # a half-built extension can fail in many ways; all mean "not available"
        print(f"note: fused_opt not importable ({type(exc).__name__}: {exc}); measuring the others only",
              file=sys.stderr)
        return None
    if not any(hasattr(fused_opt, name) for name in OPTIMIZER_NAMES):
        print("note: fused_opt exports no optimizer classes yet; measuring the others only", file=sys.stderr)
        return None
    return fused_opt


def _torch_maker(name: str):
    def make(case: Case, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        optimizer_class = getattr(torch.optim, case.optimizer)
        if name != "torch-fused":
            return optimizer_class(params, **case.kwargs, **_TORCH_FLAGS[name])
        # torch rejects some dtype and device combinations only inside step(), so one step finds out; the
        # case's tensors are the implementation's own and the rounds step them anyway.
        try:
            optimizer = optimizer_class(params, **case.kwargs, **_TORCH_FLAGS[name])
            optimizer.step()
        except Exception as exc:
            raise Unsupported(f"torch has no fused {case.optimizer} for {case.dtype} on {params[0].device.type}: "
                              f"{type(exc).__name__}: {exc}") from exc
        return optimizer
    return make


def core_implementations(fused_opt) -> list[Implementation]:
    """fused_opt (when importable) and torch.optim's for-loop, foreach and fused implementations."""
    found = []
    if fused_opt is not None:
        found.append(Implementation(
            REFERENCE, lambda case, params: getattr(fused_opt, case.optimizer)(params, **case.kwargs)))
    found += [Implementation(name, _torch_maker(name)) for name in TORCH_IMPLEMENTATIONS]
    return found


def make_tensors(workload: Workload, dtype: torch.dtype, device: torch.device,
                 seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Seeded random params and grads for the workload. The grads are random rather than zero so that the
    optimizer states hold ordinary values, as in training, instead of staying at zero."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(shape, generator=generator, device=device, dtype=dtype) for shape in workload.shapes]
    grads = [torch.randn(shape, generator=generator, device=device, dtype=dtype) for shape in workload.shapes]
    return params, grads


def _amp_clip_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                   device: torch.device) -> Callable[[], None]:
    """One step of the AMP + clipping pipeline a mixed-precision training loop runs after backward()."""
    # growth_interval past any run's length keeps the scale, and so the grads' values, fixed.
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
    loss = torch.ones((), device=device)

    def step() -> None:
        scaler.scale(loss)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, CLIP_MAX_NORM, foreach=True)
        scaler.step(optimizer)
        scaler.update()

    return step


def prepare(implementation: Implementation, case: Case, params: list[torch.Tensor],
            grads: list[torch.Tensor]) -> Prepared:
    """`implementation` over its own copies of `params`, ready to step the case.

    The grads are shared by every implementation of a bare step, which only reads them; a pipeline that
    unscales and clips writes them, so it gets its own copies.
    """
    own_params = [torch.nn.Parameter(p.clone()) for p in params]
    for param, grad in zip(own_params, grads):
        param.grad = grad.clone() if case.pipeline else grad
    optimizer = implementation.make_optimizer(case, own_params)
    if case.pipeline == "amp-clip":
        return Prepared(_amp_clip_step(optimizer, own_params, params[0].device), optimizer)
    return Prepared(optimizer.step, optimizer)
