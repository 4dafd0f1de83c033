"""param_rounding="kahan": bfloat16 params without master weights, rounded to nearest, with what
the rounding dropped kept in a bfloat16 compensation buffer per param.

The kernels' bits are checked against a NumPy implementation of the compensated store
(reference/rounding.py) where the float32 value is exactly computable (SGD with lr 1: one
subtraction); every optimizer's every step against the same optimizer's float32 step on
param + compensation with the states widened, stored back as the compensated pair; the
accumulation of updates too small for bfloat16 that is the point of it; the CPU and emulated
CUDA kernels alike; checkpoints both ways with torch.optim; and writes to a param between steps.
Skipped steps and the errors are tested with stochastic rounding's (test_param_rounding.py), and
the op's errors in test_bad_input.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fused_opt
import simt
from devices import requires_simt
from optim_helpers import FULL_STATE_OPTIONS, NAMES, make_params, resume_midway, set_grads
from reference import rounding

# Odd sizes, an empty tensor, and one that crosses the CUDA kernels' 32K-element chunks and the
# CPU's parallel grain.
SHAPES = ((7, 3), (0,), (33, 1001), (5,))
STEPS = 4
KEY = "kahan_compensation"


def new_params(dtype=torch.bfloat16):
    return make_params(SHAPES, dtype)


def bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().view(torch.int16).numpy().view(np.uint16).copy()


def test_sgd_steps_equal_the_reference_bit_for_bit(kernels):
    # lr 1 and no momentum: the float32 value is (param + compensation) - grad, which float32
    # computes exactly rounded, as NumPy does.
    params = new_params()
    stored = [(bits(p), np.zeros(p.numel(), np.uint16).reshape(p.shape)) for p in params]
    optimizer = fused_opt.SGD(params, lr=1.0, param_rounding="kahan")
    for step in range(STEPS):
        set_grads(params, step)
        optimizer.step()
        for index, p in enumerate(params):
            param_bits, compensation_bits = stored[index]
            value = (rounding.bfloat16_values(param_bits)
                     + rounding.bfloat16_values(compensation_bits))
            value = value - p.grad.float().numpy()
            stored[index] = rounding.kahan_store(value)
            np.testing.assert_array_equal(bits(p), stored[index][0],
                                          err_msg=f"step {step + 1} param {index}")
            np.testing.assert_array_equal(bits(optimizer.state[p][KEY]), stored[index][1],
                                          err_msg=f"step {step + 1} compensation {index}")
    # Most compensations hold something: the updates are not multiples of the params' ulps.
    assert np.count_nonzero(stored[2][1]) > stored[2][1].size // 2


def float32_twin(name, options, kahan, params):
    """A float32 optimizer whose params are the Kahan optimizer's param + compensation and whose
    states are its states, widened: its step computes the float32 values that the Kahan step
    stores as pairs."""
    wide = [torch.nn.Parameter(p.detach().float() + kahan.state[p][KEY].float()) for p in params]
    twin = getattr(fused_opt, name)(wide, **options)
    for p, q in zip(params, wide):
        twin.state[q] = {
            key: value.float() if key != "step" else value.clone()
            for key, value in kahan.state[p].items() if key != KEY
        }
    return twin, wide


@pytest.mark.parametrize("name", NAMES)
def test_every_step_is_the_float32_step_of_param_plus_compensation(name, kernels):
    options = FULL_STATE_OPTIONS[name]
    params = new_params()
    kahan = getattr(fused_opt, name)(params, **options, param_rounding="kahan")
    set_grads(params, 0)
    kahan.step()
    for step in range(1, STEPS + 1):
        twin, wide = float32_twin(name, options, kahan, params)
        set_grads(params, step)
        for p, q in zip(params, wide):
            q.grad = p.grad.float()
        kahan.step()
        twin.step()
        for index, (p, q) in enumerate(zip(params, wide)):
            where = f"{name} step {step + 1} param {index}"
            param_bits, compensation_bits = rounding.kahan_store(q.detach().numpy())
            np.testing.assert_array_equal(bits(p), param_bits, err_msg=where)
            state, twin_state = kahan.state[p], twin.state[q]
            np.testing.assert_array_equal(bits(state[KEY]), compensation_bits, err_msg=where)
            assert state.keys() - {KEY} == twin_state.keys(), where
            for key, value in twin_state.items():
                expected = value if key == "step" else value.to(torch.bfloat16)
                assert state[key].dtype == expected.dtype, f"{where} {key}"
                assert torch.equal(state[key], expected), f"{where} {key}"


@pytest.mark.parametrize("clip", [None, 0.5], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("name", NAMES)
def test_the_first_step_equals_the_nearest_twin(name, clip, kernels):
    # The compensation starts at zero, so the first step computes and stores what rounding to
    # nearest does, and keeps the remainder besides. Clipping (the grads' norm is far above 0.5)
    # scales the gradients in registers in both.
    options = dict(FULL_STATE_OPTIONS[name], max_grad_norm=clip)
    runs = {}
    for mode in ("nearest", "kahan"):
        params = new_params()
        optimizer = getattr(fused_opt, name)(params, **options, param_rounding=mode)
        set_grads(params, 0)
        optimizer.step()
        runs[mode] = (params, optimizer)
    (near_params, near), (kahan_params, kahan) = runs["nearest"], runs["kahan"]
    if clip is not None:
        assert kahan.last_grad_norm.item() > 10 * clip
    for index, (p_near, p_kahan) in enumerate(zip(near_params, kahan_params)):
        assert torch.equal(p_near, p_kahan), f"{name} param {index}"
        state_near, state_kahan = near.state[p_near], kahan.state[p_kahan]
        assert state_kahan.keys() == state_near.keys() | {KEY}
        for key in state_near:
            assert torch.equal(state_near[key], state_kahan[key]), f"{name} param {index} {key}"
        compensation = state_kahan[KEY]
        assert compensation.dtype == torch.bfloat16 and compensation.shape == p_kahan.shape
        # At most half the param's ulp (2**-8 of its magnitude, relative).
        limit = p_kahan.detach().double().abs() * 2.0**-8
        assert bool((compensation.double().abs() <= limit).all()), f"{name} param {index}"


def test_updates_below_half_an_ulp_accumulate(kernels):
    # 1.0 - 1e-4 per step: rounding to nearest drops every update (bfloat16's gap below 1.0 is
    # 2**-8); the compensation collects them. Each store rounds the compensation, which stays
    # below 2**-9, to its own ulp (at most 2**-16), so the pair is off the float64 sum by at most
    # half of that per step.
    steps, lr = 100, 1e-4
    results = {}
    for mode in ("nearest", "kahan"):
        param = torch.nn.Parameter(torch.ones(1_003, dtype=torch.bfloat16))
        optimizer = fused_opt.SGD([param], lr=lr, param_rounding=mode)
        for _ in range(steps):
            param.grad = torch.ones_like(param)
            optimizer.step()
        results[mode] = (param, optimizer)
    param, _ = results["nearest"]
    assert bool((param == 1.0).all())
    param, optimizer = results["kahan"]
    value = param.detach().double() + optimizer.state[param][KEY].double()
    exact = 1.0 - steps * lr
    assert float((value - exact).abs().max()) <= steps * 2.0**-17
    # The params themselves moved: to the bfloat16 nearest to 0.99 or the one above it.
    assert bool((param.double() < 1.0).all())


@requires_simt
def test_cpu_and_emulated_cuda_kernels_agree_on_every_grid():
    def final_state():
        params = new_params()
        optimizer = fused_opt.Adam(params, **FULL_STATE_OPTIONS["Adam"], param_rounding="kahan")
        for step in range(STEPS):
            set_grads(params, step)
            optimizer.step()
        return [(p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
                for p in params]

    on_cpu = final_state()
    for schedule in range(len(simt.SCHEDULES)):
        with simt.emulated(schedule):
            emulated = final_state()
        for index, ((p_cpu, s_cpu), (p_emu, s_emu)) in enumerate(zip(on_cpu, emulated)):
            where = f"schedule {schedule} param {index}"
            assert torch.equal(p_cpu, p_emu), where
            assert s_cpu.keys() == s_emu.keys(), where
            for key in s_cpu:
                assert torch.equal(s_cpu[key], s_emu[key]), f"{where} {key}"


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_resume_bit_for_bit_and_interchange_with_torch(name):
    options = dict(FULL_STATE_OPTIONS[name], param_rounding="kahan")
    (straight, run_straight), (resumed, second), saved = resume_midway(
        name, options, new_params, set_grads, STEPS, 2)
    assert saved["param_groups"][0]["param_rounding"] == "kahan"
    assert all(state[KEY].dtype == torch.bfloat16 for state in saved["state"].values())
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(bits(a), bits(b))
        np.testing.assert_array_equal(bits(run_straight.state[a][KEY]),
                                      bits(second.state[b][KEY]))
    # torch.optim takes the checkpoint (it ignores the compensation) and steps on from it ...
    twin_params = new_params()
    twin = getattr(torch.optim, name)(twin_params, **FULL_STATE_OPTIONS[name])
    twin.load_state_dict(saved)
    set_grads(twin_params, 2)
    twin.step()
    # A checkpoint of torch.optim's own (which rounds to nearest and keeps no compensation)
    # loads as a nearest-rounding group; switched to Kahan, its params start with a zero
    # compensation, so the first step equals the nearest-rounding one's.
    torch_params = new_params()
    torch_run = getattr(torch.optim, name)(torch_params, **FULL_STATE_OPTIONS[name])
    set_grads(torch_params, 2)
    torch_run.step()
    from_torch = torch_run.state_dict()
    loaded = {}
    for mode in ("nearest", "kahan"):
        params = new_params()
        optimizer = getattr(fused_opt, name)(params, **FULL_STATE_OPTIONS[name])
        optimizer.load_state_dict(copy.deepcopy(from_torch))
        optimizer.param_groups[0]["param_rounding"] = mode
        set_grads(params, 3)
        optimizer.step()
        loaded[mode] = (params, optimizer)
    for p_near, p_kahan in zip(loaded["nearest"][0], loaded["kahan"][0]):
        assert torch.equal(p_near, p_kahan)
        assert KEY not in loaded["nearest"][1].state[p_near]
        assert loaded["kahan"][1].state[p_kahan][KEY].shape == p_kahan.shape


def test_a_checkpoint_loads_a_compensation_only_into_kahan_groups_and_refuses_a_bad_one():
    params = new_params()
    optimizer = fused_opt.AdamW(params, lr=1e-2, param_rounding="kahan")
    set_grads(params, 0)
    optimizer.step()
    saved = optimizer.state_dict()
    nearest = fused_opt.AdamW(new_params(), lr=1e-2)
    nearest_saved = copy.deepcopy(saved)
    del nearest_saved["param_groups"][0]["param_rounding"]
    nearest.load_state_dict(nearest_saved)
    assert all(KEY not in state for state in nearest.state.values())
    bad = copy.deepcopy(saved)
    bad["state"][2][KEY] = torch.zeros(3, dtype=torch.bfloat16)
    target = fused_opt.AdamW(new_params(), lr=1e-2, param_rounding="kahan")
    with pytest.raises(ValueError, match=r"state\[2\]\['kahan_compensation'\].*shape"):
        target.load_state_dict(bad)
    assert not target.state


def test_a_param_written_between_steps_drops_its_compensation(kernels):
    # A pruning mask, say: the write is kept exactly, not offset by the compensation of the
    # value it replaced. The first steps leave a plan, which the write must also set aside.
    params = new_params()
    optimizer = fused_opt.SGD(params, lr=1.0, param_rounding="kahan")
    for step in range(2):
        set_grads(params, step)
        optimizer.step()
    assert bool((optimizer.state[params[2]][KEY] != 0).any())
    with torch.no_grad():
        params[2].zero_()
    set_grads(params, 2)
    optimizer.step()
    param_bits, compensation_bits = rounding.kahan_store(-params[2].grad.float().numpy())
    np.testing.assert_array_equal(bits(params[2]), param_bits)
    np.testing.assert_array_equal(bits(optimizer.state[params[2]][KEY]), compensation_bits)


def test_a_call_mixing_masters_and_compensations_steps_each_group_as_alone(kernels):
    # A master-weight group and a Kahan group of one optimizer share an op call (and on CUDA
    # that call takes separate launches for the two kinds); each group must step as it does
    # in an optimizer of its own.
    options = FULL_STATE_OPTIONS["Adam"]
    mixed_params = [new_params(), new_params()]
    mixed = fused_opt.Adam([{"params": mixed_params[0], "master_weights": True},
                            {"params": mixed_params[1], "param_rounding": "kahan"}], **options)
    alone_params = [new_params(), new_params()]
    alone = [fused_opt.Adam(alone_params[0], **options, master_weights=True),
             fused_opt.Adam(alone_params[1], **options, param_rounding="kahan")]
    for step in range(STEPS):
        for params in (*mixed_params, *alone_params):
            set_grads(params, step)
        mixed.step()
        for optimizer in alone:
            optimizer.step()
    for group, (params, own_params, own) in enumerate(zip(mixed_params, alone_params, alone)):
        for index, (p, q) in enumerate(zip(params, own_params)):
            where = f"group {group} param {index}"
            assert torch.equal(p, q), where
            assert mixed.state[p].keys() == own.state[q].keys(), where
            for key, value in own.state[q].items():
                assert torch.equal(mixed.state[p][key], value), f"{where} {key}"
    assert "master_param" in mixed.state[mixed_params[0][0]]
    assert KEY in mixed.state[mixed_params[1][0]]
    # The premise: both groups went in one op call.
    assert [bucket.group_sizes for _, bucket in mixed._step_plan.calls] == [[4, 4]]
