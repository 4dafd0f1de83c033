"""Validate the NumPy references against torch.optim's for-loop implementation in float64.

If these pass, the references agree with torch.optim step by step (param, every
state tensor and the step count) for every combination of boolean options and
several values of each numeric hyperparameter, so they can serve as the
definition of correctness for fused_opt.
"""

import itertools

import numpy as np
import pytest
import torch

from . import REFERENCES, sgd_step

SHAPES = [(1,), (7, 13), (1031,)]
STEPS = 12
# Both sides run in float64 and differ only in rounding order (torch uses lerp,
# folds the bias corrections into the step size, ...), i.e. a few ulps. ATOL is
# for entries that cancel to nearly zero (momentum buffers, exp_avg), where an
# ulp of the operands is a large relative error. Observed worst case: ~3% of this.
RTOL = 1e-10
ATOL = 1e-14

# Large enough that the params move visibly, so a wrong update shows up in them.
LR = {"Adam": 1e-2, "AdamW": 1e-2, "SGD": 1e-1, "RMSprop": 1e-2, "Adagrad": 1e-1}

WEIGHT_DECAYS = (0.0, 1e-2, 0.3)
BOOLS = (False, True)


def option_grid(**axes):
    """All combinations of the given option values, as keyword dicts."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def nesterov_is_valid(options):
    return not options["nesterov"] or (options["momentum"] > 0 and options["dampening"] == 0)


OPTIONS = {
    "Adam": option_grid(
        amsgrad=BOOLS,
        maximize=BOOLS,
        decoupled_weight_decay=BOOLS,
        weight_decay=WEIGHT_DECAYS,
        betas=((0.9, 0.999), (0.8, 0.99)),
    ),
    "AdamW": option_grid(amsgrad=BOOLS, maximize=BOOLS, weight_decay=WEIGHT_DECAYS),
    "SGD": [
        options
        for options in option_grid(
            momentum=(0.0, 0.5, 0.9),
            dampening=(0.0, 0.1, 0.5),
            nesterov=BOOLS,
            maximize=BOOLS,
            weight_decay=WEIGHT_DECAYS,
        )
        if nesterov_is_valid(options)
    ],
    "RMSprop": option_grid(
        alpha=(0.99, 0.9),
        momentum=(0.0, 0.5, 0.9),
        centered=BOOLS,
        maximize=BOOLS,
        weight_decay=WEIGHT_DECAYS,
    ),
    "Adagrad": option_grid(
        lr_decay=(0.0, 1e-2, 0.5),
        initial_accumulator_value=(0.0, 0.1, 1.0),
        maximize=BOOLS,
        weight_decay=WEIGHT_DECAYS,
    ),
}


def case_id(name, options, shape):
    return "-".join([name, *(f"{key}={value}" for key, value in options.items()), str(shape)])


CASES = [
    pytest.param(name, options, shape, id=case_id(name, options, shape))
    for name, option_list in OPTIONS.items()
    for options in option_list
    for shape in SHAPES
]


def assert_close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("name, options, shape", CASES)
def test_reference_matches_torch(name, options, shape):
    rng = np.random.default_rng(0)
    initial_param = rng.standard_normal(shape)
    grads = rng.standard_normal((STEPS, *shape))
    # A reference that modified its grad argument would corrupt the caller's data.
    grads.flags.writeable = False

    ref_param = initial_param.copy()
    ref_state = {}
    torch_param = torch.tensor(initial_param, dtype=torch.float64, requires_grad=True)
    optimizer = getattr(torch.optim, name)([torch_param], lr=LR[name], foreach=False, **options)

    for step, grad in enumerate(grads, start=1):
        REFERENCES[name](ref_param, grad, ref_state, lr=LR[name], **options)
        torch_param.grad = torch.tensor(grad)
        optimizer.step()

        where = f"after step {step}"
        torch_state = optimizer.state[torch_param]
        assert set(ref_state) == set(torch_state), where
        assert_close(ref_param, torch_param.detach().numpy(), f"param {where}")
        for key, torch_value in torch_state.items():
            if key == "step":
                assert type(ref_state["step"]) is int, where
                assert ref_state["step"] == torch_value.item() == step, where
            else:
                assert_close(ref_state[key], torch_value.numpy(), f"state[{key!r}] {where}")


@pytest.mark.parametrize("momentum, dampening", [(0.0, 0.0), (0.9, 0.1)])
def test_sgd_rejects_nesterov_where_torch_does(momentum, dampening):
    options = {"lr": 0.1, "momentum": momentum, "dampening": dampening, "nesterov": True}
    with pytest.raises(ValueError):
        torch.optim.SGD([torch.zeros(3, requires_grad=True)], **options)
    with pytest.raises(ValueError):
        sgd_step(np.zeros(3), np.ones(3), {}, **options)


@pytest.mark.parametrize("name", REFERENCES)
def test_rejects_non_float64(name):
    with pytest.raises(TypeError):
        REFERENCES[name](np.zeros(3, np.float32), np.ones(3, np.float32), {}, lr=0.1)


@pytest.mark.parametrize("name", REFERENCES)
def test_rejects_mismatched_grad_shape(name):
    with pytest.raises(ValueError):
        REFERENCES[name](np.zeros(3), np.ones(1), {}, lr=0.1)


@pytest.mark.parametrize("max_norm", [None, 0.0, 0.5, 1e6])
@pytest.mark.parametrize("bad", [None, "inf", "nan"])
def test_unscale_and_clip_matches_torch_pipeline(max_norm, bad):
    from . import unscale_and_clip

    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    scale = 1024.0
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
    if bad is not None:
        params[1].grad[3, 4] = float(bad)
    expected = unscale_and_clip([p.grad.numpy().copy() for p in params], scale, max_norm)

    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(torch.ones((), dtype=torch.float64))
    opt = torch.optim.SGD(params, lr=1.0)
    scaler.unscale_(opt)
    found_inf = sum(v.item() for v in scaler._found_inf_per_device(opt).values())
    assert (expected is None) == (found_inf > 0)
    if expected is None:
        return
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.grad.numpy(), e, rtol=RTOL, atol=ATOL)
