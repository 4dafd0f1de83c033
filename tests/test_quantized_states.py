"""state_dtype=torch.uint8: blockwise 8-bit states (csrc/include/fused_opt/math/quantize.h).

The codec of fused_opt/_quantize.py (state creation, checkpoints) is checked bit for bit against
the format's NumPy definition (reference/quantize.py), ties included; the kernels' encoding
against the same reference through SGD's first buffer (the grad itself); and every optimizer's
every step against its float32 step on the decoded states, encoded again: params, codes and block
maxima bit for bit. Then checkpoints both ways with torch.optim, and the errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fused_opt
import simt
from devices import requires_simt
from fused_opt import _quantize
from optim_helpers import FULL_STATE_OPTIONS, NAMES, make_params, set_grads
from reference import quantize as reference

# A param below the 8-bit threshold (float32 states), an empty one, whole blocks, a partial last
# block, and one that crosses the CPU's parallel grain.
SHAPES = ((7, 3), (0,), (64, 64), (5, 1001), (70001,))
STEPS = 4


def quantized(p: torch.Tensor) -> bool:
    return p.numel() >= _quantize.MIN_NUMEL


def raw_bits(t: torch.Tensor) -> np.ndarray:
    """Bits, so that NaNs compare equal to themselves."""
    t = t.detach().contiguous()
    return t.view(torch.uint8).numpy().copy() if t.dtype == torch.uint8 else (
        t.view(torch.int32 if t.element_size() == 4 else torch.int16).numpy().copy()
    )


def codec_values(signed: bool) -> np.ndarray:
    """Magnitudes over many orders, exact ties between neighbouring codes, both signs and the
    block maximum at the largest code's value, so that the scaled values are these exactly."""
    gen = np.random.default_rng(3)
    top = reference.max_value(signed)
    codes = reference.code_values(signed)
    ties = (codes[1:-1] + codes[2:]) / 2
    spread = top * 10.0 ** gen.uniform(-12, 0, 4000)
    # The flush threshold, 17/16 of the smallest nonzero code's exponent, and its neighbours.
    flush = 2.0 ** -reference._FORMATS[signed][1] * 17 / 16
    edges = [0.0, top * 1e-30, flush, np.nextafter(np.float32(flush), np.float32(1)),
             np.nextafter(np.float32(flush), np.float32(0))]
    values = np.concatenate([[top], ties, codes, spread, edges]).astype(np.float32)
    if signed:
        values = values * gen.choice([-1.0, 1.0], values.size).astype(np.float32)
        values[0] = top
    return values


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codec_matches_the_reference(signed):
    values = codec_values(signed)
    gen = np.random.default_rng(4)
    # Blocks whose maximum is not a code's value scale their elements first.
    scaled_blocks = (gen.standard_normal(5 * 256 + 17) * 1e-3).astype(np.float32)
    if not signed:
        scaled_blocks = np.abs(scaled_blocks)
    for data in (values, scaled_blocks):
        packed = _quantize.quantize(torch.from_numpy(data), signed)
        expected = reference.quantize(data, signed)
        np.testing.assert_array_equal(packed.numpy(), expected)
        decoded = _quantize.dequantize(packed, data.size, signed).numpy()
        np.testing.assert_allclose(
            decoded, reference.dequantize(expected, data.size, signed), rtol=3e-7, atol=0
        )
    # Every code and nearest tie lands on its code: the round trip of the code values is exact.
    top_block = values[: 1 + len(reference.code_values(signed))]
    np.testing.assert_array_equal(
        _quantize.dequantize(_quantize.quantize(torch.from_numpy(top_block), signed),
                             top_block.size, signed).numpy()[: top_block.size],
        reference.dequantize(reference.quantize(top_block, signed), top_block.size, signed),
    )


def test_kernels_encode_as_the_reference():
    # SGD's first buffer is the grad itself: the kernel's bytes are the grad's quantization.
    params = make_params(SHAPES)
    optimizer = fused_opt.SGD(params, lr=0.1, momentum=0.9, state_dtype=torch.uint8)
    set_grads(params, 0)
    optimizer.step()
    for p in params:
        buffer = optimizer.state[p]["momentum_buffer"]
        if not quantized(p):
            assert buffer.dtype == torch.float32 and buffer.shape == p.shape
            continue
        assert buffer.dtype == torch.uint8
        np.testing.assert_array_equal(
            buffer.numpy(), reference.quantize(p.grad.reshape(-1).numpy(), signed=True)
        )


# Every optimizer with every state it has, but RMSprop's centered mode, which 8-bit states refuse.
OPTIONS = {**FULL_STATE_OPTIONS, "RMSprop": {"lr": 1e-2, "momentum": 0.5, "weight_decay": 1e-2}}
CASES = {
    **{name: OPTIONS[name] for name in NAMES},
    "Adam-plain": {"lr": 1e-2},
    "AdamW-l1-proximal": {"lr": 1e-2, "l1_decay": 1e-3, "l1_mode": "proximal"},
    "SGD-nesterov-maximize": {"lr": 1e-1, "momentum": 0.9, "nesterov": True, "maximize": True},
    "RMSprop-plain": {"lr": 1e-2},
}


def decoded_twin_state(optimizer, p):
    """The param's state with its 8-bit states decoded, as float32 states of its shape. A state
    still in float32 (Adagrad's sums, made at construction) is encoded first, as the step will."""
    state = optimizer.state[p]
    keys = optimizer._state_keys(optimizer.param_groups[0])
    decoded = {}
    for key, value in state.items():
        if torch.is_tensor(value):
            value = value.clone()
            signed = key in optimizer._signed_state_keys
            if value.is_floating_point() and quantized(p) and key in keys:
                value = _quantize.quantize(value.reshape(-1).float(), signed)
            if value.dtype == torch.uint8:
                value = _quantize.dequantize(value, p.numel(), signed).reshape(p.shape)
        decoded[key] = value
    return decoded


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("master", [False, True], ids=["float32", "bfloat16-master"])
def test_each_step_is_the_float32_step_on_decoded_states(case, master):
    name = case.split("-")[0]
    options = CASES[case]
    dtype = torch.bfloat16 if master else torch.float32
    params = make_params(SHAPES, dtype)
    optimizer = getattr(fused_opt, name)(
        params, state_dtype=torch.uint8, master_weights=master, **options
    )
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = getattr(fused_opt, name)(twins, master_weights=master, **options)
    for step in range(STEPS):
        set_grads(params, step)
        for p, q in zip(params, twins):
            q.grad = p.grad.clone()
        # The twin starts the step from the 8-bit states' values, held in float32.
        for p, q in zip(params, twins):
            if optimizer.state.get(p):
                twin.state[q] = decoded_twin_state(optimizer, p)
        optimizer.step()
        twin.step()
        for index, (p, q) in enumerate(zip(params, twins)):
            where = f"{case} step {step + 1} param {index}"
            np.testing.assert_array_equal(raw_bits(p), raw_bits(q), err_msg=where)
            state, twin_state = optimizer.state[p], twin.state[q]
            assert set(state) == set(twin_state), where
            for key, value in state.items():
                expected = twin_state[key]
                if torch.is_tensor(value) and value.dtype == torch.uint8:
                    signed = key in optimizer._signed_state_keys
                    flat = expected.reshape(-1).float()
                    expected = _quantize.quantize(flat, signed)
                elif quantized(p) and key in optimizer._state_keys(optimizer.param_groups[0]):
                    pytest.fail(f"{where}: {key} is {value.dtype}, not 8-bit")
                np.testing.assert_array_equal(raw_bits(value), raw_bits(expected),
                                              err_msg=f"{where} {key}")


def trained(name, state_dtype=torch.uint8, steps=3):
    params = make_params(SHAPES)
    optimizer = getattr(fused_opt, name)(params, state_dtype=state_dtype,
                                         **OPTIONS[name])
    for step in range(steps):
        set_grads(params, step)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_resumes_bit_for_bit(name, tmp_path):
    params, optimizer = trained(name)
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    saved = torch.load(path, weights_only=True)
    assert all(group[_quantize.FORMAT_KEY] == _quantize.FORMAT for group in saved["param_groups"])
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = getattr(fused_opt, name)(copies, state_dtype=torch.uint8,
                                       **OPTIONS[name])
    resumed.load_state_dict(saved)
    assert _quantize.FORMAT_KEY not in resumed.param_groups[0]
    for step in range(3, 5):
        set_grads(params, step)
        set_grads(copies, step)
        optimizer.step()
        resumed.step()
    for p, q in zip(params, copies):
        np.testing.assert_array_equal(raw_bits(p), raw_bits(q))
        for key, value in optimizer.state[p].items():
            # SGD saves no counter (torch.optim's keys): a loaded started buffer counts from 1.
            if not (name == "SGD" and key == "step"):
                np.testing.assert_array_equal(raw_bits(value), raw_bits(resumed.state[q][key]),
                                              err_msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_interchange_with_torch_optim(name):
    params, optimizer = trained(name)
    # To torch.optim: dequantized, in the params' shapes, and the step goes on from there.
    converted = optimizer.torch_state_dict()
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    options = {k: v for k, v in OPTIONS[name].items()}
    torch_optimizer = getattr(torch.optim, name)(torch_params, **options)
    torch_optimizer.load_state_dict(converted)
    for p, q in zip(params, torch_params):
        for key in optimizer._state_keys(optimizer.param_groups[0]):
            value = torch_optimizer.state[q][key]
            assert value.shape == p.shape and value.dtype == torch.float32
            own = optimizer.state[p][key]
            if own.dtype == torch.uint8:
                expected = _quantize.dequantize(own, p.numel(), key in optimizer._signed_state_keys)
                torch.testing.assert_close(value.reshape(-1), expected, rtol=0, atol=0)
    set_grads(torch_params, 3)
    torch_optimizer.step()
    # From torch.optim: quantized on loading, with the bytes its states quantize to.
    back = getattr(fused_opt, name)(params, state_dtype=torch.uint8, **options)
    back.load_state_dict(torch_optimizer.state_dict())
    for p, q in zip(params, torch_params):
        for key in back._state_keys(back.param_groups[0]):
            value = back.state[p][key]
            if not quantized(p):
                assert value.dtype == torch.float32
                continue
            expected = _quantize.quantize(torch_optimizer.state[q][key].reshape(-1).float(),
                                          key in back._signed_state_keys)
            np.testing.assert_array_equal(value.numpy(), expected.numpy(), err_msg=key)
    set_grads(params, 4)
    back.step()


def test_a_quantized_checkpoint_is_not_taken_for_float_states_by_torch_optim():
    params, optimizer = trained("Adam")
    torch_optimizer = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params],
                                       **OPTIONS["Adam"])
    torch_optimizer.load_state_dict(optimizer.state_dict())
    for p in torch_optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    # The flat byte tensors do not have the params' shapes: torch fails instead of stepping on.
    with pytest.raises(RuntimeError):
        torch_optimizer.step()


def test_float_checkpoint_loads_into_8bit_and_back():
    params, float_optimizer = trained("AdamW", state_dtype=None)
    optimizer = fused_opt.AdamW(params, state_dtype=torch.uint8, **OPTIONS["AdamW"])
    optimizer.load_state_dict(float_optimizer.state_dict())
    big = params[-1]
    assert optimizer.state[big]["exp_avg"].dtype == torch.uint8
    # A group switched back to float32 states takes the decoded values on its next step.
    optimizer.param_groups[0]["state_dtype"] = None
    set_grads(params, 3)
    optimizer.step()
    assert optimizer.state[big]["exp_avg"].shape == big.shape


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda sd: sd["param_groups"][0].pop(_quantize.FORMAT_KEY), "names no format"),
        (lambda sd: sd["param_groups"][0].__setitem__(_quantize.FORMAT_KEY, "blockwise4"),
         "names the format 'blockwise4'"),
        (lambda sd: sd["state"][4].__setitem__("exp_avg", sd["state"][4]["exp_avg"][:-4]),
         "bytes"),
    ],
    ids=["no-format", "other-format", "short"],
)
def test_bad_checkpoints_are_refused_before_loading(mutate, message):
    params, optimizer = trained("Adam")
    state_dict = optimizer.state_dict()
    state_dict["state"] = {k: dict(v) for k, v in state_dict["state"].items()}
    state_dict["param_groups"] = [dict(g) for g in state_dict["param_groups"]]
    mutate(state_dict)
    before = {k: v.clone() for k, v in optimizer.state[params[4]].items()}
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(state_dict)
    for key, value in before.items():
        assert torch.equal(optimizer.state[params[4]][key], value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.complex64])
def test_8bit_states_need_float32_params_or_masters(dtype):
    params = make_params(((64, 80),), dtype)
    optimizer = fused_opt.Adam(params, state_dtype=torch.uint8)
    params[0].grad = torch.ones_like(params[0])
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*uint8 states"):
        optimizer.step()
    assert torch.equal(params[0].detach(), before) and not optimizer.state


@requires_simt
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("master", [False, True], ids=["float32", "bfloat16-master"])
def test_cpu_and_emulated_cuda_kernels_agree(case, master, request):
    # Each case on one grid schedule of the emulation (its test id picks it); the float32 Adam
    # case on all of them.
    name = case.split("-")[0]
    dtype = torch.bfloat16 if master else torch.float32

    def final_state():
        params = make_params(SHAPES, dtype)
        optimizer = getattr(fused_opt, name)(params, state_dtype=torch.uint8,
                                             master_weights=master, **CASES[case])
        for step in range(STEPS):
            set_grads(params, step)
            optimizer.step()
        return [(raw_bits(p), {k: raw_bits(v) for k, v in optimizer.state[p].items()})
                for p in params]

    on_cpu = final_state()
    schedules = (range(len(simt.SCHEDULES)) if case == "Adam" and not master
                 else [simt.schedule_of(request.node.nodeid)])
    for schedule in schedules:
        with simt.emulated(schedule):
            emulated = final_state()
        for index, ((p_cpu, s_cpu), (p_emu, s_emu)) in enumerate(zip(on_cpu, emulated)):
            where = f"{case} schedule {schedule} param {index}"
            np.testing.assert_array_equal(p_cpu, p_emu, err_msg=where)
            assert s_cpu.keys() == s_emu.keys(), where
            for key in s_cpu:
                np.testing.assert_array_equal(s_cpu[key], s_emu[key], err_msg=f"{where} {key}")


def adam_op_call(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, param: torch.Tensor):
    from fused_opt import _ops

    _ops.op_namespace.adam_(
        [param], [torch.ones_like(param)], [exp_avg], [exp_avg_sq], [],
        [torch.zeros(())], [], group_sizes=[1], lr=[1e-3], beta1=[0.9], beta2=[0.999],
        weight_decay=[0.0], eps=[1e-8], amsgrad=False, maximize=False,
        decoupled_weight_decay=False, beta1_tensor=[None], beta2_tensor=[None], l1_decay=[0.0],
        l1_proximal=[False], stochastic_rounding_seed=[None], lr_tensor=[None],
        workspace=torch.zeros(1, dtype=torch.int32),
    )


@pytest.mark.parametrize("size, message", [
    (-4, "must be a contiguous 1-D tensor of 4160 bytes"),
    (None, "must be a contiguous 1-D tensor of 4160 bytes"),
])
def test_the_op_refuses_a_quantized_state_of_the_wrong_size(size, message):
    param = torch.randn(4096)
    good = torch.zeros(_quantize.state_bytes(4096), dtype=torch.uint8)
    bad = torch.zeros(4096, dtype=torch.uint8) if size is None else good[:size].clone()
    before = param.clone()
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] is uint8.*" + message):
        adam_op_call(good.clone(), bad, param)
    assert torch.equal(param, before)


def test_centered_rmsprop_refuses_8bit_states_before_any_change():
    # Measured before the refusal: a steady gradient gave NaN params within 140 steps.
    with pytest.raises(ValueError, match=r"param_groups\[0\] has centered=True and state_dtype"):
        fused_opt.RMSprop(make_params(), centered=True, state_dtype=torch.uint8)
    params = make_params(SHAPES)
    optimizer = fused_opt.RMSprop(params, centered=True)
    optimizer.param_groups[0]["state_dtype"] = torch.uint8
    set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"param_groups\[0\] has centered=True"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and not optimizer.state


def test_the_rmsprop_op_refuses_centered_8bit_states():
    from fused_opt import _ops

    param = torch.randn(4096)
    before = param.clone()
    square_avg, grad_avg = (torch.zeros(_quantize.state_bytes(4096), dtype=torch.uint8) for _ in range(2))
    with pytest.raises(RuntimeError, match=r"square_avgs\[0\] is a blockwise 8-bit state \(uint8\), which "
                                           r"centered RMSprop does not take"):
        _ops.op_namespace.rmsprop_(
            [param], [torch.ones_like(param)], [square_avg], [grad_avg], [], [torch.zeros(())], [],
            group_sizes=[1], lr=[1e-2], alpha=[0.99], eps=[1e-8], weight_decay=[0.0], momentum=[0.0],
            centered=True, maximize=False, l1_decay=[0.0], l1_proximal=[False],
            stochastic_rounding_seed=[None], lr_tensor=[None], workspace=torch.zeros(1, dtype=torch.int32),
        )
    assert torch.equal(param, before)
    assert not square_avg.any() and not grad_avg.any()
