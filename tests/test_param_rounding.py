"""param_rounding="stochastic": bfloat16 params without master weights round stochastically.

The kernels' bits are checked against a NumPy implementation of the rounding and its counter-based
random bits (reference/rounding.py) where the float32 value before rounding is exactly
computable (SGD with lr 1: one subtraction), on the CPU kernels and on the CUDA kernels emulated
on the CPU; every optimizer's one step against its round-to-nearest twin; the unbiasedness that
is the point of it; reproducibility across runs, thread counts and checkpoints; and, for
param_rounding="kahan" too (test_kahan.py has the rest of it), skipped steps and the errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fused_opt
import simt
from devices import requires_simt
from optim_helpers import FULL_STATE_OPTIONS, NAMES, resume_midway
from reference import rounding

# Odd sizes, an empty tensor, and one that crosses the CUDA kernels' 32K-element chunks and the
# CPU's parallel grain, so that element indices continue across chunks and threads.
SHAPES = ((7, 3), (0,), (33, 1001), (5,))
STEPS = 4
SEED = 1234


def make_params(dtype=torch.bfloat16, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype))
            for shape in SHAPES]


def set_grads(params, step, scale=1.0):
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator) * scale).to(p.device, p.dtype)


def run(params, name, steps, **options):
    optimizer = getattr(fused_opt, name)(params, **options)
    for step in range(steps):
        set_grads(params, step)
        optimizer.step()
    return optimizer


def bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().view(torch.int16).numpy().view(np.uint16)


def test_sgd_steps_equal_the_reference_bit_for_bit(device):
    # lr 1 and no momentum: each param's float32 value before rounding is float32(p) - float32(g),
    # one exact-rounded subtraction, which NumPy computes alike.
    params = make_params(device=device)
    expected = [p.detach().cpu().float().numpy().copy() for p in params]
    optimizer = fused_opt.SGD(params, lr=1.0, param_rounding="stochastic", rounding_seed=SEED)
    for step in range(STEPS):
        set_grads(params, step)
        for index, (p, value) in enumerate(zip(params, expected)):
            exact = (value - p.grad.cpu().float().numpy()).ravel()
            key = rounding.step_key(rounding.tensor_key(SEED, index), step + 1)
            rounded = rounding.round_bfloat16_stochastic(
                exact, rounding.random_bits(key, exact.size))
            expected[index] = (rounded.astype(np.uint32) << 16).view(np.float32).reshape(p.shape)
        optimizer.step()
        for index, (p, value) in enumerate(zip(params, expected)):
            assert p.dtype == torch.bfloat16
            np.testing.assert_array_equal(
                bits(p), bits(torch.from_numpy(value).to(torch.bfloat16)),
                err_msg=f"{device} step {step + 1} param {index}")
    for p in params:
        assert optimizer.state[p]["step"].item() == STEPS


@pytest.mark.parametrize("clip", [None, 0.5], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("name", NAMES)
def test_one_step_rounds_to_a_neighbour_of_the_nearest_twin(name, clip, kernels):
    # Both runs compute the same float32 values and states; only the param's rounding differs:
    # every element is the float32 value's bfloat16 below or above, so it equals the nearest
    # twin's or sits one bfloat16 gap from it, and both directions occur. Clipping (the grads'
    # norm is far above 0.5) scales the gradients in registers before either rounding.
    options = dict(FULL_STATE_OPTIONS[name], max_grad_norm=clip)
    nearest = run(make_params(), name, 1, **options)
    stochastic = run(make_params(), name, 1, **options, param_rounding="stochastic",
                     rounding_seed=SEED)
    if clip is not None:
        assert stochastic.last_grad_norm.item() > 10 * clip
    moved_up = moved_down = 0
    for index, (p_near, p_sr) in enumerate(zip(nearest.param_groups[0]["params"],
                                               stochastic.param_groups[0]["params"])):
        state_near, state_sr = nearest.state[p_near], stochastic.state[p_sr]
        assert state_near.keys() == state_sr.keys()
        for key in state_near:
            assert torch.equal(state_near[key], state_sr[key]), f"{name} param {index} {key}"
        near = p_near.detach().double()
        sr = p_sr.detach().double()
        gap = torch.where(near == 0, torch.zeros_like(near), near.abs() * 2.0**-7)
        assert bool(((sr - near).abs() <= gap).all()), f"{name} param {index}"
        moved_up += int((sr > near).sum())
        moved_down += int((sr < near).sum())
    assert moved_up > 0 and moved_down > 0, name


def test_updates_below_half_an_ulp_still_move_the_params_on_average(kernels):
    # 1.0 - 1e-4 per step: rounding to nearest drops every update (bfloat16's gap below 1.0 is
    # 2**-8), stochastic rounding keeps their sum on average.
    steps, lr = 100, 1e-4
    results = {}
    for mode in ("nearest", "stochastic"):
        param = torch.nn.Parameter(torch.ones(100_003, dtype=torch.bfloat16))
        optimizer = fused_opt.SGD([param], lr=lr, param_rounding=mode, rounding_seed=SEED)
        for _ in range(steps):
            param.grad = torch.ones_like(param)
            optimizer.step()
        results[mode] = param.detach().double()
    assert bool((results["nearest"] == 1.0).all())
    # Unbiased: the mean is 1 - steps * lr up to its statistical error (each element's final
    # value has a standard deviation below 2**-8 * sqrt(steps) / 2, so the mean's is below 7e-5).
    assert abs(results["stochastic"].mean().item() - (1.0 - steps * lr)) < 5e-4
    assert results["stochastic"].unique().numel() > 1


def test_rounding_is_reproducible_and_independent_of_thread_count():
    def final_bits(seed, threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            params = make_params()
            run(params, "AdamW", STEPS, lr=1e-2, param_rounding="stochastic", rounding_seed=seed)
        finally:
            torch.set_num_threads(previous)
        return [bits(p) for p in params]

    one_thread = final_bits(SEED, 1)
    for a, b in zip(one_thread, final_bits(SEED, 2)):
        np.testing.assert_array_equal(a, b)
    other_seed = final_bits(SEED + 1, 1)
    assert any(not np.array_equal(a, b) for a, b in zip(one_thread, other_seed))


@requires_simt
def test_cpu_and_emulated_cuda_kernels_round_alike_on_every_grid():
    def final_bits():
        params = make_params()
        run(params, "Adam", STEPS, lr=1e-2, param_rounding="stochastic", rounding_seed=SEED)
        return [bits(p) for p in params]

    on_cpu = final_bits()
    for schedule in range(len(simt.SCHEDULES)):
        with simt.emulated(schedule):
            emulated = final_bits()
        for index, (a, b) in enumerate(zip(on_cpu, emulated)):
            np.testing.assert_array_equal(a, b, err_msg=f"schedule {schedule} param {index}")


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_resumes_bit_for_bit(name):
    options = dict(FULL_STATE_OPTIONS[name], param_rounding="stochastic", rounding_seed=SEED)
    if name == "SGD":
        options["momentum"] = 0.0  # the counter exists for the rounding alone
    (straight, _), (resumed, _), saved = resume_midway(name, options, make_params, set_grads,
                                                       STEPS, 2)
    assert saved["param_groups"][0]["param_rounding"] == "stochastic"
    assert saved["param_groups"][0]["rounding_seed"] == SEED
    assert all(state["step"].item() == 2 for state in saved["state"].values())
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(bits(a), bits(b))
    # torch.optim takes the checkpoint (it ignores the rounding keys) and steps on from it.
    twin_params = make_params()
    twin = getattr(torch.optim, name)(twin_params, **FULL_STATE_OPTIONS[name])
    twin.load_state_dict(saved)
    set_grads(twin_params, 2)
    twin.step()


def test_nearest_groups_save_no_rounding_keys_and_torch_checkpoints_load_as_nearest():
    params = make_params()
    optimizer = run(params, "SGD", 1, lr=0.1)
    group = optimizer.state_dict()["param_groups"][0]
    assert "param_rounding" not in group and "rounding_seed" not in group
    assert optimizer.state_dict()["state"] == {}
    reference = torch.optim.AdamW(make_params(), lr=0.1)
    loaded = fused_opt.AdamW(make_params(), lr=0.1, param_rounding="stochastic")
    loaded.load_state_dict(reference.state_dict())
    assert loaded.param_groups[0]["param_rounding"] == "nearest"


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_a_skipped_step_changes_nothing(mode, kernels):
    # Plain SGD's state is the step counter (stochastic) or the compensation (Kahan) alone.
    params = make_params()
    optimizer = run(params, "SGD", 1, lr=0.1, param_rounding=mode, rounding_seed=SEED)
    before = [(p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
              for p in params]
    assert all(state for _, state in before)
    scaler = fused_opt.GradScaler("cpu", init_scale=2.0**8)
    loss = sum((p.float() * p.float()).sum() for p in params)
    scaler.scale(loss).backward()
    params[0].grad.view(-1)[0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert bool(optimizer.last_step_skipped)
    for p, (value, state) in zip(params, before):
        assert torch.equal(p.detach(), value)
        assert optimizer.state[p].keys() == state.keys()
        for key, tensor in state.items():
            assert torch.equal(optimizer.state[p][key], tensor), key


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_bad_configurations_are_refused_naming_the_param_or_option(mode):
    with pytest.raises(ValueError, match="param_rounding"):
        fused_opt.AdamW(make_params(), param_rounding="up")
    with pytest.raises(ValueError, match="rounding_seed"):
        fused_opt.AdamW(make_params(), param_rounding=mode, rounding_seed=-1)
    with pytest.raises(ValueError, match=f"'{mode}' together with master_weights=True"):
        fused_opt.AdamW(make_params(), param_rounding=mode, master_weights=True)
    params = make_params(torch.float16)
    optimizer = fused_opt.AdamW(params, param_rounding=mode)
    set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError,
                       match=rf"param_groups\[0\]\['params'\]\[0\].*float16.*'{mode}'"):
        optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert not optimizer.state
    group_with_masters = fused_opt.AdamW(make_params(), master_weights=True)
    group_with_masters.param_groups[0]["param_rounding"] = mode
    set_grads(group_with_masters.param_groups[0]["params"], 0)
    with pytest.raises(ValueError, match="master_weights"):
        group_with_masters.step()


def test_the_op_refuses_stochastic_rounding_without_counters_with_masters_or_float16():
    param = torch.randn(8).to(torch.bfloat16)
    grad = torch.randn(8).to(torch.bfloat16)
    common = dict(group_sizes=[1], lr=[0.1], momentum=[0.0], dampening=[0.0],
                  weight_decay=[0.0], nesterov=False, maximize=False, l1_decay=[0.0],
                  l1_proximal=[False], stochastic_rounding_seed=[SEED], lr_tensor=[None])
    before = param.clone()
    with pytest.raises(RuntimeError, match="steps must be given exactly when momentum != 0 or"):
        torch.ops.fused_opt.sgd_([param], [grad], [], [], [], **common)
    assert torch.equal(param, before)
    master = param.float()
    step = torch.zeros((), dtype=torch.float32)
    with pytest.raises(RuntimeError, match="stochastic rounding rounds params that have no"):
        torch.ops.fused_opt.sgd_([param], [grad], [], [step], [master], **common,
                                 workspace=torch.zeros(1, dtype=torch.int32))
    assert torch.equal(param, before) and step.item() == 0
    half = param.to(torch.float16)
    with pytest.raises(RuntimeError, match=r"params\[0\] is float16, which stochastic rounding"):
        torch.ops.fused_opt.sgd_([half], [grad.to(torch.float16)], [], [step], [], **common,
                                 workspace=torch.zeros(1, dtype=torch.int32))
    assert step.item() == 0
