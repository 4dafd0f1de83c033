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

# Pipelines: what a training loop runs around the optimizer step. An implementation runs one either the
# stock way, with torch's tools around its step, or its own way (fused_opt's: inside its kernels).
AMP_CLIP = "amp-clip"
SCALED = "scaled"
MASTER_WEIGHTS = "master-weights"
BF16_STATES = "bf16-states"
EIGHT_BIT_STATES = "8bit-states"
STOCHASTIC_ROUNDING = "stochastic-rounding"
KAHAN = "kahan"


def step_bytes_per_param(n_states: int, element_size: int, state_size: int | None = None,
                         master_weights: bool = False) -> int:
    """Memory traffic of one optimizer step per parameter, in bytes.

    Every tensor the step touches is counted once per read and once per write: the param is read and written
    and the grad only read, each `element_size` bytes; each of the `n_states` state tensors is read and
    written, `state_size` bytes per element (default: the params' size, as torch.optim keeps them). With
    `master_weights` the step reads and writes an fp32 master copy and fp32 states and only writes the
    param. Scalars and per-tensor step counters are left out, as are temporaries an implementation may add:
    this is the traffic the math needs, so GB/s computed from it compares implementations on equal terms.

    Adam fp32 (m, v): 2*4 + 4 + 2*2*4 = 28 B; SGD momentum fp32: 20 B; AdamW bf16: 14 B; AdamW bf16 with
    master weights: 2 + 2 + 2*4 + 2*2*4 = 28 B.
    """
    if master_weights:
        return 2 * element_size + 2 * 4 + 2 * n_states * 4
    state_size = element_size if state_size is None else state_size
    return element_size * (2 + 1) + 2 * n_states * state_size


@dataclass(frozen=True)
class Case:
    """One optimizer configuration; `name` plus `dtype` identify it in the results.

    `pipeline` names what runs around the optimizer step (None: the bare step); `implementations`, when
    set, limits the case to those implementations; `in_default` puts it in the quick default run.
    `baseline`, when set, labels each implementation's bare step (the same optimizer without the pipeline),
    timed in the same rounds so that the pipeline's cost is a per-round ratio.
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
    baseline: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def variants(self) -> tuple[str, ...]:
        """What each implementation runs: the case ("") and, with a baseline, its bare step."""
        return ("", self.baseline) if self.baseline else ("",)

    @property
    def bytes_per_param(self) -> int:
        """The step's own traffic, before the passes a pipeline adds."""
        return self.bytes_per_param_with(state_size=None)

    def bytes_per_param_with(self, state_size: int | None) -> int:
        """The step's traffic for an implementation that keeps its states in `state_size`-byte elements."""
        return step_bytes_per_param(self.n_states, self.torch_dtype.itemsize, state_size,
                                    master_weights=self.pipeline == MASTER_WEIGHTS)


_ADAMW = {"lr": 1e-3, "weight_decay": 0.01}
# clip_grad_norm_'s threshold lies above the grads' norm: nothing is clipped, as in most steps of training, so
# the grads keep their values from step to step, while the norm and the scaling pass run as always.
CLIP_MAX_NORM = 1e9

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
    Case("adamw-amp-clip", "AdamW", _ADAMW, "fp32", n_states=2, pipeline=AMP_CLIP,
         implementations=(REFERENCE, "torch-fused"), in_default=True,
         note="each one's best way to run, after backward() of the scaled loss, loss scaling with a skip on "
              "inf and global-norm clipping: torch-fused: torch.amp.GradScaler.unscale_, "
              "clip_grad_norm_(foreach=True), GradScaler.step of AdamW(fused=True), update; fused_opt: "
              "fused_opt.GradScaler.step (one read-only grad pass for the norm and the inf check) of "
              "fused_opt.AdamW(max_grad_norm=...), which unscales and clips in its kernel, then update; "
              f"scale 1.0 and max_norm {CLIP_MAX_NORM:g} so the grads keep their values"),
    Case("adamw-scaled", "AdamW", _ADAMW, "fp32", n_states=2, pipeline=SCALED,
         implementations=(REFERENCE, "torch-fused"), baseline="no grad_scale/found_inf", in_default=True,
         note="the step under a GradScaler without unscale_ or clipping: grad_scale and found_inf set on the "
              "optimizer as GradScaler.step sets them (its inf-check pass left out), scale 1.0; torch's fused "
              "kernel writes the unscaled grads back (+4 B); each implementation also runs without them "
              "in the same rounds"),
    Case("adamw-bf16-states", "AdamW", _ADAMW, "fp32", n_states=2, pipeline=BF16_STATES,
         implementations=(REFERENCE,), baseline="fp32 states", in_default=True,
         note="fp32 params and grads with bf16 states: fused_opt.AdamW(state_dtype=torch.bfloat16) against "
              "the same optimizer with fp32 states in the same rounds (torch.optim keeps states in the "
              "params' dtype)"),
    Case("adamw-8bit-states", "AdamW", _ADAMW, "fp32", n_states=2, pipeline=EIGHT_BIT_STATES,
         implementations=(REFERENCE,), baseline="fp32 states", in_default=True,
         note="fp32 params and grads with blockwise 8-bit states: fused_opt.AdamW(state_dtype=torch.uint8), "
              "one byte per element and a float32 maximum per 256 (counted as 1 B: the maxima add 0.06 B "
              "per param), against the same optimizer with fp32 states in the same rounds"),
    Case("adamw-8bit", "AdamW", _ADAMW, "fp32", n_states=2, pipeline=EIGHT_BIT_STATES,
         implementations=(REFERENCE, "bnb-8bit", "torchao-8bit"),
         note="the peers' blockwise 8-bit AdamW (bitsandbytes' AdamW8bit, torchao's AdamW8bit, both with "
              "256-element blocks) against fused_opt.AdamW(state_dtype=torch.uint8), fp32 params and grads"),
    Case("adamw-stochastic", "AdamW", _ADAMW, "bf16", n_states=2, pipeline=STOCHASTIC_ROUNDING,
         implementations=(REFERENCE,), baseline="nearest rounding",
         note="bf16 params, grads and states without master weights, the params rounded stochastically: "
              "fused_opt.AdamW(param_rounding='stochastic') against the same optimizer rounding to nearest in "
              "the same rounds (the same bytes; the rounding's hash is the difference)"),
    Case("adamw-kahan", "AdamW", _ADAMW, "bf16", n_states=2, pipeline=KAHAN,
         implementations=(REFERENCE,), baseline="nearest rounding",
         note="bf16 params, grads and states without master weights, the params Kahan-compensated: "
              "fused_opt.AdamW(param_rounding='kahan'), which also reads and writes a bf16 compensation "
              "per param (+4 B), against the same optimizer rounding to nearest in the same rounds"),
    Case("adamw-bf16-master", "AdamW", _ADAMW, "bf16", n_states=2, pipeline=MASTER_WEIGHTS,
         implementations=(REFERENCE, "torch-fused", "torch-foreach"), in_default=True,
         note="bf16 params and grads with fp32 master weights and states; fused_opt: "
              "AdamW(master_weights=True); torch.optim has no master weights, so torch-fused and "
              "torch-foreach run the loop of Megatron-LM and apex O2: AdamW over fp32 copies of the params, "
              "the bf16 grads copied into their fp32 grads before the step and the masters into the bf16 "
              "params after it (+12 B; state B/param counts the copies)"),
)


def select_cases(optimizers: list[str] | None, dtypes: list[str], full: bool,
                 names: list[str] | None = None) -> list[Case]:
    """Cases in a listed dtype whose optimizer class (e.g. "sgd") or case name (e.g. "sgd-nesterov") is in
    `optimizers` and whose name is in `names`, where those lists are given; names are case-insensitive.
    Without either list, every case with --full, else the quick default's."""
    if optimizers is None and names is None:
        return [case for case in CASES if (full or case.in_default) and case.dtype in dtypes]
    wanted = None if optimizers is None else {name.lower() for name in optimizers}
    named = None if names is None else {name.lower() for name in names}
    return [case for case in CASES
            if case.dtype in dtypes
            and (wanted is None or case.optimizer.lower() in wanted or case.name in wanted)
            and (named is None or case.name in named)]


class Unsupported(Exception):
    """The implementation has no kernel for this case; reported as skipped, not as an error."""


# Makes an implementation's optimizer over the params a pipeline gives it (for master copies, not the model's).
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass
class Prepared:
    """A built implementation: `step` runs one step of the case, `optimizer` holds its state, and `held`
    are the tensors a pipeline keeps beside that state (fp32 master copies and their grads)."""
    step: Callable[[], object]
    optimizer: torch.optim.Optimizer
    held: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Pipeline:
    """One way of running a pipeline: `build(make_optimizer, params)` returns the prepared step.

    Its traffic beyond the step's own, per param: `passes` reads or writes of a tensor in the params' dtype
    and `fp32_passes` of an fp32 one. `writes_grads`: it changes the grads, so it needs its own copy of
    them. `optimizer_kwargs`: options it needs from the implementation's optimizer. `state_size`: the element
    size of the states it makes the optimizer keep, where that is not the implementation's own.
    """
    build: Callable[[OptimizerFactory, list[torch.nn.Parameter]], Prepared]
    passes: int = 0
    fp32_passes: int = 0
    writes_grads: bool = False
    optimizer_kwargs: dict = field(default_factory=dict, hash=False)
    state_size: int | None = None

    def extra_bytes_per_param(self, element_size: int) -> int:
        return self.passes * element_size + self.fp32_passes * 4


def bare_step(make_optimizer: OptimizerFactory, params: list[torch.nn.Parameter]) -> Prepared:
    optimizer = make_optimizer(params)
    return Prepared(optimizer.step, optimizer)


def _scaler(scaler_class: type, device: torch.device) -> torch.amp.GradScaler:
    # growth_interval past any run's length keeps the scale, and so the grads' values, fixed.
    scaler = scaler_class(device.type, init_scale=1.0, growth_interval=2**30)
    # backward() scales the loss, outside the timed step; the first scale() makes the scale tensor.
    scaler.scale(torch.ones((), device=device))
    return scaler


def _unscale_clip_step(make_optimizer: OptimizerFactory, params: list[torch.nn.Parameter]) -> Prepared:
    optimizer = make_optimizer(params)
    scaler = _scaler(torch.amp.GradScaler, params[0].device)

    def step() -> None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, CLIP_MAX_NORM, foreach=True)
        scaler.step(optimizer)
        scaler.update()

    return Prepared(step, optimizer)


def _fused_scaler_step(fused_opt) -> Callable[[OptimizerFactory, list[torch.nn.Parameter]], Prepared]:
    def build(make_optimizer: OptimizerFactory, params: list[torch.nn.Parameter]) -> Prepared:
        optimizer = make_optimizer(params)
        scaler = _scaler(fused_opt.GradScaler, params[0].device)

        def step() -> None:
            scaler.step(optimizer)
            scaler.update()

        return Prepared(step, optimizer)
    return build


def _scaled_step(make_optimizer: OptimizerFactory, params: list[torch.nn.Parameter]) -> Prepared:
    optimizer = make_optimizer(params)
    device = params[0].device
    # What GradScaler.step hands an optimizer that unscales in its kernel (_step_supports_amp_scaling); the
    # scaler sets them anew before each step, to the same tensors here. Scale 1.0 keeps the grads' values,
    # which torch's fused kernel writes back unscaled.
    optimizer.grad_scale = torch.ones((), device=device)
    optimizer.found_inf = torch.zeros((), device=device)
    return Prepared(optimizer.step, optimizer)


def _master_copies_step(make_optimizer: OptimizerFactory, params: list[torch.nn.Parameter]) -> Prepared:
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    for master, param in zip(masters, params):
        master.grad = param.grad.float()
    optimizer = make_optimizer(masters)
    model_grads = [p.grad for p in params]
    master_grads = [m.grad for m in masters]

    @torch.no_grad()
    def step() -> None:
        torch._foreach_copy_(master_grads, model_grads)
        optimizer.step()
        torch._foreach_copy_(params, masters)

    return Prepared(step, optimizer, held=masters + master_grads)


STOCK_PIPELINES = {
    # unscale_ reads and writes the grads (2), clip_grad_norm_ reads them for the norm (1) and then reads and
    # writes them to scale by the clip coefficient (2), which it does on every step.
    AMP_CLIP: Pipeline(_unscale_clip_step, passes=5, writes_grads=True),
    # torch's fused kernels write the unscaled grads back.
    SCALED: Pipeline(_scaled_step, passes=1, writes_grads=True),
    # The fp32 grads are written by the copy and read by the step, and the masters read again by the copy
    # into the params; the bf16 grad read and param write are the step's own.
    MASTER_WEIGHTS: Pipeline(_master_copies_step, fp32_passes=3),
}


def _fused_opt_pipelines(fused_opt) -> dict[str, Pipeline]:
    return {
        # One read-only grad pass for the norm and the inf check; the kernel unscales and clips in registers.
        AMP_CLIP: Pipeline(_fused_scaler_step(fused_opt), passes=1,
                           optimizer_kwargs={"max_grad_norm": CLIP_MAX_NORM}),
        SCALED: Pipeline(_scaled_step),
        MASTER_WEIGHTS: Pipeline(bare_step, optimizer_kwargs={"master_weights": True}),
        BF16_STATES: Pipeline(bare_step, optimizer_kwargs={"state_dtype": torch.bfloat16}, state_size=2),
        EIGHT_BIT_STATES: Pipeline(bare_step, optimizer_kwargs={"state_dtype": torch.uint8}, state_size=1),
        STOCHASTIC_ROUNDING: Pipeline(bare_step, optimizer_kwargs={"param_rounding": "stochastic"}),
        # The compensation is read and written beside the param.
        KAHAN: Pipeline(bare_step, passes=2, optimizer_kwargs={"param_rounding": "kahan"}),
    }


@dataclass(frozen=True)
class Implementation:
    """A library's way of running a case.

    `make_optimizer(case, params, **options)` returns an optimizer over `params` (their grads attached) or
    raises Unsupported; `options` come only from the implementation's own `pipelines`, the ways it runs
    those pipelines itself (the others run the stock way, STOCK_PIPELINES). `state_size` is the element size
    of its states when it does not keep them in the params' dtype (bitsandbytes' 8-bit states: 1).
    `optimizers`, when set, are the only optimizer classes it has: cases of others do not list it at all.
    `slow_here`, when set, says why the quick default leaves it out on this device.
    """
    name: str
    make_optimizer: Callable[..., torch.optim.Optimizer]
    state_size: int | None = None
    optimizers: tuple[str, ...] | None = None
    slow_here: str = ""
    pipelines: dict[str, Pipeline] = field(default_factory=dict, hash=False)

    def runs(self, case: Case) -> bool:
        """Whether the case lists this implementation (maybe as skipped, when an option is missing)."""
        return ((self.optimizers is None or case.optimizer in self.optimizers)
                and (case.implementations is None or self.name in case.implementations))

    def pipeline(self, case: Case) -> Pipeline | None:
        if case.pipeline is None:
            return None
        own = self.pipelines.get(case.pipeline)
        # A pipeline no stock implementation runs (bf16 states) has no stock way.
        return own if own is not None else STOCK_PIPELINES[case.pipeline]

    def bytes_per_param(self, case: Case, bare: bool = False) -> int:
        """The traffic of this implementation's step of the case, with the passes of its way of running the
        pipeline unless `bare`."""
        pipeline = None if bare else self.pipeline(case)
        extra = 0 if pipeline is None else pipeline.extra_bytes_per_param(case.torch_dtype.itemsize)
        state_size = self.state_size if pipeline is None or pipeline.state_size is None else pipeline.state_size
        return case.bytes_per_param_with(state_size) + extra


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
        def make(case: Case, params: list[torch.nn.Parameter], **options) -> torch.optim.Optimizer:
            return getattr(fused_opt, case.optimizer)(params, **case.kwargs, **options)
        found.append(Implementation(REFERENCE, make, pipelines=_fused_opt_pipelines(fused_opt)))
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


def prepare(implementation: Implementation, case: Case, params: list[torch.Tensor],
            grads: list[torch.Tensor], bare: bool = False) -> Prepared:
    """`implementation` over its own copies of `params`, ready to step the case (without its pipeline when
    `bare`).

    The grads are shared by every implementation whose step only reads them; a pipeline that writes them
    gets its own copies.
    """
    pipeline = None if bare else implementation.pipeline(case)
    own_params = [torch.nn.Parameter(p.clone()) for p in params]
    for param, grad in zip(own_params, grads):
        param.grad = grad.clone() if pipeline is not None and pipeline.writes_grads else grad
    if pipeline is None:
        return bare_step(lambda ps: implementation.make_optimizer(case, ps), own_params)
    return pipeline.build(lambda ps: implementation.make_optimizer(case, ps, **pipeline.optimizer_kwargs),
                          own_params)
