"""Mixed precision: fp32 master weights, loss scaling and global-norm clipping in the kernels.

Correctness comes from the float64 references (tests/reference, with unscale_and_clip for what
the scaler and the clipping do to the gradients) and from torch's own pipeline:
GradScaler.unscale_, clip_grad_norm_, GradScaler.step and GradScaler.update with torch.optim.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import fused_opt
from fused_opt import _ops
from config import tolerance
from devices import requires_cuda_kernels
from optim_helpers import FULL_STATE_OPTIONS, NAMES, as_torch_state
from reference import REFERENCES, unscale_and_clip
from test_api import _RecordFusedOps
from test_parity import as_float64, assert_close, magnitude, random_grad

# Odd sizes, one element, one tensor crossing the 32 Ki-element chunks of the norm pass, and an
# empty tensor last.
SHAPES = [(1,), (1031,), (3, 7, 5), (65537,), (0,)]
STEPS = 8
INIT_SCALE = 2.0**12
# The scale grows after this many clean steps, so a run sees growth as well as backoff.
GROWTH_INTERVAL = 3
# step -> (value, tensor index, flat element index) put into that step's scaled gradients.
BAD_STEPS = {2: (math.inf, 3, 40000), 5: (math.nan, 1, 0)}
# A threshold below the gradients' global norm (about 180 for SHAPES), so every step clips.
CLIP = 50.0
SCALERS = ("fused", "torch", "torch-unscale")


def make_params(dtype: torch.dtype, seed: int = 0, shapes=SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def new_scaler(kind: str, init_scale: float = INIT_SCALE) -> torch.amp.GradScaler:
    cls = fused_opt.GradScaler if kind == "fused" else torch.amp.GradScaler
    scaler = cls("cpu", init_scale=init_scale, growth_interval=GROWTH_INTERVAL)
    scaler.scale(torch.ones(()))  # creates the scale tensor, as the first scaled loss does
    return scaler


def scaled_grads(
    grads: Sequence[Tensor], scale: float, bad: tuple[float, int, int] | None
) -> list[Tensor]:
    """The grads backward() of a loss scaled by `scale` gives (exact: scales are powers of 2)."""
    scaled = [g * scale for g in grads]
    if bad is not None:
        value, tensor, element = bad
        scaled[tensor].view(-1)[element] = value
    return scaled


class PipelineRun:
    """fused_opt under a scaler (and max_grad_norm), torch.optim under torch's scaler with
    unscale_ and clip_grad_norm_, and the reference, fed the same gradients step by step.

    With `master_dtype`, fused_opt's params are 16-bit with fp32 masters, and fp32 params
    beside them (their own masters, in the same op call), while torch and the reference train
    fp32/float64 params on the same (16-bit representable) gradients: the masters must follow
    fp32 training.
    """

    def __init__(self, name: str, scaler_kind: str, max_norm: float | None, master_dtype=None):
        self.name, self.scaler_kind, self.max_norm = name, scaler_kind, max_norm
        self.options = FULL_STATE_OPTIONS[name]
        self.grad_dtype = master_dtype or torch.float32
        init = make_params(self.grad_dtype)
        if master_dtype is not None:
            init += make_params(torch.float32, seed=5)
        self.fused_params = [torch.nn.Parameter(p.detach().clone()) for p in init]
        self.torch_params = [torch.nn.Parameter(p.detach().float()) for p in init]
        self.ref_params = [p.detach().double().numpy().copy() for p in init]
        self.ref_states: list[dict[str, Any]] = [{} for _ in init]
        self.fused = getattr(fused_opt, name)(
            self.fused_params,
            master_weights=master_dtype is not None,
            max_grad_norm=None if scaler_kind == "torch-unscale" else max_norm,
            **self.options,
        )
        self.torch = getattr(torch.optim, name)(self.torch_params, foreach=False, **self.options)
        self.fused_scaler = new_scaler(scaler_kind)
        self.torch_scaler = new_scaler("torch")
        self.stepped = self.skipped = 0

    def step(self, index: int, generator: torch.Generator) -> None:
        self.stepped += 1
        grads = [random_grad(p, generator) for p in self.fused_params]
        scale = self.torch_scaler.get_scale()
        assert self.fused_scaler.get_scale() == scale, f"scale before step {index}"
        bad = BAD_STEPS.get(index)
        for params in (self.fused_params, self.torch_params):
            for p, g in zip(params, scaled_grads(grads, scale, bad)):
                p.grad = g.to(p.dtype)

        if self.scaler_kind == "torch-unscale":
            self.fused_scaler.unscale_(self.fused)
            if self.max_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.fused_params, self.max_norm, foreach=True)
        self.fused_scaler.step(self.fused)
        self.fused_scaler.update()

        self.torch_scaler.unscale_(self.torch)
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.torch_params, self.max_norm, foreach=True)
        self.torch_scaler.step(self.torch)
        self.torch_scaler.update()

        ref_grads = unscale_and_clip(
            [as_float64(g).numpy() for g in scaled_grads(grads, scale, bad)], scale, self.max_norm
        )
        if ref_grads is None:
            self.skipped += 1
            return
        for p, g, state in zip(self.ref_params, ref_grads, self.ref_states):
            REFERENCES[self.name](p, g, state, **self.options)

    def check(self, when: str) -> None:
        assert self.fused_scaler.get_scale() == self.torch_scaler.get_scale(), f"scale, {when}"
        torch_states = [self.torch.state.get(p, {}) for p in self.torch_params]
        scales = {
            key: magnitude([s[key] for s in torch_states if key in s])
            for key in {k for s in torch_states for k in s if k != "step"}
        }
        param_scale = magnitude(self.torch_params)
        for index, (fused_p, torch_p, ref_p, ref_state) in enumerate(
            zip(self.fused_params, self.torch_params, self.ref_params, self.ref_states)
        ):
            where = f"{when}, param {index} {tuple(fused_p.shape)}"
            state = self.fused.state.get(fused_p, {})
            master = state.get(fused_opt.optimizer.MASTER_KEY)
            if fused_p.dtype != torch.float32:
                assert master is not None and master.dtype == torch.float32, where
                assert torch.equal(fused_p, master.to(fused_p.dtype)), f"param = master, {where}"
            updated = fused_p if master is None else master
            assert_close(updated, torch_p, torch.float32, f"param vs torch, {where}", param_scale)
            assert_close(updated, ref_p, torch.float32, f"param vs reference, {where}", param_scale)
            torch_state = torch_states[index]
            fused_state = as_torch_state(self.name, state)
            fused_state.pop(fused_opt.optimizer.MASTER_KEY, None)
            assert set(fused_state) == set(torch_state), f"state keys, {where}"
            for key, expected in torch_state.items():
                what = f"state[{key!r}], {where}"
                if key == "step":
                    assert fused_state[key].item() == expected.item() == ref_state["step"], what
                    continue
                assert fused_state[key].dtype == torch.float32, what
                assert_close(fused_state[key], expected, torch.float32, f"{what} vs torch",
                             scales[key])
                assert_close(fused_state[key], ref_state[key], torch.float32,
                             f"{what} vs reference", scales[key])
            if self.name == "SGD" and "step" in state:
                assert state["step"].item() == self.stepped - self.skipped, f"SGD counter, {where}"


@pytest.mark.parametrize("max_norm", [None, CLIP], ids=["no-clip", "clip"])
@pytest.mark.parametrize("scaler_kind", SCALERS)
@pytest.mark.parametrize("name", NAMES)
def test_scaled_steps_match_torch_pipeline_and_reference(name, scaler_kind, max_norm, kernels):
    run = PipelineRun(name, scaler_kind, max_norm)
    generator = torch.Generator().manual_seed(11)
    for index in range(STEPS):
        run.step(index, generator)
        run.check(f"after step {index}")
    assert run.skipped == len(BAD_STEPS)


@pytest.mark.parametrize("master_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", NAMES)
def test_master_weights_under_scaler_and_clipping_follow_fp32_training(name, master_dtype, kernels):
    run = PipelineRun(name, "fused", CLIP, master_dtype=master_dtype)
    generator = torch.Generator().manual_seed(12)
    for index in range(STEPS):
        run.step(index, generator)
        run.check(f"after step {index}")


# ------------------------------------------------------------------------------------------------
# Skipped steps


def _snapshot(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Any]:
    return [p.detach().clone() for p in params] + [
        {k: v.clone() for k, v in optimizer.state.get(p, {}).items()} for p in params
    ]


def _assert_bits_equal(actual: list[Any], expected: list[Any], what: str) -> None:
    assert len(actual) == len(expected), what
    for index, (a, e) in enumerate(zip(actual, expected)):
        if isinstance(e, dict):
            assert a.keys() == e.keys(), f"{what}: state keys of entry {index}"
            for key in e:
                assert torch.equal(a[key], e[key]), f"{what}: state {key!r} of entry {index}"
        else:
            assert torch.equal(a, e), f"{what}: param {index}"


@pytest.mark.parametrize("bad_value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("scaler_kind", ["fused", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_one_bad_element_among_many_tensors_changes_nothing(name, scaler_kind, bad_value, kernels):
    shapes = [(n % 7 + 1, n % 5 + 1) for n in range(37)] + [(40000,), (0,)]
    params = make_params(torch.bfloat16, shapes=shapes)
    optimizer = getattr(fused_opt, name)(params, master_weights=True, max_grad_norm=1.0,
                                         **FULL_STATE_OPTIONS[name])
    scaler = new_scaler(scaler_kind)
    generator = torch.Generator().manual_seed(3)
    for index in range(3):
        for p in params:
            p.grad = random_grad(p, generator) * scaler.get_scale()
        if index == 2:
            params[17].grad.view(-1)[4] = bad_value
            before = _snapshot(optimizer, params)
            versions = [p.grad._version for p in params]
        scaler.step(optimizer)
        scaler.update()
    _assert_bits_equal(_snapshot(optimizer, params), before, "after the skipped step")
    assert scaler.get_scale() == INIT_SCALE / 2
    assert optimizer.last_step_skipped.item() != 0
    if scaler_kind == "fused":
        # Nothing wrote the grads: fused_opt unscales in registers.
        assert [p.grad._version for p in params] == versions


@pytest.mark.parametrize("scaler_kind", ["fused", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_skipped_first_step_is_as_if_it_never_happened(name, scaler_kind, kernels):
    # torch's fused SGD leaves its momentum buffer uninitialized here; dampening shows it.
    options = FULL_STATE_OPTIONS[name]
    generator = torch.Generator().manual_seed(4)
    grads = [random_grad(p, generator) for p in make_params(torch.float32)]

    skipped_params = make_params(torch.float32)
    skipped = getattr(fused_opt, name)(skipped_params, **options)
    scaler = new_scaler(scaler_kind)
    for p, g in zip(skipped_params, scaled_grads(grads, INIT_SCALE, (math.nan, 1, 5))):
        p.grad = g
    initial = [p.detach().clone() for p in skipped_params]
    scaler.step(skipped)
    scaler.update()
    assert all(torch.equal(p, i) for p, i in zip(skipped_params, initial))
    for p in skipped_params:
        step = skipped.state[p].get("step")
        assert step is None or step.item() == 0

    fresh_params = make_params(torch.float32)
    fresh = getattr(fused_opt, name)(fresh_params, **options)
    fresh_scaler = new_scaler(scaler_kind, init_scale=INIT_SCALE / 2)
    for opt, params, s in ((skipped, skipped_params, scaler), (fresh, fresh_params, fresh_scaler)):
        for p, g in zip(params, scaled_grads(grads, s.get_scale(), None)):
            p.grad = g
        s.step(opt)
        s.update()
    _assert_bits_equal(
        _snapshot(skipped, skipped_params), _snapshot(fresh, fresh_params), "after one real step"
    )


def _reuse_nan_memory(shapes) -> None:
    """Leaves freed NaN-filled blocks of these shapes for the allocator to hand out next, so that
    memory taken without initializing it shows NaN."""
    for _ in range(8):
        blocks = [torch.full(shape, math.nan) for shape in shapes for _ in range(8)]
        del blocks


@pytest.mark.parametrize("scaler_kind", ["fused", "torch"])
def test_sgd_buffer_of_a_skipped_first_step_is_saved_as_zeros(scaler_kind):
    # torch.optim.SGD keeps no counter: a buffer in a checkpoint is a started one, so whatever
    # fused_opt saves for a buffer that was never started is what torch.optim.SGD continues from.
    shapes = [(1031,), (40, 50)]
    params = make_params(torch.float32, shapes=shapes)
    options = FULL_STATE_OPTIONS["SGD"]
    optimizer = fused_opt.SGD(params, **options)
    scaler = new_scaler(scaler_kind)
    generator = torch.Generator().manual_seed(5)
    grads = [random_grad(p, generator) for p in params]
    for p, g in zip(params, scaled_grads(grads, INIT_SCALE, (math.inf, 0, 0))):
        p.grad = g
    _reuse_nan_memory(shapes)
    scaler.step(optimizer)
    scaler.update()

    state_dict = copy.deepcopy(optimizer.state_dict())
    for index, state in state_dict["state"].items():
        assert torch.equal(state["momentum_buffer"], torch.zeros(shapes[index])), index
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.SGD(torch_params, **options)
    reference.load_state_dict(state_dict)
    for p, g in zip(torch_params, grads):
        p.grad = g.clone()
    reference.step()
    assert all(torch.isfinite(p).all() for p in torch_params)


@pytest.mark.parametrize("name", NAMES)
def test_fused_scaler_step_without_grads_refuses_like_torch(name):
    outcomes = []
    for scaler_kind, module in (("torch", torch.optim), ("fused", fused_opt)):
        params = make_params(torch.float32)
        optimizer = getattr(module, name)(params, **FULL_STATE_OPTIONS[name])
        scaler = new_scaler(scaler_kind)
        before = _snapshot(optimizer, params)
        with pytest.raises(AssertionError) as excinfo:
            scaler.step(optimizer)
        _assert_bits_equal(_snapshot(optimizer, params), before, f"{scaler_kind} scaler")
        outcomes.append(str(excinfo.value))
    assert outcomes[1] == outcomes[0]


# ------------------------------------------------------------------------------------------------
# Clipping without a scaler


# Grads times 20 have a global norm near 5700: 2000 clips them, 1e9 does not. Far smaller
# thresholds make the grads smaller than the weight decay terms, whose cancellation then
# amplifies rounding beyond any fp32 tolerance, in torch as in fused_opt.
@pytest.mark.parametrize("max_norm", [0.0, 2000.0, 1e9], ids=["zero", "clip", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_max_grad_norm_equals_clip_grad_norm_over_all_groups(name, max_norm, kernels):
    options = FULL_STATE_OPTIONS[name]
    init = make_params(torch.float32)
    fused_params = [torch.nn.Parameter(p.detach().clone()) for p in init]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in init]
    # Two groups with different lrs: the norm is still global, as clip_grad_norm_'s over both.
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": options["lr"] / 2}]  # noqa: E731
    fused = getattr(fused_opt, name)(groups(fused_params), max_grad_norm=max_norm, **options)
    reference = getattr(torch.optim, name)(groups(torch_params), foreach=False, **options)
    generator = torch.Generator().manual_seed(5)
    for index in range(5):
        grads = [random_grad(p, generator) * 20 for p in init]
        for a, b, g in zip(fused_params, torch_params, grads):
            a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        total_norm = torch.nn.utils.clip_grad_norm_(torch_params, max_norm, foreach=True)
        reference.step()
        torch.testing.assert_close(fused.last_grad_norm, total_norm, rtol=1e-6, atol=0)
        assert fused.last_step_skipped is None
        for a, b, g in zip(fused_params, torch_params, grads):
            assert_close(a, b, torch.float32, f"param after step {index}", magnitude(torch_params))
            assert torch.equal(a.grad, g), "the grads are read, never written"
        for a, b in zip(fused_params, torch_params):
            expected = reference.state.get(b, {})
            actual = as_torch_state(name, fused.state.get(a, {}))
            assert actual.keys() == expected.keys()
            for key, value in expected.items():
                assert_close(actual[key], value, torch.float32, f"{key} after step {index}",
                             magnitude([value]))


def test_groups_with_different_max_grad_norm_are_refused_before_any_change():
    params = make_params(torch.float32)
    optimizer = fused_opt.AdamW([{"params": params[:2]}, {"params": params[2:]}], max_grad_norm=1.0)
    optimizer.param_groups[1]["max_grad_norm"] = 2.0
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="every param group needs the same value"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not optimizer.state


@pytest.mark.parametrize(
    ("keywords", "error", "message"),
    [
        ({"max_grad_norm": -1.0}, ValueError, "Invalid max_grad_norm value: -1.0"),
        ({"max_grad_norm": math.nan}, ValueError, "Invalid max_grad_norm value: nan"),
        ({"max_grad_norm": "1"}, ValueError, "Invalid max_grad_norm value: 1"),
        ({"master_weights": 1}, TypeError, "master_weights must be a bool, got 1"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_invalid_mixed_precision_options_are_refused(name, keywords, error, message):
    with pytest.raises(error, match=message):
        getattr(fused_opt, name)(make_params(torch.float32), **keywords)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_sparse_grads_cannot_be_clipped_in_the_kernel(name):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = getattr(fused_opt, name)(embedding.parameters(), lr=0.1, max_grad_norm=1.0)
    embedding(torch.tensor([1, 2])).sum().backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients cannot be unscaled, skipped or clipped"):
        optimizer.step()
    assert torch.equal(embedding.weight, before)


@pytest.mark.parametrize("scaler_kind", ["fused", "torch"])
def test_sparse_grads_under_a_scaler_train_like_torch(scaler_kind):
    # With a sparse grad present the optimizer declines the scaler's tensors, and the scaler
    # unscales and checks the grads itself, as for torch.optim.
    results = []
    for module, kind in ((fused_opt, scaler_kind), (torch.optim, "torch")):
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(10, 3, sparse=True)
        optimizer = module.SGD(embedding.parameters(), lr=0.1, momentum=0.9)
        scaler = new_scaler(kind)
        for index in range(3):
            optimizer.zero_grad()
            loss = embedding(torch.tensor([1, 2, index])).pow(2).sum()
            scaler.scale(loss).backward()
            assert getattr(optimizer, "_step_supports_amp_scaling", False) is False
            scaler.step(optimizer)
            scaler.update()
        results.append(embedding.weight.detach())
    torch.testing.assert_close(results[0], results[1])


# ------------------------------------------------------------------------------------------------
# The gradient statistics pass


def _grad_norm(grads, grad_scale=None):
    norm, found_inf = torch.full((), -1.0), torch.full((), -1.0)
    workspace = torch.zeros(fused_opt._ops.GRAD_NORM_WORKSPACE_NUMEL)
    _ops.op_namespace.grad_norm_(grads, norm, found_inf, workspace, grad_scale=grad_scale)
    return norm, found_inf


MIXED_GRADS = [
    (torch.float32, (1031,)),
    (torch.bfloat16, (3, 7, 5)),
    (torch.float16, (65537,)),
    (torch.float64, (70001,)),
    (torch.float32, (0,)),
    # Shorter than one pass of the CPU pass's accumulators: summed by its short-chunk loop.
    (torch.bfloat16, (31,)),
]


def _mixed_grads(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for dtype, shape in MIXED_GRADS]


@pytest.mark.parametrize("grad_scale", [None, 2.0**-3, 1024.0, 3.0])
def test_grad_norm_is_the_global_norm_divided_by_the_scale(grad_scale, kernels):
    grads = _mixed_grads()
    scale = None if grad_scale is None else torch.tensor(grad_scale)
    norm, found_inf = _grad_norm(grads, scale)
    expected = math.sqrt(sum(float(np.sum(as_float64(g).numpy() ** 2)) for g in grads))
    expected /= grad_scale or 1.0
    assert norm.dtype == torch.float32 and found_inf.dtype == torch.float32
    assert norm.item() == pytest.approx(expected, rel=1e-6)
    assert found_inf.item() == 0.0


def test_grad_norm_of_no_grads_is_zero(kernels):
    norm, found_inf = _grad_norm([])
    assert (norm.item(), found_inf.item()) == (0.0, 0.0)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("tensor", [0, 1, 2, 3, 5])
def test_grad_norm_flags_any_non_finite_element(tensor, value, kernels):
    grads = _mixed_grads()
    grads[tensor].view(-1)[-1] = value
    assert _grad_norm(grads)[1].item() == 1.0


# Every region the CPU pass reads a chunk in: its four parts side by side (a 1031-element grad:
# parts of 256 from 0, 256, 512 and 768, then a tail of 7 from 1024), and the same in the second
# chunk of a 65537-element grad (parts of 8192 from 32768), whose last element is a chunk alone.
@pytest.mark.parametrize("value", [math.inf, math.nan])
@pytest.mark.parametrize("tensor, position", [
    (0, 0), (0, 255), (0, 256), (0, 600), (0, 768), (0, 1023), (0, 1024), (0, 1030),
    (2, 32768 + 8192 + 5), (2, 32768 + 2 * 8192 + 5), (2, 32768 + 3 * 8192 + 5), (2, 65536),
])
def test_grad_norm_flags_a_non_finite_element_anywhere_in_a_grad(tensor, position, value,
                                                                 kernels):
    grads = _mixed_grads()
    grads[tensor][position] = value
    assert _grad_norm(grads)[1].item() == 1.0


def test_grad_norm_flags_only_non_finite_elements(kernels):
    # Squares of float64 values past 1e154 overflow to inf, yet the values are finite: no skip.
    norm, found_inf = _grad_norm([torch.full((3,), 1e200, dtype=torch.float64)])
    assert found_inf.item() == 0.0 and math.isinf(norm.item())


def test_grad_norm_has_the_same_bits_for_any_thread_count():
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (300000, 7, 99999)]
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3, 1):
            torch.set_num_threads(count)
            results.append(_grad_norm(grads)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


# ------------------------------------------------------------------------------------------------
# Master weights


# Every optimizer with every state it has, and plain SGD, whose master is its only state.
MASTER_CASES = [pytest.param(name, FULL_STATE_OPTIONS[name], id=name) for name in NAMES] + [
    pytest.param("SGD", {}, id="SGD-no-momentum")
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, options", MASTER_CASES)
def test_master_weights_keep_updates_that_16bit_params_lose(name, options, dtype, kernels):
    # Updates of ~1e-5 on params of ~1 are below half a 16-bit ulp: plain 16-bit training loses
    # every one of them, the master accumulates them as fp32 training does.
    options = {**options, "lr": 1e-5}
    gen = torch.Generator().manual_seed(0)
    # Magnitudes in [1, 2), where half a bf16 ulp is 2**-8 and half an fp16 ulp 2**-11.
    init = [
        (torch.rand(shape, generator=gen) + 1) * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
        for shape in [(1031,), (17, 3)]
    ]
    init = [t.to(dtype) for t in init]
    runs = {}
    for label, param_dtype, master in (("master", dtype, True), ("plain", dtype, False),
                                       ("fp32", torch.float32, False)):
        params = [torch.nn.Parameter(p.detach().to(param_dtype, copy=True)) for p in init]
        runs[label] = (params, getattr(fused_opt, name)(params, master_weights=master, **options))
    generator = torch.Generator().manual_seed(6)
    for _ in range(20):
        grads = [random_grad(p, generator) for p in init]
        for params, optimizer in runs.values():
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype)
            optimizer.step()
    master_params, master_opt = runs["master"]
    fp32_params, fp32_opt = runs["fp32"]
    for p, fp32_p, i in zip(master_params, fp32_params, init):
        state = master_opt.state[p]
        master = state[fused_opt.optimizer.MASTER_KEY]
        assert all(v.dtype == torch.float32 for v in state.values())
        torch.testing.assert_close(master, fp32_p.detach(), **tolerance(torch.float32))
        assert torch.equal(p, master.to(dtype))
        assert not torch.equal(master, i.float()), "the master moved"
        for key, value in fp32_opt.state[fp32_p].items():
            torch.testing.assert_close(state[key], value, **tolerance(torch.float32))
    assert all(torch.equal(p, i) for p, i in zip(runs["plain"][0], init)), "plain 16-bit lost them"


def test_master_weights_leave_fp32_params_of_the_group_alone(kernels):
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5).bfloat16())]
    optimizer = fused_opt.AdamW(params, master_weights=True)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert fused_opt.optimizer.MASTER_KEY not in optimizer.state[params[0]]
    assert optimizer.state[params[0]]["exp_avg"].dtype == torch.float32
    assert optimizer.state[params[1]]["exp_avg"].dtype == torch.float32
    assert optimizer.state[params[1]][fused_opt.optimizer.MASTER_KEY].dtype == torch.float32


# Edits to a 16-bit param between steps. The rule: every element whose param no longer holds its
# master's rounding restarts its master from the param; every other element keeps its fp32 bits.
# The oracle is torch.optim on fp32 copies of the params (the masters), to which the same rule
# applies the edit.


def _prune(params):
    gen = torch.Generator().manual_seed(11)
    for p in params:
        p.mul_(torch.rand(p.shape, generator=gen) < 0.5)


def _clip(params):
    for p in params:
        p.clamp_(-0.5, 0.5)  # bounds a bf16 and an fp16 param hold exactly


def _load_other_weights(params):
    # What swapping in EMA weights or loading a model's checkpoint does: copy_ into the params.
    gen = torch.Generator().manual_seed(12)
    module = torch.nn.ParameterList(params)
    module.load_state_dict(
        {str(i): torch.randn(p.shape, generator=gen).to(p.dtype) for i, p in enumerate(params)}
    )


EDITS = {"prune": _prune, "clip": _clip, "load-other-weights": _load_other_weights}


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("name, options", MASTER_CASES)
def test_edits_to_16bit_params_between_steps_are_kept(name, options, edit, kernels):
    dtype = torch.bfloat16
    init = [t.to(dtype) for t in _randn_tensors([(1031,), (17, 3), (0,), (1,)], seed=2)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    masters = [torch.nn.Parameter(t.float()) for t in init]
    fused = getattr(fused_opt, name)(params, master_weights=True, **options)
    oracle = getattr(torch.optim, name)(masters, **options)
    generator = torch.Generator().manual_seed(7)

    def step():
        for p, m in zip(params, masters):
            g = random_grad(m, generator).to(dtype)
            p.grad, m.grad = g, g.float()
        fused.step()
        oracle.step()

    for _ in range(2):
        step()
    with torch.no_grad():
        EDITS[edit](params)
        for p, m in zip(params, masters):
            m.copy_(torch.where(m.to(dtype) == p, m, p.float()))
    assert all(torch.equal(p, m.to(dtype)) for p, m in zip(params, masters))
    for _ in range(3):
        step()
    for p, m in zip(params, masters):
        state = fused.state[p]
        torch.testing.assert_close(state[fused_opt.optimizer.MASTER_KEY], m.detach(),
                                   **tolerance(torch.float32))
        assert torch.equal(p, state[fused_opt.optimizer.MASTER_KEY].to(dtype))
        for key, value in as_torch_state(name, oracle.state[m]).items():
            if key != "step":
                torch.testing.assert_close(state[key], value, **tolerance(torch.float32))


def _randn_tensors(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


@pytest.mark.parametrize("name, options", MASTER_CASES)
def test_steps_without_edits_never_compare_masters(name, options, monkeypatch, kernels):
    params = [torch.nn.Parameter(t.bfloat16()) for t in _randn_tensors([(1031,), (5,)], seed=3)]
    optimizer = getattr(fused_opt, name)(params, master_weights=True, **options)
    refreshed = []
    monkeypatch.setattr(optimizer, "_refresh_master", lambda p, master: refreshed.append(p))
    versions = [p._version for p in params]
    generator = torch.Generator().manual_seed(8)
    for _ in range(4):
        for p in params:
            p.grad = random_grad(p, generator)
        optimizer.step()
    # The op writes the params without moving their versions, so only an outside write does.
    assert [p._version for p in params] == versions
    assert refreshed == []
    with torch.no_grad():
        params[1].mul_(2)
    optimizer.step()
    assert refreshed == [params[1]]


def test_model_loaded_after_the_optimizer_keeps_the_checkpoint_masters(kernels):
    params = [torch.nn.Parameter(t.bfloat16()) for t in _randn_tensors([(1031,), (5,)], seed=4)]
    optimizer = fused_opt.AdamW(params, lr=1e-3, master_weights=True)
    generator = torch.Generator().manual_seed(9)
    for _ in range(3):
        for p in params:
            p.grad = random_grad(p, generator)
        optimizer.step()
    checkpoint = _save_and_load({"optimizer": optimizer.state_dict(),
                                 "model": {str(i): p.detach().clone() for i, p in enumerate(params)}})
    masters = [optimizer.state[p][fused_opt.optimizer.MASTER_KEY].clone() for p in params]
    assert any(not torch.equal(m, p.float()) for m, p in zip(masters, params)), "masters hold more"

    resumed = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    resumed_opt = fused_opt.AdamW(resumed, lr=1e-3, master_weights=True)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    torch.nn.ParameterList(resumed).load_state_dict(checkpoint["model"])
    grads = [random_grad(p, generator) for p in params]
    for optimizer_, params_ in ((optimizer, params), (resumed_opt, resumed)):
        for p, g in zip(params_, grads):
            p.grad = g.clone()
        optimizer_.step()
    _assert_bits_equal(_snapshot(resumed_opt, resumed), _snapshot(optimizer, params), "resumed")


def test_writes_through_data_need_refresh_master_weights(kernels):
    params = [torch.nn.Parameter(torch.randn(33).bfloat16())]
    optimizer = fused_opt.SGD(params, lr=0.1, momentum=0.9, master_weights=True)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    params[0].data.zero_()  # .data has a version counter of its own: step() cannot see this
    optimizer.refresh_master_weights()
    assert torch.equal(optimizer.state[params[0]][fused_opt.optimizer.MASTER_KEY],
                       torch.zeros(33))


def _save_and_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train(optimizer, params, scaler, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = (random_grad(p.float(), generator) * scaler.get_scale()).to(p.dtype)
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_reload_continues_bit_identically(name, kernels):
    def build(params):
        return getattr(fused_opt, name)(params, master_weights=True, max_grad_norm=CLIP,
                                        **FULL_STATE_OPTIONS[name])

    uninterrupted_params = make_params(torch.bfloat16)
    uninterrupted, scaler = build(uninterrupted_params), new_scaler("fused")
    _train(uninterrupted, uninterrupted_params, scaler, 3, seed=1)
    checkpoint = _save_and_load(
        {"optimizer": uninterrupted.state_dict(), "scaler": scaler.state_dict(),
         "params": [p.detach().clone() for p in uninterrupted_params]}
    )
    _train(uninterrupted, uninterrupted_params, scaler, 3, seed=2)

    resumed_params = [torch.nn.Parameter(p) for p in checkpoint["params"]]
    resumed, resumed_scaler = build(resumed_params), new_scaler("fused")
    resumed.load_state_dict(checkpoint["optimizer"])
    resumed_scaler.load_state_dict(checkpoint["scaler"])
    _train(resumed, resumed_params, resumed_scaler, 3, seed=2)
    resumed_snapshot = _snapshot(resumed, resumed_params)
    uninterrupted_snapshot = _snapshot(uninterrupted, uninterrupted_params)
    if name == "SGD":
        # SGD's counter only tells a started buffer, and is not saved (as in torch.optim.SGD's
        # state dict): the resumed one counts from one.
        for snapshot in (resumed_snapshot, uninterrupted_snapshot):
            for entry in snapshot:
                if isinstance(entry, dict):
                    assert entry.pop("step").item() >= 1
    _assert_bits_equal(resumed_snapshot, uninterrupted_snapshot, "resumed")
    for p in resumed_params:
        assert all(v.dtype == torch.float32 for v in resumed.state[p].values())


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_move_between_master_weights_and_torch(name, kernels):
    options = FULL_STATE_OPTIONS[name]
    params = make_params(torch.bfloat16)
    torch_opt = getattr(torch.optim, name)(params, **options)
    _train(torch_opt, params, new_scaler("torch"), 2, seed=3)

    # A torch.optim checkpoint of bf16 params: the master starts from the param, states go fp32.
    fused_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = getattr(fused_opt, name)(fused_params, master_weights=True, **options)
    fused.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for p, q in zip(fused_params, params):
        state, torch_state = fused.state[p], torch_opt.state[q]
        assert torch.equal(state[fused_opt.optimizer.MASTER_KEY], p.float())
        for key, value in torch_state.items():
            if key != "step":
                assert state[key].dtype == torch.float32 and torch.equal(state[key], value.float())
    _train(fused, fused_params, new_scaler("fused"), 2, seed=4)

    # And back: torch.optim rounds the states to the params' dtype and ignores the master.
    back_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    back = getattr(torch.optim, name)(back_params, **options)
    back.load_state_dict(copy.deepcopy(fused.state_dict()))
    _train(back, back_params, new_scaler("torch"), 1, seed=5)
    assert all(torch.isfinite(p).all() for p in back_params)


# ------------------------------------------------------------------------------------------------
# What a step costs


def test_fused_scaler_step_is_two_ops_and_allocates_nothing_after_the_first():
    params = make_params(torch.bfloat16) + make_params(torch.float32, seed=1)
    optimizer = fused_opt.AdamW(params, master_weights=True, max_grad_norm=CLIP)
    scaler = new_scaler("fused")
    _train(optimizer, params, scaler, 1, seed=0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        scaler.step(optimizer)
    events = prof.events()
    assert [(e.name, e.cpu_memory_usage) for e in events if e.cpu_memory_usage > 0] == []
    ops = [e.name for e in events if e.name.startswith("fused_opt::")]
    # One statistics pass, then one step: the fp32 params are their own masters in the same call.
    assert ops == ["fused_opt::grad_norm_", "fused_opt::adam_"]


def test_last_grad_norm_and_skip_flag_are_device_tensors():
    params = make_params(torch.float32)
    optimizer = fused_opt.Adam(params)
    scaler = new_scaler("fused")
    _train(optimizer, params, scaler, 1, seed=0)
    assert optimizer.last_grad_norm.shape == () and optimizer.last_grad_norm.item() > 0
    assert optimizer.last_step_skipped.item() == 0
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    torch.testing.assert_close(optimizer.last_grad_norm * INIT_SCALE, expected, rtol=1e-6, atol=0)
    optimizer.step()  # no scaler, no clipping: nothing measured
    assert optimizer.last_grad_norm is None and optimizer.last_step_skipped is None


# ------------------------------------------------------------------------------------------------
# A real training loop


def _autocast_run(module, scaler_cls, device: str, dtype: torch.dtype, steps: int, clip: float):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8)
    ).to(device)
    if module is fused_opt:
        optimizer = fused_opt.AdamW(model.parameters(), lr=1e-3, max_grad_norm=clip)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = scaler_cls(device, init_scale=2.0**10, growth_interval=20)
    data = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        x = torch.randn(16, 32, generator=data).to(device)
        y = torch.randn(16, 8, generator=data).to(device)
        optimizer.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        if step == 40:
            loss = loss * math.inf  # one overflowing step: skipped by both
        scaler.scale(loss).backward()
        if module is torch.optim:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return [p.detach().cpu() for p in model.parameters()], losses


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
        pytest.param("cuda", torch.float16, id="cuda-fp16", marks=requires_cuda_kernels),
    ],
)
def test_autocast_loop_tracks_torch_over_100_steps(device, dtype):
    fused_params, fused_losses = _autocast_run(
        fused_opt, fused_opt.GradScaler, device, dtype, 100, clip=0.5
    )
    torch_params, torch_losses = _autocast_run(
        torch.optim, torch.amp.GradScaler, device, dtype, 100, clip=0.5
    )
    for a, b in zip(fused_params, torch_params):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(fused_losses[-10:], torch_losses[-10:], rtol=1e-3)
    assert math.isinf(fused_losses[40]) and fused_losses[-1] < fused_losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_opcheck_with_master_weights_scaling_and_clipping(name):
    params = make_params(torch.bfloat16)
    optimizer = getattr(fused_opt, name)(params, master_weights=True, max_grad_norm=CLIP,
                                         **FULL_STATE_OPTIONS[name])
    scaler = new_scaler("fused")
    _train(optimizer, params, scaler, 1, seed=0)
    generator = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = (random_grad(p.float(), generator) * scaler.get_scale()).to(p.dtype)
    with _RecordFusedOps() as recorder:
        scaler.step(optimizer)
    ops = [op.__name__ for op, _, _ in recorder.calls]
    assert ops == ["grad_norm_.default", f"{name.lower().removesuffix('w')}_.default"]
    for op, args, kwargs in recorder.calls:
        results = torch.library.opcheck(op, args, kwargs)
        assert all(outcome == "SUCCESS" for outcome in results.values()), (op, results)


@pytest.mark.parametrize("name", NAMES)
def test_opcheck_of_one_call_for_two_groups_of_mixed_dtypes_with_masters(name):
    """bf16 params with masters and fp32 params (their own masters), in two groups, the second
    with a tensor lr: one op call, which passes torch's op checks."""
    bf16, fp32 = make_params(torch.bfloat16), make_params(torch.float32, seed=3)
    params = bf16 + fp32
    # The first group mixes the two dtypes.
    split = len(bf16) + 1
    groups = [{"params": params[:split]}, {"params": params[split:], "lr": torch.tensor(1e-3)}]
    optimizer = getattr(fused_opt, name)(groups, master_weights=True, **FULL_STATE_OPTIONS[name])
    generator = torch.Generator().manual_seed(4)
    for _ in range(2):
        for p in params:
            p.grad = random_grad(p, generator)
        with _RecordFusedOps() as recorder:
            optimizer.step()
    assert len(recorder.calls) == 1, recorder.calls
    op, args, kwargs = recorder.calls[0]
    assert kwargs["group_sizes"] == [split, len(params) - split]
    assert len(args[-1]) == len(bf16)  # master_params: the bf16 params' only
    results = torch.library.opcheck(op, args, kwargs)
    assert all(outcome == "SUCCESS" for outcome in results.values()), results


def test_fused_scaler_with_a_torch_optimizer_is_torchs_scaler():
    results = []
    for scaler_cls in (fused_opt.GradScaler, torch.amp.GradScaler):
        params = make_params(torch.float32)
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        scaler = scaler_cls("cpu", init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
        scaler.scale(torch.ones(()))
        generator = torch.Generator().manual_seed(9)
        for index in range(STEPS):
            grads = [random_grad(p, generator) for p in params]
            for p, g in zip(params, scaled_grads(grads, scaler.get_scale(), BAD_STEPS.get(index))):
                p.grad = g
            scaler.step(optimizer)
            scaler.update()
        results.append((_snapshot(optimizer, params), scaler.get_scale(), scaler.state_dict()))
    (fused_state, fused_scale, fused_dict), (torch_state, torch_scale, torch_dict) = results
    _assert_bits_equal(fused_state, torch_state, "fused_opt.GradScaler with torch.optim.AdamW")
    assert fused_scale == torch_scale and fused_dict == torch_dict
