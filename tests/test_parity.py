"""Numerical parity of fused_opt with the float64 NumPy references and with torch.optim.

Every run steps three copies of the same initial params with the same grads: fused_opt,
torch.optim's for-loop (``foreach=False``) in the same dtype, and the float64 reference on the
upcast params and upcast grads (the 16-bit grads fused_opt actually received, not the float64
draws they came from). After every step the params and every state tensor, ``step`` included,
must match both within ``tolerance(dtype)`` (its atol scaled by the magnitude of the values, see
``magnitude``), and the state keys, dtypes and shapes must be torch's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import fused_opt
from config import tolerance
from optim_helpers import as_torch_state
from reference import REFERENCES

STEPS = 10
# Large enough that ten steps move every param far beyond the fp32 tolerance, so a wrong update
# cannot hide in rounding noise.
LR = {"Adam": 1e-2, "AdamW": 1e-2, "SGD": 1e-1, "RMSprop": 1e-2, "Adagrad": 1e-1}
WEIGHT_DECAY = 0.1
BOOLS = (False, True)

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]

# One element, odd sizes that leave vector-loop remainders, a tensor that crosses the 64 Ki
# chunk size, and an empty tensor last (the element walk must not index past the final offset).
# Together they exceed two 32 Ki-element grains, so the CPU kernel already splits this list over
# two threads, and the split falls inside the 65537-element tensor.
GRID_SHAPES = [(1,), (1031,), (3, 7, 5), (65537,), (0,)]
# The dedicated threaded case: a thread boundary inside a large tensor with tensors on both sides.
LARGE_SHAPES = [(1,), (1031,), (300_000,), (3, 7, 5), (65537,), (0,)]
SMALL_SHAPES = [(1,), (1031,), (3, 7, 5), (0,)]


def option_grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the given option values, as keyword dicts."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def sgd_options_are_valid(options: dict[str, Any]) -> bool:
    # torch.optim.SGD rejects Nesterov without momentum or with dampening.
    return not options["nesterov"] or (options["momentum"] > 0 and options["dampening"] == 0)


OPTIONS = {
    "Adam": option_grid(
        amsgrad=BOOLS,
        maximize=BOOLS,
        weight_decay=(0.0, WEIGHT_DECAY),
        decoupled_weight_decay=BOOLS,
    ),
    "AdamW": option_grid(amsgrad=BOOLS, maximize=BOOLS, weight_decay=(0.0, WEIGHT_DECAY)),
    "SGD": [
        options
        for options in option_grid(
            momentum=(0.0, 0.9),
            dampening=(0.0, 0.3),
            nesterov=BOOLS,
            weight_decay=(0.0, WEIGHT_DECAY),
            maximize=BOOLS,
        )
        if sgd_options_are_valid(options)
    ],
    "RMSprop": option_grid(
        centered=BOOLS,
        momentum=(0.0, 0.9),
        weight_decay=(0.0, WEIGHT_DECAY),
        maximize=BOOLS,
        alpha=(0.99, 0.9),
    ),
    "Adagrad": option_grid(
        lr_decay=(0.0, 0.1),
        weight_decay=(0.0, WEIGHT_DECAY),
        initial_accumulator_value=(0.0, 0.5),
        maximize=BOOLS,
    ),
}

# Every option of each optimizer switched on at once, for the cases that cannot afford the grid.
RICH_OPTIONS = {
    "Adam": {"amsgrad": True, "maximize": True, "weight_decay": WEIGHT_DECAY},
    "AdamW": {"amsgrad": True, "weight_decay": WEIGHT_DECAY},
    "SGD": {"momentum": 0.9, "dampening": 0.3, "weight_decay": WEIGHT_DECAY, "maximize": True},
    "RMSprop": {"centered": True, "momentum": 0.9, "weight_decay": WEIGHT_DECAY, "alpha": 0.9},
    "Adagrad": {"lr_decay": 0.1, "weight_decay": WEIGHT_DECAY, "initial_accumulator_value": 0.5},
}

NAMES = list(OPTIONS)


def options_id(options: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in options.items()) or "defaults"


GRID_CASES = [
    pytest.param(name, options, id=f"{name}-{options_id(options)}")
    for name, option_list in OPTIONS.items()
    for options in option_list
]


# ------------------------------------------------------------------------------------------------
# Helpers


def as_float64(t: Tensor | np.ndarray) -> Tensor:
    """A float64 copy in logical element order; complex values as (real, imag) pairs."""
    if isinstance(t, np.ndarray):
        return torch.from_numpy(t)
    t = t.detach().cpu()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.double()


def assert_close(
    actual: Tensor, expected: Tensor | np.ndarray, dtype: torch.dtype, what: str, scale: float = 1.0
) -> None:
    """Elementwise |actual - expected| <= atol * scale + rtol * |expected|, per tolerance(dtype)."""
    actual, expected = as_float64(actual), as_float64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tol = tolerance(dtype)
    # isclose is false for NaN, so a NaN on either side fails.
    close = torch.isclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)
    if not bool(close.all()):
        first = tuple((~close).nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int((~close).sum())} of {close.numel()} elements differ beyond {tol} "
            f"(atol scaled by {scale:.3g}); first at {first}: got {actual[first].item()!r}, "
            f"expected {expected[first].item()!r}; "
            f"max abs diff {(actual - expected).abs().max().item():.3g}"
        )


def magnitude(tensors: Sequence[Tensor]) -> float:
    """The scale for atol: the largest |value| among tensors of one kind, at least 1.

    An entry that is a difference of large terms carries the rounding error of those terms, not
    of its own size: RMSprop's momentum buffer adds terms near 1 / sqrt(1 - alpha) = 10 that can
    cancel to about zero. Every param of a group runs the same recursion on like data, so the
    largest value of a kind over the group bounds the terms of each of its entries, a one-element
    tensor's included.
    """
    return max([1.0, *(as_float64(t).abs().max().item() for t in tensors if t.numel())])


def _like(t: Tensor, values: Tensor) -> Tensor:
    """values (float64, t's shape) as t's dtype and memory layout; complex: real, imag pairs."""
    if t.is_complex():
        values = torch.view_as_complex(values)
    return torch.empty_like(t, memory_format=torch.preserve_format).copy_(values)


def _real_shape(t: Tensor) -> tuple[int, ...]:
    return (*t.shape, 2) if t.is_complex() else tuple(t.shape)


def random_grad(t: Tensor, generator: torch.Generator) -> Tensor:
    """A grad for t: random signs, magnitudes in [0.5, 1.5].

    Bounded away from zero because 16-bit states underflow for small grads (Adam's exp_avg_sq is
    about 1e-3 * grad**2, below fp16's normal range once |grad| < 0.25): the update then divides
    by a flushed denominator in torch and fused_opt alike, and neither can match the reference.
    """
    shape = _real_shape(t)
    size = 0.5 + torch.rand(shape, generator=generator, dtype=torch.float64)
    sign = torch.randint(0, 2, shape, generator=generator, dtype=torch.float64) * 2 - 1
    return _like(t, sign * size)


def random_params(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        t = torch.empty(shape, dtype=dtype)
        values = torch.randn(_real_shape(t), generator=generator, dtype=torch.float64)
        params.append(_like(t, values))
    return params


class ParityRun:
    """One optimizer configuration stepped by fused_opt, torch.optim and the reference in lockstep.

    ``groups`` is a list of (initial params, group options) pairs, whose params and tensor
    options move to ``device`` for fused_opt and torch; ``defaults`` go to the
    constructors as keywords (torch.optim.Adagrad reads ``initial_accumulator_value`` from there
    only, never from a param group). The reference's options live in ``ref_options``, one dict
    per group with a float lr, so a test can follow a hyperparameter change there.
    """

    def __init__(
        self,
        name: str,
        groups: Sequence[tuple[Sequence[Tensor], dict[str, Any]]],
        device: str = "cpu",
        **defaults: Any,
    ):
        self.name = name
        self.device = device
        groups = [(init, on_device(options, device)) for init, options in groups]
        defaults = on_device(defaults, device)
        self.fused_params = [[self._placed(t) for t in init] for init, _ in groups]
        self.torch_params = [[self._placed(t) for t in init] for init, _ in groups]
        self.ref_params = [[as_float64(t).numpy().copy() for t in init] for init, _ in groups]
        self.ref_states: list[list[dict[str, Any]]] = [[{} for _ in init] for init, _ in groups]
        self.ref_options = []
        for _, options in groups:
            merged = {**defaults, **options}
            self.ref_options.append({**merged, "lr": float(merged["lr"])})
        self.fused = getattr(fused_opt, name)(
            [{"params": ps, **options} for ps, (_, options) in zip(self.fused_params, groups)],
            **defaults,
        )
        self.torch = getattr(torch.optim, name)(
            [
                {"params": ps, **clone_tensor_values(options)}
                for ps, (_, options) in zip(self.torch_params, groups)
            ],
            foreach=False,
            **clone_tensor_values(defaults),
        )

    def _placed(self, t: Tensor) -> torch.nn.Parameter:
        """A copy of t on the run's device, in t's memory layout."""
        return torch.nn.Parameter(torch.empty_like(t, device=self.device).copy_(t))

    def step(self, grads: Sequence[Sequence[Tensor | None]]) -> None:
        """One step with the given grads (None: the param has no grad this step)."""
        for group_index, group_grads in enumerate(grads):
            for index, grad in enumerate(group_grads):
                fused_p = self.fused_params[group_index][index]
                torch_p = self.torch_params[group_index][index]
                fused_p.grad = None if grad is None else grad.to(self.device, copy=True)
                torch_p.grad = None if grad is None else grad.to(self.device, copy=True)
                if grad is not None:
                    REFERENCES[self.name](
                        self.ref_params[group_index][index],
                        as_float64(grad).numpy(),
                        self.ref_states[group_index][index],
                        **self.ref_options[group_index],
                    )
        self.fused.step()
        self.torch.step()

    def random_step(self, generator: torch.Generator) -> None:
        self.step([[random_grad(p, generator) for p in ps] for ps in self.fused_params])

    def check(self, when: str) -> None:
        for group_index, (fused_ps, torch_ps, ref_ps, ref_states) in enumerate(
            zip(self.fused_params, self.torch_params, self.ref_params, self.ref_states)
        ):
            # .get: indexing the defaultdict would create the entry under test.
            fused_states = [self.fused.state.get(p, {}) for p in fused_ps]
            torch_states = [self.torch.state.get(p, {}) for p in torch_ps]
            keys = {key for state in torch_states for key in state if key != "step"}
            scales = {key: magnitude([s[key] for s in torch_states if key in s]) for key in keys}
            param_scale = magnitude(torch_ps)
            for fused_p, torch_p, ref_p, fused_state, torch_state, ref_state in zip(
                fused_ps, torch_ps, ref_ps, fused_states, torch_states, ref_states
            ):
                dtype = fused_p.dtype
                where = f"{when}, group {group_index}, param {tuple(fused_p.shape)} {dtype}"
                assert_close(fused_p, torch_p, dtype, f"param vs torch, {where}", param_scale)
                assert_close(fused_p, ref_p, dtype, f"param vs reference, {where}", param_scale)
                fused_state = as_torch_state(self.name, fused_state)
                assert set(fused_state) == set(torch_state), f"state keys, {where}"
                # The reference creates Adagrad's state on the first step, torch in __init__.
                if ref_state:
                    assert set(fused_state) == set(ref_state), f"reference state keys, {where}"
                for key, torch_value in torch_state.items():
                    what = f"state[{key!r}], {where}"
                    fused_value, ref_value = fused_state[key], ref_state.get(key)
                    # Same dtype, shape and device as torch's, so state dicts load across the two;
                    # step counters stay beside the param, where torch's CUDA for-loop keeps
                    # them on the CPU.
                    assert fused_value.dtype == torch_value.dtype, what
                    assert fused_value.shape == torch_value.shape, what
                    expected_device = fused_p.device if key == "step" else torch_value.device
                    assert fused_value.device == expected_device, what
                    if key == "step":
                        assert fused_value.item() == torch_value.item(), what
                        if ref_value is not None:
                            assert fused_value.item() == ref_value, what
                        continue
                    assert_close(fused_value, torch_value, dtype, f"{what} vs torch", scales[key])
                    if ref_value is not None:
                        assert_close(
                            fused_value, ref_value, dtype, f"{what} vs reference", scales[key]
                        )


def single_group_run(
    name: str, params: Sequence[Tensor], device: str = "cpu", **options: Any
) -> ParityRun:
    return ParityRun(name, [(params, {})], device, **options)


def map_tensor_values(options: dict[str, Any], fn: Any) -> dict[str, Any]:
    """options with fn applied to every tensor value, those inside tuples (betas) included."""

    def apply(value: Any) -> Any:
        if torch.is_tensor(value):
            return fn(value)
        if isinstance(value, tuple):
            return tuple(apply(v) for v in value)
        return value

    return {k: apply(v) for k, v in options.items()}


def clone_tensor_values(options: dict[str, Any]) -> dict[str, Any]:
    """torch's optimizer must not share a tensor hyperparameter (lr, betas) with fused_opt's."""
    return map_tensor_values(options, torch.clone)


def on_device(options: dict[str, Any], device: str) -> dict[str, Any]:
    """Tensor hyperparameters (lr, betas) live on the params' device."""
    return map_tensor_values(options, lambda t: t.to(device))


def run_and_check(run: ParityRun, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, STEPS + 1):
        run.random_step(generator)
        run.check(f"after step {step}")


# ------------------------------------------------------------------------------------------------
# Every option combination, every dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, options", GRID_CASES)
def test_option_grid(name, options, dtype, device):
    run = single_group_run(
        name, random_params(GRID_SHAPES, dtype, seed=1), device, lr=LR[name], **options
    )
    run_and_check(run, seed=2)


@pytest.fixture
def two_threads():
    """At least two intra-op threads, so the kernel splits the work even on a one-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, previous))
    yield
    torch.set_num_threads(previous)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
@pytest.mark.parametrize("name", NAMES)
def test_large_tensor_split_across_threads(name, dtype, device):
    params = random_params(LARGE_SHAPES, dtype, seed=3)
    run = single_group_run(name, params, device, lr=LR[name], **RICH_OPTIONS[name])
    run_and_check(run, seed=4)


# ------------------------------------------------------------------------------------------------
# Complex params


COMPLEX_CASES = [
    pytest.param(name, options, id=f"{name}-{options_id(options)}")
    for name, options in [
        *((name, {}) for name in NAMES),
        *RICH_OPTIONS.items(),
        ("SGD", {"momentum": 0.9, "nesterov": True}),
        ("Adam", {"weight_decay": WEIGHT_DECAY, "decoupled_weight_decay": True}),
        ("RMSprop", {"momentum": 0.9, "maximize": True}),
    ]
]


@pytest.mark.parametrize("name, options", COMPLEX_CASES)
def test_complex_params(name, options, device):
    # torch.optim updates a complex param as its (real, imag) pairs of reals, so the reference
    # runs on the view_as_real of the same values.
    initial = random_params(SMALL_SHAPES, torch.complex64, seed=5)
    run = single_group_run(name, initial, device, lr=LR[name], **options)
    run_and_check(run, seed=6)


# ------------------------------------------------------------------------------------------------
# Param groups and mixed dtypes


# Each group differs from the other in lr and in at least two further hyperparameters, so any
# group's values leaking into another's tensors shows up.
GROUP_OPTIONS = {
    "Adam": [
        {"lr": 1e-2, "weight_decay": WEIGHT_DECAY},
        {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.05, "amsgrad": True,
         "decoupled_weight_decay": True, "maximize": True},
    ],
    "AdamW": [
        {"lr": 1e-2, "weight_decay": WEIGHT_DECAY},
        {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.5, "amsgrad": True, "eps": 1e-6},
    ],
    "SGD": [
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.5, "dampening": 0.3, "weight_decay": WEIGHT_DECAY},
        {"lr": 0.02, "weight_decay": 0.01, "maximize": True},
    ],
    "RMSprop": [
        {"lr": 1e-2, "centered": True},
        {"lr": 3e-3, "alpha": 0.9, "momentum": 0.9, "weight_decay": WEIGHT_DECAY},
    ],
    "Adagrad": [
        {"lr": 0.1, "lr_decay": 0.1},
        {"lr": 0.05, "weight_decay": WEIGHT_DECAY, "eps": 1e-6},
    ],
}
# torch.optim.Adagrad fills every group's sum from its constructor argument only.
GROUP_DEFAULTS = {"Adagrad": {"initial_accumulator_value": 0.5}}


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_mixed_dtypes(name, device):
    groups = []
    for index, options in enumerate(GROUP_OPTIONS[name]):
        # fp32 and bf16 in every group: one op call walks both dtypes.
        fp32 = random_params([(1031,), (1,)], torch.float32, seed=10 + index)
        bf16 = random_params([(3, 7, 5), (257,)], torch.bfloat16, seed=20 + index)
        groups.append(([fp32[0], bf16[0], fp32[1], bf16[1]], options))
    run = ParityRun(name, groups, device, **GROUP_DEFAULTS.get(name, {}))
    run_and_check(run, seed=7)


# Groups that share every mode go in one op call (one launch on CUDA), each with its own
# hyperparameters: a float lr beside a tensor lr, weight decay on beside off, other betas, eps,
# momentum and decay rates.
ONE_CALL_GROUPS = {
    "Adam": [
        {"lr": 1e-2, "weight_decay": WEIGHT_DECAY},
        {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.0, "eps": 1e-6},
        {"lr": torch.tensor(5e-3), "betas": (0.85, 0.995), "weight_decay": 0.05},
    ],
    "AdamW": [
        {"lr": 1e-2, "weight_decay": WEIGHT_DECAY},
        {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.0},
        {"lr": torch.tensor(5e-3), "weight_decay": 0.5, "eps": 1e-6},
    ],
    "SGD": [
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.5, "dampening": 0.3, "weight_decay": WEIGHT_DECAY},
        {"lr": torch.tensor(0.02), "momentum": 0.7},
    ],
    "RMSprop": [
        {"lr": 1e-2},
        {"lr": 3e-3, "alpha": 0.9, "weight_decay": WEIGHT_DECAY},
        {"lr": torch.tensor(5e-3), "eps": 1e-6},
    ],
    "Adagrad": [
        {"lr": 0.1, "lr_decay": 0.1},
        {"lr": 0.05, "weight_decay": WEIGHT_DECAY, "eps": 1e-6},
        {"lr": torch.tensor(0.02)},
    ],
}


@pytest.mark.parametrize("name", NAMES)
def test_groups_in_one_call_keep_their_own_hyperparameters(name, device):
    groups = []
    for index, options in enumerate(ONE_CALL_GROUPS[name]):
        fp32 = random_params([(1031,), (0,), (65537,)], torch.float32, seed=40 + index)
        bf16 = random_params([(3, 7, 5)], torch.bfloat16, seed=50 + index)
        groups.append(([fp32[0], bf16[0], fp32[1], fp32[2]], options))
    run = ParityRun(name, groups, device, **GROUP_DEFAULTS.get(name, {}))
    run_and_check(run, seed=8)


# ------------------------------------------------------------------------------------------------
# Params without grads


NO_GRAD_CASES = [pytest.param(name, RICH_OPTIONS[name], id=name) for name in NAMES] + [
    # Plain SGD keeps no state, and torch gives its params no (empty) state entries either.
    pytest.param("SGD", {"momentum": 0.0}, id="SGD-no-momentum"),
]

# Param 0 always has a grad, param 1 never, param 2 only in some steps: its first grad arrives
# after the others have stepped (SGD must seed its momentum buffer then, Adam must bias-correct
# with its own step count), and it sits out a step in between.
INTERMITTENT_STEPS = {3, 4, 5, 7, 8}


@pytest.mark.parametrize("name, options", NO_GRAD_CASES)
def test_params_without_grads(name, options, device):
    initial = random_params([(1031,), (3, 7, 5), (65,)], torch.float32, seed=8)
    run = single_group_run(name, initial, device, lr=LR[name], **options)
    always, never, sometimes = run.fused_params[0]
    generator = torch.Generator().manual_seed(9)
    for step in range(1, STEPS + 1):
        grads = [
            random_grad(always, generator),
            None,
            random_grad(sometimes, generator) if step in INTERMITTENT_STEPS else None,
        ]
        before = sometimes.detach().clone()
        run.step([grads])
        run.check(f"after step {step}")
        if grads[2] is None:
            assert torch.equal(sometimes, before), f"a param without grad moved in step {step}"
    assert torch.equal(never.cpu(), initial[1]), "a param that never had a grad moved"
    if name == "Adagrad":
        # torch.optim.Adagrad creates every state in its constructor; it must stay at step 0.
        assert run.fused.state[never]["step"].item() == 0
    else:
        assert never not in run.fused.state, "state was created for a param that never had a grad"
    if "step" in run.fused.state.get(always, {}):
        assert run.fused.state[sometimes]["step"].item() == len(INTERMITTENT_STEPS)
    has_state = [p in run.fused.state for p in run.fused_params[0]]
    torch_has_state = [p in run.torch.state for p in run.torch_params[0]]
    assert has_state == torch_has_state, "params with a state entry differ from torch's"


# ------------------------------------------------------------------------------------------------
# Tensor learning rate


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[1]])
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_changed_in_place(name, dtype, device):
    # In the params' dtype: torch computes its step size in the lr tensor's dtype, so a float32
    # lr would cost the fp64 run its precision in torch.
    lr = torch.tensor(LR[name], dtype=dtype)
    params = random_params(SMALL_SHAPES, dtype, seed=11)
    run = single_group_run(name, params, device, lr=lr, **RICH_OPTIONS[name])
    group_lr = run.fused.param_groups[0]["lr"]
    assert torch.is_tensor(group_lr)
    generator = torch.Generator().manual_seed(12)
    for step in range(1, STEPS + 1):
        if step == STEPS // 2 + 1:
            # The way a scheduler updates a tensor lr: in place, so the kernel must read the
            # tensor at every step rather than a value captured earlier.
            for optimizer in (run.fused, run.torch):
                optimizer.param_groups[0]["lr"].mul_(5)
            run.ref_options[0]["lr"] = group_lr.item()
        run.random_step(generator)
        run.check(f"after step {step}")
    assert run.fused.param_groups[0]["lr"] is group_lr, "the lr tensor was replaced"


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_tensor_betas_changed_in_place(name, device):
    # The kernel reads tensor betas itself (on CUDA: on the device, with no sync), so a change in
    # place between steps must take effect, in the bias corrections as in the moments.
    betas = (torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.99, dtype=torch.float64))
    params = random_params(SMALL_SHAPES, torch.float64, seed=15)
    run = single_group_run(name, params, device, lr=LR[name], betas=betas, amsgrad=True)
    run.ref_options[0]["betas"] = (0.8, 0.99)
    generator = torch.Generator().manual_seed(16)
    for step in range(1, STEPS + 1):
        if step == STEPS // 2 + 1:
            for optimizer in (run.fused, run.torch):
                beta1, beta2 = optimizer.param_groups[0]["betas"]
                beta1.fill_(0.7)
                beta2.fill_(0.95)
            run.ref_options[0]["betas"] = (0.7, 0.95)
        run.random_step(generator)
        run.check(f"after step {step}")


# ------------------------------------------------------------------------------------------------
# Dense but non-contiguous params


def transposed() -> list[Tensor]:
    return [t.t() for t in random_params([(5, 7), (1, 9)], torch.float32, seed=13)]


def channels_last() -> list[Tensor]:
    params = random_params([(2, 3, 4, 5), (3, 1, 2, 2)], torch.float32, seed=14)
    return [t.contiguous(memory_format=torch.channels_last) for t in params]


LAYOUTS = {"transposed": transposed, "channels_last": channels_last}


@pytest.mark.parametrize("grad_layout", ["like_param", "contiguous"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_dense_params(name, layout, grad_layout, device):
    run = single_group_run(name, LAYOUTS[layout](), device, lr=LR[name], **RICH_OPTIONS[name])
    strides = [p.stride() for p in run.fused_params[0]]
    assert not run.fused_params[0][0].is_contiguous()
    generator = torch.Generator().manual_seed(15)
    for step in range(1, STEPS + 1):
        # Autograd gives grads the param's layout; a grad assigned by hand may not have it.
        grads = [random_grad(p, generator) for p in run.fused_params[0]]
        if grad_layout == "contiguous":
            grads = [g.contiguous() for g in grads]
        run.step([grads])
        run.check(f"after step {step}")
    assert [p.stride() for p in run.fused_params[0]] == strides


# ------------------------------------------------------------------------------------------------
# The comparisons above are tight enough to catch wrong math


# A hyperparameter the reference gets slightly wrong while fused_opt and torch get the right one:
# each stands for a kernel bug of that size (an lr or a beta off by 1%, a weight decay ignored or
# applied the other way, a momentum or an accumulator off, ...), and the fp32 comparison of the
# same run must flag it.
WRONG_REFERENCE_OPTIONS = [
    ("Adam", {"lr": LR["Adam"] * 1.01}),
    ("Adam", {"weight_decay": 0.0}),
    ("Adam", {"betas": (0.9, 0.998)}),
    ("Adam", {"betas": (0.89, 0.999)}),
    ("Adam", {"maximize": False}),
    ("Adam", {"decoupled_weight_decay": True}),
    ("AdamW", {"weight_decay": WEIGHT_DECAY * 1.1}),
    ("SGD", {"lr": LR["SGD"] * 1.01}),
    ("SGD", {"dampening": 0.0}),
    ("SGD", {"momentum": 0.89}),
    ("SGD", {"weight_decay": 0.0}),
    ("RMSprop", {"alpha": 0.91}),
    ("RMSprop", {"momentum": 0.85}),
    ("RMSprop", {"weight_decay": 0.0}),
    ("RMSprop", {"eps": 1e-4}),
    ("Adagrad", {"lr_decay": 0.0}),
    ("Adagrad", {"initial_accumulator_value": 0.4}),
]


@pytest.mark.parametrize(
    "name, wrong",
    [
        pytest.param(name, wrong, id=f"{name}-{options_id(wrong)}")
        for name, wrong in WRONG_REFERENCE_OPTIONS
    ],
)
def test_comparison_detects_wrong_hyperparameter(name, wrong):
    params = random_params(SMALL_SHAPES, torch.float32, seed=16)
    run = single_group_run(name, params, lr=LR[name], **RICH_OPTIONS[name])
    run.ref_options[0].update(wrong)
    with pytest.raises(AssertionError, match="vs reference"):
        run_and_check(run, seed=17)


# ------------------------------------------------------------------------------------------------
# Decay rates near one and at zero

NEAR_ONE_STEPS = 20
# Rates whose float32 rounding is a large part of 1 - rate: a kernel that takes 1 - rate in float32
# from the rounded rate makes the moment it weighs 1.7e-4 (0.9999) to 19% (0.9999999) too large.
NEAR_ONE_CASES = [
    pytest.param(name, options, id=f"{name}-{options_id(options)}")
    for name, options in [
        ("Adam", {"betas": (0.9, 0.9999)}),
        ("Adam", {"betas": (0.99999, 0.99999), "amsgrad": True}),
        ("Adam", {"betas": (0.9, 0.9999999), "weight_decay": WEIGHT_DECAY}),
        ("AdamW", {"betas": (0.9999, 0.999999), "weight_decay": WEIGHT_DECAY}),
        ("RMSprop", {"alpha": 0.9999}),
        ("RMSprop", {"alpha": 0.9999999, "centered": True, "momentum": 0.9}),
    ]
]


@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[1]])
@pytest.mark.parametrize("name, options", NEAR_ONE_CASES)
def test_decay_rates_near_one(name, options, dtype, device):
    run = single_group_run(
        name, random_params(SMALL_SHAPES, dtype, seed=18), device, lr=LR[name], **options
    )
    generator = torch.Generator().manual_seed(19)
    for step in range(1, NEAR_ONE_STEPS + 1):
        run.random_step(generator)
        run.check(f"after step {step}")


def _shrinking_grads(t: Tensor, step: int) -> Tensor:
    """A grad of 1 then one a million times smaller, alternating in sign: a running average that
    weighs the new grad fully must hold the small one exactly, with nothing left of the large."""
    return torch.full_like(t, (-1.0) ** step * 10.0 ** (-6 * (step % 2)))


# Weight 1 on the new grad: Adam's beta1 = 0, centered RMSprop's alpha = 0 (its grad_avg).
WEIGHT_ONE_CASES = [
    pytest.param("Adam", {"betas": (0.0, 0.999)}, "exp_avg", id="Adam-beta1=0"),
    pytest.param("AdamW", {"betas": (0.0, 0.999)}, "exp_avg", id="AdamW-beta1=0"),
    pytest.param("RMSprop", {"alpha": 0.0, "centered": True}, "grad_avg", id="RMSprop-alpha=0"),
]


@pytest.mark.parametrize("master_weights", [False, True], ids=["own", "master"])
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
@pytest.mark.parametrize("name, options, key", WEIGHT_ONE_CASES)
def test_average_that_weighs_the_new_grad_fully_is_the_grad(
    name, options, key, dtype, master_weights, device
):
    params = [
        torch.nn.Parameter(t.to(device))
        for t in random_params([(1031,), (3, 7, 5)], dtype, seed=20)
    ]
    fused = getattr(fused_opt, name)(
        params, lr=LR[name], master_weights=master_weights, **options
    )
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = getattr(torch.optim, name)(torch_params, lr=LR[name], foreach=False, **options)
    for step in range(6):
        for p, q in zip(params, torch_params):
            p.grad = _shrinking_grads(p, step)
            q.grad = p.grad.clone()
        fused.step()
        reference.step()
        for p, q in zip(params, torch_params):
            average = fused.state[p][key]
            assert torch.equal(average, p.grad.to(average.dtype)), f"{key} after step {step}"
            assert torch.equal(reference.state[q][key], q.grad), f"torch's {key}, step {step}"


# ------------------------------------------------------------------------------------------------
# Params re-laid in place during training

RELAID_SHAPES = [(2, 3, 4, 5), (3, 1, 2, 2), (7,)]
RELAY_BEFORE_STEP = 4


def _to_channels_last(params: Sequence[Tensor]) -> None:
    """What ``model.to(memory_format=torch.channels_last)`` does to a model's 4-d params: the
    same Parameters, their data re-laid."""
    for p in params:
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", NAMES)
def test_params_relaid_in_place_train_like_torch(name, device):
    run = single_group_run(
        name, random_params(RELAID_SHAPES, torch.float32, seed=21), device, lr=LR[name],
        **RICH_OPTIONS[name],
    )
    generator = torch.Generator().manual_seed(22)
    for step in range(1, STEPS + 1):
        if step == RELAY_BEFORE_STEP:
            _to_channels_last(run.fused_params[0])
            _to_channels_last(run.torch_params[0])
        run.random_step(generator)
        run.check(f"after step {step}")
    for p in run.fused_params[0]:
        for key, value in run.fused.state[p].items():
            if key != "step":
                assert value.stride() == p.stride(), f"state[{key!r}] of {tuple(p.shape)}"


@pytest.mark.parametrize("name", NAMES)
def test_params_relaid_in_place_under_master_weights_change_no_value(name, device):
    # The element math does not depend on the layout: the re-laid run equals, bit for bit, one
    # that kept its layout, masters and 16-bit params alike.
    initial = random_params(RELAID_SHAPES, torch.bfloat16, seed=23)
    runs = []
    for relay in (True, False):
        params = [torch.nn.Parameter(t.to(device, copy=True)) for t in initial]
        optimizer = getattr(fused_opt, name)(
            params, lr=LR[name], master_weights=True, **RICH_OPTIONS[name]
        )
        generator = torch.Generator().manual_seed(24)
        for step in range(1, STEPS + 1):
            if relay and step == RELAY_BEFORE_STEP:
                _to_channels_last(params)
            for p in params:
                p.grad = random_grad(p, generator)
            optimizer.step()
        runs.append((params, optimizer))
    (relaid, relaid_opt), (kept, kept_opt) = runs
    for p, q in zip(relaid, kept):
        assert torch.equal(p, q), f"param {tuple(p.shape)}"
        assert relaid_opt.state[p].keys() == kept_opt.state[q].keys()
        for key, value in relaid_opt.state[p].items():
            assert torch.equal(value, kept_opt.state[q][key]), f"state[{key!r}]"
            if key != "step":
                assert value.stride() == p.stride(), f"state[{key!r}] of {tuple(p.shape)}"


# ------------------------------------------------------------------------------------------------
# Hyperparameters changed by a schedule


def test_nesterov_group_whose_momentum_reaches_zero_steps_like_torch(device):
    # A momentum schedule that reaches 0 for a while: torch.optim.SGD then takes plain steps and
    # leaves the buffer as it was, to take it up again when the momentum comes back.
    params = random_params(SMALL_SHAPES, torch.float32, seed=25)
    run = single_group_run("SGD", params, device, lr=LR["SGD"], momentum=0.9, nesterov=True)
    generator = torch.Generator().manual_seed(26)
    for step in range(1, STEPS + 1):
        momentum = 0.0 if 4 <= step <= 6 else 0.9
        for optimizer in (run.fused, run.torch):
            optimizer.param_groups[0]["momentum"] = momentum
        # The reference, like torch's constructor, has no Nesterov without momentum.
        run.ref_options[0].update(momentum=momentum, nesterov=momentum != 0)
        run.random_step(generator)
        run.check(f"after step {step}")
