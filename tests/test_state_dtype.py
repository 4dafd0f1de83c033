"""state_dtype=torch.bfloat16: states stored in bfloat16 beside float32 params and masters.

The float64 references of every optimizer step with their states rounded to bfloat16 after each
step, which is what a kernel that reads bfloat16 states, updates them in float32 and stores their
rounding does, up to float32's own roundings.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fused_opt
from optim_helpers import FULL_STATE_OPTIONS, NAMES
from reference import REFERENCES

# Odd sizes, an empty tensor, and one that crosses the kernels' 32K-element chunks and the CPU's
# parallel grain.
SHAPES = ((7, 3), (0,), (33, 1001), (5,))
STEPS = 5


def bf16_rounded(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).to(torch.float64).numpy()


def make_params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
            for shape in SHAPES]


def grads_of(params, step):
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]


def state_keys(state):
    return [key for key in state if key != "step"]


def run_reference(name, params, steps, options):
    """Float64 params and states after `steps` steps, the states rounded to bfloat16 after
    every step."""
    ref_params = [p.detach().double().numpy().copy() for p in params]
    ref_states = [{} for _ in params]
    for step in range(steps):
        for ref_p, ref_state, grad in zip(ref_params, ref_states, grads_of(params, step)):
            REFERENCES[name](ref_p, grad.double().numpy(), ref_state, **options)
            for key in state_keys(ref_state):
                ref_state[key] = bf16_rounded(ref_state[key])
    return ref_params, ref_states


def reference_options(name):
    options = dict(FULL_STATE_OPTIONS[name])
    if name == "Adagrad":
        # The reference starts the sum at zero on its first step, torch's Adagrad at this value.
        options.pop("initial_accumulator_value")
    return options


def assert_param_close(actual: torch.Tensor, expected: np.ndarray, lr: float, what: str) -> None:
    # A state one bfloat16 step off (see assert_state_close) moves that element's update by
    # about as much relative to it: a few steps' updates times 2**-7 bounds every element, and
    # the elements that no rounding separated agree to float32 precision, so a wrong update of
    # all of them shows in the mean.
    error = np.abs(actual.detach().double().numpy() - expected)
    assert error.max(initial=0.0) <= 2**-6 * lr * STEPS, what
    assert error.mean() <= 1e-6 if error.size else True, what


def assert_state_close(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    # The kernel rounds a float32 result, the reference a float64 one: where the two fall on
    # either side of a bfloat16 rounding boundary they differ by one bfloat16 step (2**-8
    # relative), which later steps carry on.
    assert actual.dtype == torch.bfloat16, what
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=2**-6, atol=1e-6,
                               err_msg=what)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_states_follow_the_reference(name, kernels):
    params = make_params()
    options = reference_options(name)
    optimizer = getattr(fused_opt, name)(params, **options, state_dtype=torch.bfloat16)
    for step in range(STEPS):
        for p, grad in zip(params, grads_of(params, step)):
            p.grad = grad
        optimizer.step()
    ref_params, ref_states = run_reference(name, make_params(), STEPS, options)
    for index, (p, ref_p, ref_state) in enumerate(zip(params, ref_params, ref_states)):
        state = optimizer.state[p]
        assert set(state_keys(ref_state)) <= set(state), f"param {index}"
        for key in state_keys(ref_state):
            assert_state_close(state[key], ref_state[key], f"{name} param {index} {key}")
        assert p.dtype == torch.float32
        assert_param_close(p, ref_p, options["lr"], f"{name} param {index}")


@pytest.mark.parametrize("name", NAMES)
def test_masters_take_bfloat16_states(name, kernels):
    # bfloat16 params with float32 masters: the master follows the float64 reference, the
    # param is its rounding, the states are bfloat16.
    params = make_params(torch.bfloat16)
    options = reference_options(name)
    optimizer = getattr(fused_opt, name)(params, **options, master_weights=True,
                                         state_dtype=torch.bfloat16)
    for step in range(STEPS):
        for p, grad in zip(params, grads_of(params, step)):
            p.grad = grad
        optimizer.step()
    ref_params, ref_states = run_reference(name, make_params(torch.bfloat16), STEPS, options)
    for index, (p, ref_p, ref_state) in enumerate(zip(params, ref_params, ref_states)):
        state = optimizer.state[p]
        master = state["master_param"]
        assert master.dtype == torch.float32
        assert_param_close(master, ref_p, options["lr"], f"{name} master {index}")
        assert torch.equal(p.detach(), master.to(torch.bfloat16)), f"{name} param {index}"
        for key in state_keys(ref_state):
            assert_state_close(state[key], ref_state[key], f"{name} param {index} {key}")


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_states_halve_the_state_memory(name):
    def state_bytes(state_dtype):
        params = make_params()
        optimizer = getattr(fused_opt, name)(params, **reference_options(name),
                                             state_dtype=state_dtype)
        for p, grad in zip(params, grads_of(params, 0)):
            p.grad = grad
        optimizer.step()
        return sum(value.nbytes for state in optimizer.state.values()
                   for key, value in state.items() if key != "step")

    assert state_bytes(torch.bfloat16) * 2 == state_bytes(None) > 0


def trained(name, steps, state_dtype=torch.bfloat16):
    params = make_params()
    optimizer = getattr(fused_opt, name)(params, **reference_options(name), state_dtype=state_dtype)
    for step in range(steps):
        for p, grad in zip(params, grads_of(params, step)):
            p.grad = grad
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_resumes_bit_for_bit(name):
    params, optimizer = trained(name, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    # The optimizer's own default, which a group loaded without it takes.
    assert "state_dtype" not in saved["param_groups"][0]
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = getattr(fused_opt, name)(resumed_params, **reference_options(name),
                                       state_dtype=torch.bfloat16)
    resumed.load_state_dict(saved)
    for step in range(2, 4):
        for ps in (params, resumed_params):
            for p, grad in zip(ps, grads_of(ps, step)):
                p.grad = grad
        optimizer.step()
        resumed.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        for key in state_keys(optimizer.state[p]):
            assert resumed.state[q][key].dtype == torch.bfloat16
            assert torch.equal(optimizer.state[p][key], resumed.state[q][key]), key


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_interchange_with_torch_optim(name):
    params, optimizer = trained(name, 2)
    # Into torch.optim: its loading gives the states the param's dtype, exactly.
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_optimizer = getattr(torch.optim, name)(torch_params, **reference_options(name))
    torch_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for p, q in zip(params, torch_params):
        for key in state_keys(optimizer.state[p]):
            if key in torch_optimizer.state[q]:
                loaded = torch_optimizer.state[q][key]
                assert loaded.dtype == torch.float32
                assert torch.equal(loaded, optimizer.state[p][key].float()), key
    # From torch.optim: float32 states, stored as their bfloat16 rounding.
    for p, grad in zip(torch_params, grads_of(torch_params, 2)):
        p.grad = grad
    torch_optimizer.step()
    fused_params = [torch.nn.Parameter(p.detach().clone()) for p in torch_params]
    fused = getattr(fused_opt, name)(fused_params, **reference_options(name),
                                     state_dtype=torch.bfloat16)
    fused.load_state_dict(copy.deepcopy(torch_optimizer.state_dict()))
    for p, q in zip(torch_params, fused_params):
        for key, value in torch_optimizer.state[p].items():
            if key == "step" or not torch.is_tensor(value):
                continue
            assert torch.equal(fused.state[q][key], value.to(torch.bfloat16)), key


def test_a_group_saves_a_state_dtype_other_than_the_default():
    optimizer = fused_opt.AdamW(make_params()[:2])
    optimizer.add_param_group({"params": make_params()[2:], "state_dtype": torch.bfloat16})
    groups = optimizer.state_dict()["param_groups"]
    assert "state_dtype" not in groups[0] and groups[1]["state_dtype"] == torch.bfloat16
    loaded = fused_opt.AdamW(make_params()[:2], state_dtype=torch.bfloat16)
    loaded.add_param_group({"params": make_params()[2:]})
    loaded.load_state_dict(optimizer.state_dict())
    # As for master_weights: a group saved without it takes the loading optimizer's default.
    assert [group["state_dtype"] for group in loaded.param_groups] == [torch.bfloat16] * 2


def test_a_changed_state_dtype_casts_the_states_at_the_next_step():
    params, optimizer = trained("AdamW", 2, state_dtype=None)
    before = {key: optimizer.state[params[0]][key].clone() for key in ("exp_avg", "exp_avg_sq")}
    optimizer.param_groups[0]["state_dtype"] = torch.bfloat16
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = optimizer.state[params[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    # With a zero grad the moments only decay: from the cast values.
    expected = (before["exp_avg"].to(torch.bfloat16).float() * 0.9).to(torch.bfloat16)
    assert torch.equal(state["exp_avg"], expected)


@pytest.mark.parametrize("value", ["bfloat16", torch.float16, torch.int8, 16])
def test_an_unknown_state_dtype_is_refused(value):
    with pytest.raises(ValueError, match="Invalid state_dtype value"):
        fused_opt.AdamW(make_params(), state_dtype=value)
    optimizer = fused_opt.AdamW(make_params())
    optimizer.param_groups[0]["state_dtype"] = value
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['state_dtype'\]"):
        optimizer.step()
    assert not optimizer.state


@pytest.mark.parametrize("dtype, options, message", [
    (torch.float64, {"state_dtype": torch.bfloat16}, "keeps its states in torch.float64"),
    (torch.float16, {"state_dtype": torch.bfloat16}, "keeps its states in torch.float16"),
    (torch.bfloat16, {"state_dtype": torch.float32}, "master_weights=True"),
])
def test_a_state_dtype_a_param_cannot_take_is_refused_before_any_change(dtype, options, message):
    good = torch.nn.Parameter(torch.randn(3))
    bad = torch.nn.Parameter(torch.randn(4).to(dtype))
    optimizer = fused_opt.Adam([good, bad], **options)
    for p in (good, bad):
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in (good, bad)]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]") as error:
        optimizer.step()
    assert message in str(error.value)
    assert not optimizer.state
    assert all(torch.equal(p, q) for p, q in zip((good, bad), before))
