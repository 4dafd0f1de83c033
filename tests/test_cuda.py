"""The CUDA kernels, on a GPU and through the emulation tier.

The op-level tests take the `target` fixture: "cuda" (a GPU and a CUDA build of fused_opt) and
"simt" (the CUDA kernels' own source executed on CPU tensors by the emulation tier, tests/simt.py,
with grids of 2 to 8 blocks in seeded orders); each skips with its reason where it cannot run.
The tests of the GPU itself (profiler, streams, graphs, synchronization, allocation) and the
class-level ones need a GPU.

* Op level, against fused_opt's CPU kernels (which test_parity.py ties to the float64 references):
  every optimizer, every option combination, every dtype; mixed dtypes in one call; empty tensors
  anywhere; storage offsets that break 16-byte alignment; 10^5 tiny tensors; a tensor past 2^31
  elements (slow). Loss scale, found_inf and clipping read on the device; float32 master weights
  for fp16 and bf16 params; a skipped step that changes nothing, step counters included, and
  SGD's momentum buffers starting on the first step taken.
* grad_norm_: the CPU kernel's norm and inf/NaN flag, the same bits on every call, more grads
  than one launch holds.
* Class level: fused_opt on CUDA against torch.optim on CUDA and the float64 references.
* The promises of a capturable step: one main kernel launch per step for GPT-2 small's 148 tensors
  (fp32, and fp32 mixed with bf16), no host synchronization, no allocation, the caller's stream, the
  params' device, CUDA graph capture whose replays equal eager steps, and a tensor lr changed
  between replays taking effect; likewise with scaling and masters, and grad_norm_ in one launch,
  captured together with the step it feeds.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import fused_opt
import simt
from config import tolerance
from devices import requires_cuda_kernels, requires_simt
from fused_opt.bench.workloads import llama_shapes
from reference import REFERENCES

BOOLS = (False, True)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
# A tensor crossing two 32 Ki-element chunks with a tail that is no whole vector, odd sizes, one
# element, and an empty tensor last.
SHAPES = [(1,), (1031,), (3, 7, 5), (65543,), (0,)]
MAIN_KERNEL = "multi_tensor_kernel"
NORM_KERNEL = "grad_norm_kernel"


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def case_id(options: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in options.items()) or "defaults"


# ------------------------------------------------------------------------------------------------
# Op level: the CUDA kernels against the CPU kernels, called directly

OP_DEFAULTS = {
    "adam": {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    "sgd": {"lr": 1e-1},
    "rmsprop": {"lr": 1e-2, "alpha": 0.9, "eps": 1e-8},
    "adagrad": {"lr": 1e-1, "eps": 1e-10},
}
OP_GRIDS = {
    "adam": grid(amsgrad=BOOLS, maximize=BOOLS, weight_decay=(0.0, 0.1),
                 decoupled_weight_decay=BOOLS),
    "sgd": [
        o
        for o in grid(momentum=(0.0, 0.9), dampening=(0.0, 0.3), nesterov=BOOLS,
                      weight_decay=(0.0, 0.1), maximize=BOOLS)
        if not o["nesterov"] or o["momentum"]
    ],
    "rmsprop": grid(centered=BOOLS, momentum=(0.0, 0.9), weight_decay=(0.0, 0.1), maximize=BOOLS),
    "adagrad": grid(lr_decay=(0.0, 0.1), weight_decay=(0.0, 0.1), maximize=BOOLS),
}
# Every mode on at once, for the cases that cannot afford the grid.
OP_RICH = {
    "adam": {"amsgrad": True, "maximize": True, "weight_decay": 0.1, "decoupled_weight_decay": True},
    "sgd": {"momentum": 0.9, "dampening": 0.3, "nesterov": False, "weight_decay": 0.1,
            "maximize": True},
    "rmsprop": {"centered": True, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
    "adagrad": {"lr_decay": 0.1, "weight_decay": 0.1, "maximize": True},
}
OP_CASES = [
    pytest.param(op, options, id=f"{op}-{case_id(options)}")
    for op, options in ((op, o) for op, grid_ in OP_GRIDS.items() for o in grid_)
]


def state_lists(op: str, options: dict[str, Any]) -> list[tuple[str, bool]]:
    """The op's state lists in its argument order, each with whether these options use it."""
    if op == "adam":
        return [("exp_avgs", True), ("exp_avg_sqs", True), ("max_exp_avg_sqs", options["amsgrad"])]
    if op == "sgd":
        return [("momentum_buffers", options["momentum"] != 0)]
    if op == "rmsprop":
        return [("square_avgs", True), ("grad_avgs", options["centered"]),
                ("momentum_buffers", options["momentum"] > 0)]
    return [("state_sums", True)]


@dataclass(frozen=True)
class Target:
    """Where an op call runs: the kernels under test ("cuda" on a GPU; "simt", the CUDA kernels
    emulated on CPU tensors), or the CPU kernels they are compared with."""

    name: str
    device: str
    ops: Any  # the op namespace: torch.ops.fused_opt, or the emulation's

    def __deepcopy__(self, memo: dict) -> Target:
        return self  # immutable, and op namespaces do not copy


CPU = Target("cpu", "cpu", torch.ops.fused_opt)
CUDA = Target("cuda", "cuda", torch.ops.fused_opt)


@pytest.fixture(params=[pytest.param("cuda", marks=requires_cuda_kernels),
                        pytest.param("simt", marks=requires_simt)])
def target(request) -> Iterator[Target]:
    if request.param == "cuda":
        yield CUDA
        return
    with simt.emulated(simt.schedule_of(request.node.nodeid)):
        yield Target("simt", "cpu", simt.ops())


@dataclass
class OpTensors:
    """Everything one op call takes, on one device; unused state lists are empty. With masters
    (float32 copies of 16-bit params), the states are float32 too."""

    params: list[Tensor]
    states: dict[str, list[Tensor]]
    steps: list[Tensor]
    masters: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    # The counter the CUDA kernels advance step counters with; made by the first call.
    workspace: Tensor | None = None
    target: Target = CPU

    def all_tensors(self) -> dict[str, list[Tensor]]:
        return {"params": self.params, "masters": self.masters, **self.states, "steps": self.steps}


def initial_state(op: str, key: str, param: Tensor, generator: torch.Generator) -> Tensor:
    """A state a few steps into training: random, and valid (second moments at least the square
    of the first, so centered RMSprop's variance stays positive)."""
    shape = param.shape

    def rand(scale: float = 1.0) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64) * scale

    def randn(scale: float = 1.0) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64) * scale

    if key in ("exp_avgs", "momentum_buffers"):
        values = randn(0.1)
    elif key == "grad_avgs":
        values = rand(0.2) - 0.1  # its square stays below every square_avg
    elif key == "max_exp_avg_sqs":
        values = rand(0.02) + 0.01
    else:  # exp_avg_sqs, square_avgs, state_sums
        values = rand(0.01) + 0.02
    return values.to(param.dtype)


def has_steps(op: str, options: dict[str, Any]) -> bool:
    """SGD keeps counters only with momentum: they start its buffers."""
    return op != "sgd" or options["momentum"] != 0


def make_op_tensors(op: str, options: dict[str, Any], specs: Sequence[tuple[tuple[int, ...], torch.dtype]],
                    seed: int, masters: bool = False) -> OpTensors:
    """CPU tensors for one op call: params of the given shapes and dtypes, their states; with
    masters, float32 masters that the 16-bit params are the rounding of (float32 params are
    their own), and float32 states."""
    generator = torch.Generator().manual_seed(seed)
    exact = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape, _ in specs]
    # Each param's float32 master, or the param itself where it has none.
    sources = [e.float() if masters else e for e in exact]
    params = [source.to(dtype) for source, (_, dtype) in zip(sources, specs)]
    has_master = [masters and dtype in (torch.float16, torch.bfloat16) for _, dtype in specs]
    master_list = [source for source, has in zip(sources, has_master) if has]
    state_like = [source if has else p for source, p, has in zip(sources, params, has_master)]
    states = {
        key: [initial_state(op, key, p, generator) for p in state_like] if used else []
        for key, used in state_lists(op, options)
    }
    # Step counters past 1, so bias corrections are not trivially the first step's; SGD's start
    # at 0, so that the first call starts the momentum buffers and the later ones continue them.
    start = 0.0 if op == "sgd" else 3.0
    steps = [torch.full((), start) for _ in params] if has_steps(op, options) else []
    return OpTensors(params, states, steps, master_list)


def random_grads(params: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Random signs, magnitudes in [0.5, 1.5]: away from zero, where 16-bit states underflow."""
    grads = []
    for p in params:
        magnitude = 0.5 + torch.rand(p.shape, generator=generator, dtype=torch.float64)
        sign = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.float64) * 2 - 1
        grads.append((sign * magnitude).to(p.dtype))
    return grads


GUARD = 16  # elements after a placed view, which the kernels must leave alone


def placed(t: Tensor, device: str, offset: int = 0) -> Tensor:
    """t's values on device; with offset > 0, as a view `offset` elements into a zeroed buffer that
    extends GUARD elements past the view."""
    if offset == 0:
        return t.to(device).clone()
    buffer = torch.zeros(offset + t.numel() + GUARD, dtype=t.dtype, device=device)
    view = buffer[offset:offset + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def copy_to(tensors: OpTensors, target: Target, offset: int = 0) -> OpTensors:
    device = target.device
    return OpTensors(
        [placed(p, device, offset) for p in tensors.params],
        {key: [placed(s, device, offset) for s in ts] for key, ts in tensors.states.items()},
        [s.to(device).clone() for s in tensors.steps],
        [placed(m, device, offset) for m in tensors.masters],
        target=target,
    )


# Per-group hyperparameters of each op, in the op's argument order.
OP_HYPERS = {
    "adam": ("beta1", "beta2", "weight_decay", "eps"),
    "sgd": ("momentum", "dampening", "weight_decay"),
    "rmsprop": ("alpha", "eps", "weight_decay", "momentum"),
    "adagrad": ("lr_decay", "weight_decay", "eps"),
}
OP_MODES = {
    "adam": ("amsgrad", "maximize", "decoupled_weight_decay"),
    "sgd": ("nesterov", "maximize"),
    "rmsprop": ("centered", "maximize"),
    "adagrad": ("maximize",),
}


def call_op(op: str, t: OpTensors, options: dict[str, Any], lr_tensor: Tensor | None = None,
            groups: Sequence[tuple[int, dict[str, Any]]] | None = None, **scaling: Any) -> None:
    """One op call; scaling: grad_scale, found_inf, grad_norm, max_grad_norm. `groups`, when
    given, splits the params into groups of (size, hyperparameters that override options)."""
    o = {**OP_DEFAULTS[op], **options}
    groups = groups or [(len(t.params), {})]
    per_group = [{**o, **overrides} for _, overrides in groups]
    lists = [t.states[key] for key, _ in state_lists(op, o)]
    if t.steps and t.workspace is None:
        t.workspace = torch.zeros(1, dtype=torch.int32, device=t.params[0].device)
    kwargs = {
        "group_sizes": [size for size, _ in groups],
        "lr": [g["lr"] for g in per_group],
        "l1_decay": [float(g.get("l1_decay", 0.0)) for g in per_group],
        "l1_proximal": [g.get("l1_mode") == "proximal" for g in per_group],
        "stochastic_rounding_seed": [g.get("rounding_seed") for g in per_group],
        "lr_tensor": [g.get("lr_tensor", lr_tensor) for g in per_group],
        **{key: [float(g[key]) for g in per_group] for key in OP_HYPERS[op]},
        **{key: o[key] for key in OP_MODES[op]},
        "workspace": t.workspace,
        **scaling,
    }
    if op == "adam":
        kwargs["beta1_tensor"] = [g.get("beta1_tensor") for g in per_group]
        kwargs["beta2_tensor"] = [g.get("beta2_tensor") for g in per_group]
    getattr(t.target.ops, f"{op}_")(t.params, t.grads, *lists, t.steps, t.masters, **kwargs)


def assert_close(actual: Tensor, expected: Tensor, what: str, scale: float = 1.0) -> None:
    """Within tolerance(dtype), atol scaled by the magnitude of the tensor's kind (a state that is a
    difference of large terms carries their rounding, as test_parity.py explains)."""
    assert actual.dtype == expected.dtype, what
    tol = tolerance(expected.dtype)
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{what}: {m}")


def magnitude(tensors: Sequence[Tensor]) -> float:
    return max([1.0, *(t.detach().abs().max().item() for t in tensors if t.numel())])


def assert_ops_agree(actual: OpTensors, expected: OpTensors, when: str) -> None:
    for kind, expected_list in expected.all_tensors().items():
        actual_list = actual.all_tensors()[kind]
        assert len(actual_list) == len(expected_list), kind
        scale = magnitude([t.double() for t in expected_list])
        for index, (a, e) in enumerate(zip(actual_list, expected_list)):
            assert_close(a, e, f"{kind}[{index}] {tuple(e.shape)} {e.dtype}, {when}", scale)


# GradScaler's kind of scale: a power of two, so that scaling the grads and unscaling them in the
# kernels are exact, and small enough for fp16 grads up to 1.5.
GRAD_SCALE = 2.0**12
# Which of the op's scaling arguments a call gets ("all": loss scale, found_inf and clipping).
SCALINGS = ("grad_scale", "found_inf", "clip", "all")


def scaled(grads: Sequence[Tensor], scaling: str | None) -> list[Tensor]:
    """The grads as the op receives them: multiplied by the loss scale when the call has one."""
    if scaling not in ("grad_scale", "all"):
        return list(grads)
    return [(g.double() * GRAD_SCALE).to(g.dtype) for g in grads]


def scaling_args(scaling: str | None, grads: Sequence[Tensor], device: torch.device | str
                 ) -> dict[str, Any]:
    """The op's scaling arguments on `device` for the unscaled `grads`; a step that proceeds
    (found_inf zero), and a clipping threshold of half the grads' global norm, so that it clips."""
    args: dict[str, Any] = {}
    if scaling in ("grad_scale", "all"):
        args["grad_scale"] = torch.tensor(GRAD_SCALE, device=device)
    if scaling in ("found_inf", "all"):
        args["found_inf"] = torch.zeros((), device=device)
    if scaling in ("clip", "all"):
        norm = math.sqrt(sum(g.double().square().sum().item() for g in grads))
        args["grad_norm"] = torch.tensor(norm, dtype=torch.float32, device=device)
        args["max_grad_norm"] = norm / 2
    return args


def assert_params_round_masters(t: OpTensors, when: str) -> None:
    """The 16-bit params, which take the masters in order, hold their masters' rounding."""
    with_masters = [(i, p) for i, p in enumerate(t.params)
                    if t.masters and p.dtype in (torch.float16, torch.bfloat16)]
    assert len(with_masters) == len(t.masters)
    for (index, p), m in zip(with_masters, t.masters):
        assert torch.equal(p, m.to(p.dtype)), f"params[{index}] is not its master rounded, {when}"


def assert_workspace_left_zero(t: OpTensors, when: str) -> None:
    """Each launch's last block resets the counter of finished blocks for the next launch."""
    assert t.workspace is None or t.workspace.item() == 0, f"workspace left nonzero, {when}"


def run_cuda_and_cpu(op: str, options: dict[str, Any], cpu: OpTensors, cuda: OpTensors,
                     steps: int = 3, seed: int = 0, scaling: str | None = None,
                     groups_on: Any = None) -> None:
    """Steps both sets with the same grads (and scaling arguments) and compares every tensor after
    every step. groups_on(device), when given, is call_op's `groups` for that device."""
    generator = torch.Generator().manual_seed(seed)
    device = cuda.target.device
    for step in range(steps):
        grads = random_grads(cpu.params, generator)
        cpu.grads = scaled(grads, scaling)
        cuda.grads = [g.to(p.device) for g, p in zip(cpu.grads, cuda.params)]
        call_op(op, cpu, options, groups=groups_on and groups_on("cpu"),
                **scaling_args(scaling, grads, "cpu"))
        call_op(op, cuda, options, groups=groups_on and groups_on(device),
                **scaling_args(scaling, grads, device))
        assert_ops_agree(cuda, cpu, f"after step {step + 1}")
        assert_params_round_masters(cuda, f"after step {step + 1}")
        assert_workspace_left_zero(cuda, f"after step {step + 1}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, options", OP_CASES)
def test_op_matches_cpu_kernel(target, op, options, dtype):
    cpu = make_op_tensors(op, options, [(s, dtype) for s in SHAPES], seed=1)
    run_cuda_and_cpu(op, options, cpu, copy_to(cpu, target))


@pytest.mark.parametrize("op", list(OP_RICH))
def test_mixed_dtypes_in_one_call(target, op):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    specs = [(shape, dtypes[i % 4]) for i, shape in enumerate(SHAPES * 2)]
    cpu = make_op_tensors(op, OP_RICH[op], specs, seed=2)
    run_cuda_and_cpu(op, OP_RICH[op], cpu, copy_to(cpu, target))


# A hyperparameter of each op that differs from group to group, besides lr and weight decay.
GROUP_VARIED = {"adam": ("beta1", 0.8, 0.005), "sgd": ("dampening", 0.0, 0.01),
                "rmsprop": ("alpha", 0.9, 0.002), "adagrad": ("lr_decay", 0.0, 0.01)}


@pytest.mark.parametrize("op", list(OP_RICH))
def test_forty_groups_in_one_call_keep_their_hyperparameters(target, op):
    """More groups than one launch carries (16): each has its own lr (a device tensor in every
    third group), weight decay on or off, and another hyperparameter of its own; some groups
    hold only empty tensors."""
    group_count = 40
    shapes = [[(1 + 37 * g % 1031,), (0,), (3, g % 4)] for g in range(group_count)]
    cpu = make_op_tensors(op, OP_RICH[op], [(s, torch.float32) for ss in shapes for s in ss],
                          seed=13)
    key, base, step = GROUP_VARIED[op]

    def groups_on(device: str) -> list[tuple[int, dict[str, Any]]]:
        groups = []
        for g, group_shapes in enumerate(shapes):
            lr = 0.01 * (1 + g % 5)
            overrides = {"lr": lr, "weight_decay": 0.1 if g % 2 else 0.0, key: base + step * g}
            if g % 3 == 0:
                overrides["lr_tensor"] = torch.tensor(2 * lr, device=device)
            groups.append((len(group_shapes), overrides))
        return groups

    run_cuda_and_cpu(op, OP_RICH[op], cpu, copy_to(cpu, target), groups_on=groups_on)


@pytest.mark.parametrize("op", list(OP_RICH))
def test_empty_tensors_anywhere(target, op):
    shapes = [(0,), (5,), (0, 3), (70001,), (0,), (1,), (0,)]
    cpu = make_op_tensors(op, OP_RICH[op], [(s, torch.float32) for s in shapes], seed=3)
    run_cuda_and_cpu(op, OP_RICH[op], cpu, copy_to(cpu, target))


@pytest.mark.parametrize("op", list(OP_RICH))
def test_only_empty_tensors(target, op):
    cpu = make_op_tensors(op, OP_RICH[op], [((0,), torch.float32)] * 3, seed=4)
    run_cuda_and_cpu(op, OP_RICH[op], cpu, copy_to(cpu, target))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("op", list(OP_RICH))
def test_storage_offsets_that_break_alignment(target, op, offset, dtype):
    """Every tensor a view `offset` elements into its own buffer (misaligned alike, but for fp64 at
    offset 2), then the grads aligned while the rest is not; nothing around the views is written."""
    cpu = make_op_tensors(op, OP_RICH[op], [(s, dtype) for s in SHAPES], seed=5)
    cuda = copy_to(cpu, target, offset)
    generator = torch.Generator().manual_seed(6)
    for step, grad_offset in enumerate((offset, 0, offset)):
        cpu.grads = random_grads(cpu.params, generator)
        cuda.grads = [placed(g, target.device, grad_offset) for g in cpu.grads]
        call_op(op, cpu, OP_RICH[op])
        call_op(op, cuda, OP_RICH[op])
        assert_ops_agree(cuda, cpu, f"after step {step + 1}")
    assert_nothing_written_around(cuda, offset)


def assert_nothing_written_around(t: OpTensors, offset: int) -> None:
    """The zeroed buffers around tensors placed `offset` elements into them are still zero."""
    for kind, tensors in t.all_tensors().items():
        if kind == "steps":
            continue
        for view in tensors:
            base = view._base
            assert base is not None and not base[:offset].any(), f"{kind}: a write before the view"
            assert not base[offset + view.numel():].any(), f"{kind}: a write past the view"


@pytest.mark.parametrize("op", list(OP_RICH))
def test_aligned_views_use_the_same_results(target, op):
    """Views 16 bytes into their buffers are aligned again (the vector path), and agree too."""
    cpu = make_op_tensors(op, OP_RICH[op], [(s, torch.float32) for s in SHAPES], seed=7)
    run_cuda_and_cpu(op, OP_RICH[op], cpu, copy_to(cpu, target, offset=4))


def test_hundred_thousand_tiny_tensors(target):
    """10^5 tensors of 0 to 9 elements in one call: many launches' worth of tensor tables, views at
    every alignment, empty ones scattered and last."""
    op, options = "adam", OP_RICH["adam"]
    sizes = np.random.default_rng(8).integers(0, 10, 100_000).tolist()
    sizes[-1] = 0
    total = sum(sizes)
    generator = torch.Generator().manual_seed(9)

    def split(values: Tensor) -> list[Tensor]:
        return list(values.split(sizes))

    cpu = OpTensors(
        split(torch.randn(total, generator=generator)),
        {"exp_avgs": split(torch.randn(total, generator=generator) * 0.1),
         "exp_avg_sqs": split(torch.rand(total, generator=generator) * 0.01 + 0.02),
         "max_exp_avg_sqs": split(torch.rand(total, generator=generator) * 0.02 + 0.01)},
        [torch.full((), 3.0) for _ in sizes])
    flat_cuda = {kind: torch.cat(ts).to(target.device) for kind, ts in
                 {"params": cpu.params, **cpu.states}.items()}
    cuda = OpTensors(list(flat_cuda["params"].split(sizes)),
                     {k: list(v.split(sizes)) for k, v in flat_cuda.items() if k != "params"},
                     [s.to(target.device, copy=True) for s in cpu.steps], target=target)
    for _ in range(2):
        grads = torch.randn(total, generator=generator)
        cpu.grads = split(grads)
        cuda.grads = list(grads.to(target.device).split(sizes))
        call_op(op, cpu, options)
        call_op(op, cuda, options)
    for kind in flat_cuda:
        expected = torch.cat(cpu.params if kind == "params" else cpu.states[kind])
        assert_close(flat_cuda[kind], expected, kind, magnitude([expected]))
    assert torch.equal(torch.stack(cuda.steps).cpu(), torch.full((len(sizes),), 5.0))
    assert_workspace_left_zero(cuda, "after two calls of many launches each")


@requires_cuda_kernels
@pytest.mark.slow
def test_tensor_past_two_to_the_31_elements():
    """A bf16 tensor of 2^31 + 12345 elements between two small ones: 64-bit offsets everywhere.
    Elementwise updates let slices around 2^31 and the end be checked against the CPU kernel."""
    n = 2**31 + 12345
    needed = 6 * n * 2  # param, grad, two states, and the temporaries that fill them
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free")
    op, options = "adam", {"amsgrad": False, "maximize": False, "weight_decay": 0.1,
                           "decoupled_weight_decay": True}
    dtype = torch.bfloat16
    torch.manual_seed(10)
    big = OpTensors(
        [torch.randn(7, dtype=dtype, device="cuda"), torch.randn(n, dtype=dtype, device="cuda"),
         torch.randn(9, dtype=dtype, device="cuda")],
        {"exp_avgs": [], "exp_avg_sqs": [], "max_exp_avg_sqs": []},
        [torch.full((), 3.0, device="cuda") for _ in range(3)], target=CUDA)
    big.states["exp_avgs"] = [torch.randn_like(p) * 0.1 for p in big.params]
    big.states["exp_avg_sqs"] = [torch.rand_like(p) * 0.01 + 0.02 for p in big.params]
    big.grads = [torch.randn_like(p) for p in big.params]
    windows = [slice(0, 4096), slice(2**31 - 40000, 2**31 + 40000), slice(n - 70000, n)]

    def pieces(t: OpTensors) -> OpTensors:
        """CPU copies of the small tensors and of the windows of the big one."""
        def cut(ts: list[Tensor]) -> list[Tensor]:
            return [ts[0].cpu(), *(ts[1][w].cpu() for w in windows), ts[2].cpu()]
        steps = [t.steps[0].cpu(), *(t.steps[1].cpu() for _ in windows), t.steps[2].cpu()]
        return OpTensors(cut(t.params), {k: cut(v) if v else [] for k, v in t.states.items()},
                         steps, [], cut(t.grads))

    expected = pieces(big)
    call_op(op, expected, options)
    call_op(op, big, options)
    assert_ops_agree(pieces(big), expected, "after one step")


# ------------------------------------------------------------------------------------------------
# Op level: loss scaling, clipping, skipped steps and master weights, against the CPU kernels

HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(OP_RICH))
def test_scaled_step_matches_cpu_kernel(target, op, dtype, scaling):
    cpu = make_op_tensors(op, OP_RICH[op], [(s, dtype) for s in SHAPES], seed=20)
    run_cuda_and_cpu(op, OP_RICH[op], cpu, copy_to(cpu, target), scaling=scaling)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("op, options", OP_CASES)
def test_master_params_match_cpu_kernel(target, op, options, dtype):
    cpu = make_op_tensors(op, options, [(s, dtype) for s in SHAPES], seed=21, masters=True)
    run_cuda_and_cpu(op, options, cpu, copy_to(cpu, target))


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("op", list(OP_RICH))
def test_master_params_of_both_16bit_dtypes_scaled_and_misaligned(target, op, offset):
    """fp16 and bf16 params in one call with masters, loss scale and clipping, every tensor a view
    `offset` elements into its own buffer (the grads aligned): 0 and 4 keep the vectors of the
    master path aligned (16 bytes of float32, 8 of 16-bit), 1 to 3 break them."""
    specs = [(shape, (torch.float16, torch.bfloat16)[i % 2]) for i, shape in enumerate(SHAPES * 2)]
    cpu = make_op_tensors(op, OP_RICH[op], specs, seed=22, masters=True)
    cuda = copy_to(cpu, target, offset)
    run_cuda_and_cpu(op, OP_RICH[op], cpu, cuda, scaling="all")
    if offset:
        assert_nothing_written_around(cuda, offset)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("op", list(OP_RICH))
def test_float32_params_share_the_master_call_as_their_own_masters(target, op, offset):
    """fp32, bf16 and fp16 params in one master-weight call (one launch): the 16-bit ones take the
    masters in order, the fp32 ones update in place; aligned and misaligned."""
    dtypes = (torch.float32, torch.bfloat16, torch.float32, torch.float16)
    specs = [(shape, dtypes[i % 4]) for i, shape in enumerate(SHAPES * 2)]
    cpu = make_op_tensors(op, OP_RICH[op], specs, seed=26, masters=True)
    assert 0 < len(cpu.masters) < len(cpu.params)
    cuda = copy_to(cpu, target, offset)
    run_cuda_and_cpu(op, OP_RICH[op], cpu, cuda, scaling="all")
    names = kernels_launched_by(target, lambda: call_op(op, cuda, OP_RICH[op]))
    assert len(names) == 1 and MAIN_KERNEL in names[0], names


def poisoned_grads(params: Sequence[Tensor]) -> list[Tensor]:
    """Grads of inf and NaN: an update that read them would leave no tensor as it was."""
    return [torch.full_like(p, math.inf if index % 2 else math.nan)
            for index, p in enumerate(params)]


@pytest.mark.parametrize("masters", BOOLS, ids=["plain", "masters"])
@pytest.mark.parametrize("op", list(OP_RICH))
def test_skipped_step_changes_nothing(target, op, masters):
    """A nonzero found_inf leaves every tensor bit for bit as it was, step counters included; the
    steps after it match the CPU kernel's, which never saw the skipped one."""
    options = OP_RICH[op]
    dtype = torch.bfloat16 if masters else torch.float32
    cpu = make_op_tensors(op, options, [(s, dtype) for s in SHAPES], seed=23, masters=masters)
    cuda = copy_to(cpu, target)
    before = {kind: [t.clone() for t in ts] for kind, ts in cuda.all_tensors().items()}
    cuda.grads = poisoned_grads(cuda.params)
    call_op(op, cuda, options, grad_scale=torch.tensor(GRAD_SCALE, device=target.device),
            found_inf=torch.ones((), device=target.device),
            grad_norm=torch.tensor(math.inf, device=target.device), max_grad_norm=1.0)
    for kind, tensors in cuda.all_tensors().items():
        for index, (t, b) in enumerate(zip(tensors, before[kind])):
            assert torch.equal(t, b), f"{kind}[{index}] changed on a skipped step"
    assert_workspace_left_zero(cuda, "after the skipped step")
    run_cuda_and_cpu(op, options, cpu, cuda, steps=2, scaling="all")


@pytest.mark.parametrize("nesterov", BOOLS)
def test_sgd_buffer_starts_on_the_first_step_that_is_not_skipped(target, nesterov):
    """The counter, not the host, says whether a momentum buffer holds anything: skipped steps
    leave it at 0, and the first step taken starts each buffer from the grad as is."""
    options = {"momentum": 0.9, "dampening": 0.3, "nesterov": nesterov, "weight_decay": 0.0,
               "maximize": False}
    cpu = make_op_tensors("sgd", options, [(s, torch.float32) for s in SHAPES], seed=24)
    cuda = copy_to(cpu, target)
    found_inf = torch.ones((), device=target.device)
    buffers = [b.clone() for b in cuda.states["momentum_buffers"]]
    for _ in range(2):
        cuda.grads = poisoned_grads(cuda.params)
        call_op("sgd", cuda, options, found_inf=found_inf)
    assert all(s.item() == 0.0 for s in cuda.steps)
    assert all(torch.equal(a, b) for a, b in zip(cuda.states["momentum_buffers"], buffers))

    found_inf.zero_()
    cpu.grads = random_grads(cpu.params, torch.Generator().manual_seed(25))
    cuda.grads = [g.to(target.device) for g in cpu.grads]
    call_op("sgd", cpu, options)
    call_op("sgd", cuda, options, found_inf=found_inf)
    assert all(s.item() == 1.0 for s in cuda.steps)
    for index, (buffer, grad) in enumerate(zip(cuda.states["momentum_buffers"], cuda.grads)):
        assert torch.equal(buffer, grad), f"momentum_buffers[{index}] did not start from the grad"
    assert_ops_agree(cuda, cpu, "after the first step taken")
    run_cuda_and_cpu("sgd", options, cpu, cuda, steps=2, scaling="found_inf")


# ------------------------------------------------------------------------------------------------
# Op level: grad_norm_

# Shapes and dtypes of a mixed model's grads: vector tails, a chunk boundary crossed, an empty one.
NORM_SPECS = [((1,), torch.float32), ((1031,), torch.float16), ((3, 7, 5), torch.bfloat16),
              ((65543,), torch.float32), ((0,), torch.float32), ((70001,), torch.float64),
              ((2, 40000), torch.bfloat16), ((33,), torch.float16)]


@dataclass
class NormBuffers:
    """grad_norm_'s outputs and workspace on one device; the outputs start at values that the op
    must overwrite."""

    norm: Tensor
    found_inf: Tensor
    workspace: Tensor
    target: Target

    @classmethod
    def on(cls, target: Target) -> NormBuffers:
        device = target.device
        return cls(torch.full((), -1.0, device=device), torch.full((), -1.0, device=device),
                   torch.zeros(fused_opt._ops.GRAD_NORM_WORKSPACE_NUMEL, device=device), target)


def grad_norm(grads: Sequence[Tensor], buffers: NormBuffers, grad_scale: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    """grad_norm_'s (norm, found_inf), copied."""
    buffers.target.ops.grad_norm_(list(grads), buffers.norm, buffers.found_inf, buffers.workspace,
                                  grad_scale=grad_scale)
    return buffers.norm.clone(), buffers.found_inf.clone()


def random_grads_of(specs: Sequence[tuple[tuple[int, ...], torch.dtype]], seed: int
                    ) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
            for shape, dtype in specs]


def exact_norm(grads: Sequence[Tensor]) -> float:
    return math.sqrt(sum(g.double().square().sum().item() for g in grads))


def bits(t: Tensor) -> Tensor:
    return t.detach().cpu().view(torch.int32)


@pytest.mark.parametrize("scale", [None, GRAD_SCALE], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_grad_norm_matches_cpu_and_repeats_bit_for_bit(target, offset, scale):
    """The norm of grads of every dtype, views `offset` elements into their buffers: the same bits
    from a second call on the same workspace (left ready by the first) and from a fresh one, close
    to the CPU kernel's and to the float64 norm; found_inf overwritten with 0."""
    unscaled = random_grads_of(NORM_SPECS, seed=26)
    grads = scaled(unscaled, None if scale is None else "grad_scale")
    device_grads = [placed(g, target.device, offset) for g in grads]

    def scale_on(device: str) -> Tensor | None:
        return None if scale is None else torch.tensor(scale, device=device)

    cpu_norm, cpu_found_inf = grad_norm(grads, NormBuffers.on(CPU), scale_on("cpu"))
    buffers = NormBuffers.on(target)
    first = grad_norm(device_grads, buffers, scale_on(target.device))
    again = grad_norm(device_grads, buffers, scale_on(target.device))
    fresh = grad_norm(device_grads, NormBuffers.on(target), scale_on(target.device))
    for other in (again, fresh):
        assert torch.equal(bits(first[0]), bits(other[0])) and torch.equal(first[1], other[1])
    norm = first[0].cpu()
    # Sums in double in another order: the float32 results are at most an ulp or two apart.
    torch.testing.assert_close(norm, cpu_norm, rtol=2.5e-7, atol=0)
    exact = torch.tensor(exact_norm(unscaled), dtype=torch.float64)
    torch.testing.assert_close(norm.double(), exact, rtol=2.5e-7, atol=0)
    assert first[1].item() == 0.0 and cpu_found_inf.item() == 0.0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_norm_flags_inf_and_nan(target, dtype, bad):
    """One bad element deep inside one grad sets found_inf, as on the CPU, and the norm follows
    it (inf, or NaN); the next call on finite grads clears the flag."""
    specs = [((5,), torch.float32), ((70001,), dtype), ((3,), torch.bfloat16)]
    grads = random_grads_of(specs, seed=27)
    finite = [g.clone() for g in grads]
    grads[1][40000] = bad
    cpu_norm, cpu_found_inf = grad_norm(grads, NormBuffers.on(CPU))
    buffers = NormBuffers.on(target)
    norm, found_inf = grad_norm([g.to(target.device) for g in grads], buffers)
    assert found_inf.item() == 1.0 and cpu_found_inf.item() == 1.0
    torch.testing.assert_close(norm.cpu(), cpu_norm, equal_nan=True)
    assert math.isnan(norm.item()) == math.isnan(bad)
    norm, found_inf = grad_norm([g.to(target.device) for g in finite], buffers)
    assert found_inf.item() == 0.0 and math.isfinite(norm.item())


@pytest.mark.parametrize("shapes", [[], [(0,)], [(0,), (0, 4)]], ids=["none", "one", "two"])
def test_grad_norm_of_no_elements_is_zero(target, shapes):
    norm, found_inf = grad_norm([torch.zeros(s, device=target.device) for s in shapes],
                                NormBuffers.on(target))
    assert norm.item() == 0.0 and found_inf.item() == 0.0


def test_grad_norm_over_more_grads_than_one_launch_holds(target):
    """5000 grads of 0 to 99 elements and a large one among them, of every dtype: more grads than
    one kernel's parameters hold, so the partial sums carry across launches."""
    sizes = np.random.default_rng(28).integers(0, 100, 5000).tolist()
    sizes[2500] = 300_000
    sizes[4000] = 7
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    grads = random_grads_of([((n,), dtypes[i % 4]) for i, n in enumerate(sizes)], seed=29)
    grads[4000][0] = 1e4  # a large term late in the order
    device_grads = [g.to(target.device) for g in grads]
    cpu_norm, _ = grad_norm(grads, NormBuffers.on(CPU))
    buffers = NormBuffers.on(target)
    first = grad_norm(device_grads, buffers)
    again = grad_norm(device_grads, buffers)
    assert torch.equal(bits(first[0]), bits(again[0]))
    torch.testing.assert_close(first[0].cpu(), cpu_norm, rtol=2.5e-7, atol=0)
    assert first[1].item() == 0.0


# ------------------------------------------------------------------------------------------------
# Class level: fused_opt on CUDA against torch.optim on CUDA and the float64 references

CLASS_LR = {"Adam": 1e-2, "AdamW": 1e-2, "SGD": 1e-1, "RMSprop": 1e-2, "Adagrad": 1e-1}
CLASS_OPTIONS = {
    "Adam": [{}, {"amsgrad": True, "maximize": True, "weight_decay": 0.1},
             {"weight_decay": 0.1, "decoupled_weight_decay": True}],
    "AdamW": [{}, {"amsgrad": True, "weight_decay": 0.1}],
    "SGD": [{}, {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1, "maximize": True},
            {"momentum": 0.9, "nesterov": True}],
    "RMSprop": [{}, {"centered": True, "momentum": 0.9, "weight_decay": 0.1, "alpha": 0.9}],
    "Adagrad": [{}, {"lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.5}],
}
CLASS_CASES = [
    pytest.param(name, {"lr": CLASS_LR[name], **options}, id=f"{name}-{case_id(options)}")
    for name, option_list in CLASS_OPTIONS.items()
    for options in option_list
]


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, options", CLASS_CASES)
def test_class_matches_torch_and_reference(name, options, dtype):
    generator = torch.Generator().manual_seed(11)
    initial = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in SHAPES]
    fused_params = [torch.nn.Parameter(t.to("cuda", copy=True)) for t in initial]
    torch_params = [torch.nn.Parameter(t.to("cuda", copy=True)) for t in initial]
    ref_params = [t.double().numpy().copy() for t in initial]
    ref_states: list[dict[str, Any]] = [{} for _ in initial]
    fused = getattr(fused_opt, name)(fused_params, **options)
    reference = getattr(torch.optim, name)(torch_params, foreach=False, **options)
    for step in range(5):
        grads = random_grads(initial, generator)
        for fp, tp, rp, rs, g in zip(fused_params, torch_params, ref_params, ref_states, grads):
            fp.grad, tp.grad = g.to("cuda", copy=True), g.to("cuda", copy=True)
            REFERENCES[name](rp, g.double().numpy(), rs, **options)
        fused.step()
        reference.step()
        scale = magnitude([p.double() for p in torch_params])
        for index, (fp, tp, rp) in enumerate(zip(fused_params, torch_params, ref_params)):
            where = f"param {index} after step {step + 1}"
            assert_close(fp, tp, f"{where} vs torch", scale)
            assert_close(fp, torch.from_numpy(rp).to(dtype), f"{where} vs reference", scale)
        for index, (fp, tp) in enumerate(zip(fused_params, torch_params)):
            for key, value in reference.state[tp].items():
                mine = fused.state[fp][key]
                what = f"state {key!r} of param {index}, step {step + 1}"
                if key == "step":
                    # torch keeps a non-capturable counter on the CPU, fused_opt beside the param.
                    assert mine.device == fp.device and mine.item() == value.item(), what
                    continue
                assert (mine.dtype, mine.device) == (value.dtype, value.device), what
                assert_close(mine, value, what,
                             magnitude([reference.state[p][key].double() for p in torch_params]))


# ------------------------------------------------------------------------------------------------
# Launches, synchronization, allocation, streams, devices

def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small's 148 parameter tensors (124.4M elements)."""
    block = [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
             (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    return [(50257, 768), (1024, 768), *block * 12, (768,), (768,)]


STEP_CASES = [
    pytest.param("Adam", {}, id="Adam"),
    pytest.param("AdamW", {"amsgrad": True}, id="AdamW-amsgrad"),
    pytest.param("SGD", {"momentum": 0.9}, id="SGD-momentum"),
    pytest.param("SGD", {}, id="SGD"),
    pytest.param("RMSprop", {"centered": True, "momentum": 0.9}, id="RMSprop-centered-momentum"),
    pytest.param("Adagrad", {}, id="Adagrad"),
]


def cuda_model(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype],
               seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    params = []
    for index, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(shape, device="cuda", dtype=dtypes[index % len(dtypes)]))
        p.grad = torch.randn_like(p)
        params.append(p)
    return params


def kernels_launched_by(target: Target, fn) -> list[str]:
    """Names of the kernels that fn launches on the target."""
    if target.name == "cuda":
        return cuda_kernels_of(fn)
    simt.module().take_launch_log()
    fn()
    return [simt.kernel_name(record) for record in simt.module().take_launch_log()]


def cuda_kernels_of(fn) -> list[str]:
    """Names of the GPU activities (kernels, copies, sets) that fn enqueues."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def launches_of_step(opt: torch.optim.Optimizer) -> list[str]:
    """The GPU work of one step after the first (which creates the state)."""
    opt.step()
    return cuda_kernels_of(opt.step)


@requires_cuda_kernels
@pytest.mark.parametrize("grouping", ["one-group", "two-lr-groups"])
@pytest.mark.parametrize("dtypes", [pytest.param([torch.float32], id="fp32"),
                                    pytest.param([torch.float32, torch.bfloat16], id="fp32+bf16")])
@pytest.mark.parametrize("name, options", STEP_CASES)
def test_one_launch_per_step_for_gpt2_small(name, options, dtypes, grouping):
    """Every tensor, both dtypes, every group and every step counter: one kernel, and no other
    GPU work (no copies, no fills)."""
    params = cuda_model(gpt2_small_shapes(), dtypes)
    assert len(params) == 148
    groups = ([{"params": params}] if grouping == "one-group" else
              [{"params": params[::2]}, {"params": params[1::2], "lr": 3e-4}])
    names = launches_of_step(getattr(fused_opt, name)(groups, lr=1e-3, **options))
    assert len(names) == 1 and MAIN_KERNEL in names[0], names


@requires_cuda_kernels
def test_adamw_groups_with_and_without_weight_decay_share_one_launch():
    """The usual LLM split: matrices decay, norms and biases do not. The Llama-style list's 201
    tensors at an eighth of the width: the launch count does not depend on sizes."""
    params = cuda_model(llama_shapes(hidden=256, intermediate=704, kv_dim=32, vocab_size=1000),
                        [torch.bfloat16])
    assert len(params) == 201
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    assert decay and no_decay
    opt = fused_opt.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    names = launches_of_step(opt)
    assert len(names) == 1 and MAIN_KERNEL in names[0], names


@requires_cuda_kernels
@pytest.mark.parametrize("name, options", STEP_CASES)
def test_step_neither_synchronizes_nor_allocates(name, options):
    params = cuda_model([(1000, 77), (3,), (0,), (4097,)], [torch.float32, torch.bfloat16])
    opt = getattr(fused_opt, name)(params, lr=torch.tensor(1e-3, device="cuda"), **options)
    opt.step()
    torch.cuda.synchronize()
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations


@requires_cuda_kernels
@pytest.mark.parametrize("name, options", STEP_CASES)
def test_step_runs_on_the_current_stream(name, options):
    """The step waits behind work queued on a side stream, and the default stream does not wait
    for the step: a kernel on the wrong stream would update the params before the sleep ends."""
    params = cuda_model([(4096,), (33,)], [torch.float32])
    opt = getattr(fused_opt, name)(params, lr=1e-2, **options)
    opt.step()
    before = [p.detach().clone() for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000_000)
        opt.step()
    snapshot = [p.detach().clone() for p in params]
    torch.cuda.current_stream().synchronize()
    assert all(torch.equal(s, b) for s, b in zip(snapshot, before)), "the step ran too early"
    side.synchronize()
    assert not all(torch.equal(p, b) for p, b in zip(params, before)), "the step did not run"


@requires_cuda_kernels
@pytest.mark.parametrize("op", list(OP_RICH))
def test_scaled_step_with_masters_is_one_main_launch_without_sync_or_allocation(op):
    """Loss scale, found_inf, clipping and masters add no launch, no sync, no allocation: the
    kernels read them on the device."""
    cpu = make_op_tensors(op, OP_RICH[op], [(s, torch.bfloat16) for s in SHAPES], seed=30,
                          masters=True)
    t = copy_to(cpu, CUDA)
    grads = random_grads(cpu.params, torch.Generator().manual_seed(31))
    t.grads = [g.cuda() for g in scaled(grads, "all")]
    scaling = scaling_args("all", grads, "cuda")
    call_op(op, t, OP_RICH[op], **scaling)
    names = cuda_kernels_of(lambda: call_op(op, t, OP_RICH[op], **scaling))
    assert len(names) == 1 and MAIN_KERNEL in names[0], names
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            call_op(op, t, OP_RICH[op], **scaling)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations


@requires_cuda_kernels
def test_grad_norm_is_one_launch_without_sync_or_allocation():
    """GPT-2 small's 148 grads: one kernel, nothing else on the GPU, nothing allocated, no sync."""
    torch.manual_seed(32)
    grads = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in gpt2_small_shapes()]
    buffers = NormBuffers.on(CUDA)
    grad_norm(grads, buffers)

    def call() -> None:
        torch.ops.fused_opt.grad_norm_(grads, buffers.norm, buffers.found_inf, buffers.workspace)

    names = cuda_kernels_of(call)
    assert len(names) == 1 and NORM_KERNEL in names[0], names
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            call()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations


@requires_cuda_kernels
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_params_on_a_device_that_is_not_current():
    cpu = make_op_tensors("adam", OP_RICH["adam"], [(s, torch.float32) for s in SHAPES], seed=12)
    cuda = copy_to(cpu, Target("cuda", "cuda:1", torch.ops.fused_opt))
    with torch.cuda.device(0):
        run_cuda_and_cpu("adam", OP_RICH["adam"], cpu, cuda)


# ------------------------------------------------------------------------------------------------
# CUDA graphs

def paired_grads(graph_params, eager_params, seed: int):
    """A function giving both param lists the same fresh random grads; the graph's in place,
    since a captured step reads the grad buffers it was captured with."""
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def new_grads() -> None:
        for gp, ep in zip(graph_params, eager_params):
            grad = torch.randn(gp.shape, generator=generator, device="cuda").to(gp.dtype)
            gp.grad.copy_(grad)
            ep.grad = grad.clone()

    return new_grads


def capture(graph_opt, eager_opt, new_grads, warm_up_steps: int) -> torch.cuda.CUDAGraph:
    """Steps both optimizers on a side stream first, as capture requires (the states are created
    there), then captures graph_opt.step()."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm_up_steps):
            new_grads()
            graph_opt.step()
            eager_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    return graph


@requires_cuda_kernels
@pytest.mark.parametrize("name, options", STEP_CASES)
def test_graph_replays_match_eager_steps_and_follow_a_tensor_lr(name, options):
    """A captured step replayed with fresh grads matches the same steps taken eagerly with a float
    lr; changing the tensor lr in place between replays has the effect of changing the float lr."""
    shapes, dtypes = [(257, 31), (1,), (0,), (70001,)], [torch.float32, torch.bfloat16]
    graph_params = cuda_model(shapes, dtypes, seed=13)
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in graph_params]
    lr = torch.tensor(1e-2, device="cuda")
    graph_opt = getattr(fused_opt, name)(graph_params, lr=lr, **options)
    eager_opt = getattr(fused_opt, name)(eager_params, lr=1e-2, **options)
    new_grads = paired_grads(graph_params, eager_params, seed=14)
    graph = capture(graph_opt, eager_opt, new_grads, warm_up_steps=2)

    for replay in range(6):
        if replay == 3:
            lr.fill_(3e-3)
            eager_opt.param_groups[0]["lr"] = 3e-3
        new_grads()
        graph.replay()
        eager_opt.step()
        torch.cuda.synchronize()
        for index, (gp, ep) in enumerate(zip(graph_params, eager_params)):
            where = f"param {index} after replay {replay + 1}"
            # The float lr and the float32 tensor lr differ in their last bits only.
            assert_close(gp, ep, where, magnitude([ep.double()]))
            for key, value in eager_opt.state[ep].items():
                assert_close(graph_opt.state[gp][key], value, f"state {key!r}, {where}",
                             magnitude([value.double()]))


@requires_cuda_kernels
def test_graph_follows_tensor_betas_changed_between_replays():
    """Tensor betas are read on the device: capturing a step with them works (a host read would
    fail inside the capture), and a change in place reaches the next replay."""
    shapes, dtypes = [(257, 31), (1,), (70001,)], [torch.float32, torch.bfloat16]
    graph_params = cuda_model(shapes, dtypes, seed=15)
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in graph_params]
    betas = (torch.tensor(0.9, device="cuda"), torch.tensor(0.99, device="cuda"))
    graph_opt = fused_opt.AdamW(graph_params, lr=1e-2, betas=betas)
    eager_opt = fused_opt.AdamW(eager_params, lr=1e-2, betas=(0.9, 0.99))
    new_grads = paired_grads(graph_params, eager_params, seed=16)
    graph = capture(graph_opt, eager_opt, new_grads, warm_up_steps=1)

    for replay in range(4):
        if replay == 2:
            betas[0].fill_(0.8)
            betas[1].fill_(0.95)
            eager_opt.param_groups[0]["betas"] = (0.8, 0.95)
        new_grads()
        graph.replay()
        eager_opt.step()
        torch.cuda.synchronize()
        for index, (gp, ep) in enumerate(zip(graph_params, eager_params)):
            where = f"param {index} after replay {replay + 1}"
            assert_close(gp, ep, where, magnitude([ep.double()]))


@requires_cuda_kernels
def test_graph_replay_is_bitwise_equal_to_eager_with_the_same_tensor_lr():
    """The same kernels on the same inputs: a replay and an eager step agree exactly."""
    shapes, dtypes = [(1000, 3), (5,), (0,)], [torch.float32, torch.float16]
    graph_params = cuda_model(shapes, dtypes, seed=15)
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in graph_params]
    for gp, ep in zip(graph_params, eager_params):
        ep.grad = gp.grad.clone()
    graph_lr = torch.tensor(1e-2, device="cuda")
    eager_lr = graph_lr.clone()
    graph_opt = fused_opt.AdamW(graph_params, lr=graph_lr, amsgrad=True)
    eager_opt = fused_opt.AdamW(eager_params, lr=eager_lr, amsgrad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph_opt.step()
        eager_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for replay in range(4):
        graph_lr.mul_(0.5)
        eager_lr.mul_(0.5)
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for gp, ep in zip(graph_params, eager_params):
        assert torch.equal(gp, ep)
        for key, value in eager_opt.state[ep].items():
            assert torch.equal(graph_opt.state[gp][key], value), key


@requires_cuda_kernels
@pytest.mark.parametrize("op", list(OP_RICH))
def test_graph_of_grad_norm_and_a_scaled_clipped_step_matches_eager_calls(op):
    """grad_norm_ and a step that reads its norm and flag, with a loss scale and 16-bit params
    with masters, captured once: replays with fresh grads equal the same calls made eagerly bit
    for bit, a replay whose grads hold an inf changes nothing, and a scale changed in place between
    replays takes effect. Every replay reuses the workspace that the last one left."""
    options = OP_RICH[op]
    specs = [((257, 31), torch.bfloat16), ((1,), torch.float16), ((0,), torch.bfloat16),
             ((70001,), torch.float16)]
    cpu = make_op_tensors(op, options, specs, seed=33, masters=True)
    graph_t, eager_t = copy_to(cpu, CUDA), copy_to(cpu, "cuda")
    graph_t.grads = [torch.zeros_like(p) for p in graph_t.params]  # the buffers the graph reads
    graph_buffers, eager_buffers = NormBuffers.on(CUDA), NormBuffers.on(CUDA)
    graph_scale = torch.tensor(GRAD_SCALE, device="cuda")
    eager_scale = graph_scale.clone()
    generator = torch.Generator(device="cuda").manual_seed(34)

    def new_grads(with_inf: bool) -> None:
        for index, (gp, ep) in enumerate(zip(graph_t.params, eager_t.params)):
            grad = torch.randn(gp.shape, generator=generator, device="cuda") * graph_scale
            if with_inf and index == 3:
                grad[12345] = math.inf
            graph_t.grads[index].copy_(grad)
            eager_t.grads[index] = grad.to(ep.dtype)

    def step(t: OpTensors, buffers: NormBuffers, scale: Tensor) -> None:
        torch.ops.fused_opt.grad_norm_(t.grads, buffers.norm, buffers.found_inf, buffers.workspace,
                                       grad_scale=scale)
        call_op(op, t, options, grad_scale=scale, found_inf=buffers.found_inf,
                grad_norm=buffers.norm, max_grad_norm=1.0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            new_grads(with_inf=False)
            step(graph_t, graph_buffers, graph_scale)
            step(eager_t, eager_buffers, eager_scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graph_t, graph_buffers, graph_scale)

    for replay in range(6):
        if replay == 4:
            graph_scale.fill_(GRAD_SCALE / 2)
            eager_scale.fill_(GRAD_SCALE / 2)
        with_inf = replay == 2
        new_grads(with_inf)
        before = {kind: [t.clone() for t in ts] for kind, ts in graph_t.all_tensors().items()}
        graph.replay()
        step(eager_t, eager_buffers, eager_scale)
        torch.cuda.synchronize()
        where = f"replay {replay + 1}"
        assert graph_buffers.found_inf.item() == (1.0 if with_inf else 0.0), where
        assert torch.equal(bits(graph_buffers.norm), bits(eager_buffers.norm)), where
        for kind, tensors in graph_t.all_tensors().items():
            for index, (g, e) in enumerate(zip(tensors, eager_t.all_tensors()[kind])):
                assert torch.equal(g, e), f"{kind}[{index}], {where}"
                if with_inf:
                    assert torch.equal(g, before[kind][index]), f"{kind}[{index}] changed, {where}"


def test_tensor_lr_of_every_float_dtype(target):
    cpu = make_op_tensors("sgd", OP_RICH["sgd"], [(s, torch.float32) for s in SHAPES], seed=16)
    for lr_dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        cuda = copy_to(cpu, target)
        expected = copy.deepcopy(cpu)
        lr = torch.tensor(0.25, dtype=lr_dtype)  # exact in every dtype
        generator = torch.Generator().manual_seed(17)
        expected.grads = random_grads(expected.params, generator)
        cuda.grads = [g.to(target.device) for g in expected.grads]
        call_op("sgd", expected, {**OP_RICH["sgd"], "lr": 0.25})
        call_op("sgd", cuda, {**OP_RICH["sgd"], "lr": 99.0}, lr_tensor=lr.to(target.device))
        assert_ops_agree(cuda, expected, f"lr_tensor {lr_dtype}")


@requires_cuda_kernels
@pytest.mark.parametrize("name, options", STEP_CASES)
def test_cpu_tensor_lr_with_cuda_params_steps_as_its_value_without_a_sync(name, options):
    """torch's compiled-optimizer-with-scheduler recipe passes lr=torch.tensor(0.01) on the CPU
    with a CUDA model: accepted, read on the host (no device sync), equal to the float lr."""
    params = cuda_model([(1000, 77), (3,), (0,), (4097,)], [torch.float32, torch.bfloat16])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, twin in zip(params, twins):
        twin.grad = p.grad.clone()
    opt = getattr(fused_opt, name)(params, lr=torch.tensor(0.01), **options)
    reference = getattr(fused_opt, name)(twins, lr=0.01, **options)
    opt.step()  # the first step creates the state
    reference.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference.step()
    for index, (p, twin) in enumerate(zip(params, twins)):
        assert torch.equal(p, twin), f"params[{index}]"
