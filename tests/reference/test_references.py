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


# ------------------------------------------------------------------------------------------------
# L1: the subgradient mode against autograd, the proximal mode against its definition

L1_DECAY = 0.3
# Each optimizer plain, and with L2 or decoupled weight decay (elastic net) and momentum where it
# has them.
L1_OPTIONS = {
    "Adam": [{}, {"amsgrad": True, "weight_decay": 0.1}, {"maximize": True}],
    "AdamW": [{"weight_decay": 0.1}],
    "SGD": [{}, {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1},
            {"momentum": 0.9, "nesterov": True}],
    "RMSprop": [{}, {"centered": True, "momentum": 0.5, "weight_decay": 0.1}],
    "Adagrad": [{}, {"lr_decay": 1e-2, "weight_decay": 0.1}],
}
L1_CASES = [
    pytest.param(name, options, id=case_id(name, options, (1031,)))
    for name, option_list in L1_OPTIONS.items()
    for options in option_list
]


def l1_initial(rng, shape=(1031,)):
    """Random params with every fourth element exactly zero (where sign(0) = 0 matters)."""
    param = rng.standard_normal(shape)
    param[::4] = 0.0
    return param


@pytest.mark.parametrize("name, options", L1_CASES)
def test_l1_subgradient_reference_is_the_step_on_the_autograd_loss(name, options):
    """torch.optim, in float64, on the autograd gradient of ``loss + l1 * |w|.sum()`` (with
    maximize: of ``objective - l1 * |w|.sum()``, the penalty still shrinking the weights)."""
    rng = np.random.default_rng(1)
    initial_param = l1_initial(rng)
    coefficients = rng.standard_normal((STEPS, *initial_param.shape))
    ref_param, ref_state = initial_param.copy(), {}
    torch_param = torch.tensor(initial_param, requires_grad=True)
    optimizer = getattr(torch.optim, name)([torch_param], lr=LR[name], foreach=False, **options)
    penalty = -L1_DECAY if options.get("maximize") else L1_DECAY
    for step, c in enumerate(coefficients, start=1):
        REFERENCES[name](ref_param, c, ref_state, lr=LR[name], l1_decay=L1_DECAY,
                         l1_mode="subgradient", **options)
        optimizer.zero_grad()
        loss = (torch_param * torch.from_numpy(c)).sum() + penalty * torch_param.abs().sum()
        loss.backward()
        optimizer.step()
        where = f"after step {step}"
        assert_close(ref_param, torch_param.detach().numpy(), f"param {where}")
        for key, torch_value in optimizer.state[torch_param].items():
            if key != "step":
                assert_close(ref_state[key], torch_value.numpy(), f"state[{key!r}] {where}")


def lr_eff_from_torch_state(name, options, state, lr):
    """The per-element step size of the step torch just took, from torch's own state."""
    if name == "SGD":
        return lr
    t = state["step"].item()
    if name in ("Adam", "AdamW"):
        beta1, beta2 = options.get("betas", (0.9, 0.999))
        second = state["max_exp_avg_sq"] if options.get("amsgrad") else state["exp_avg_sq"]
        denom = np.sqrt(second.numpy() / (1 - beta2**t)) + options.get("eps", 1e-8)
        return lr / (1 - beta1**t) / denom
    if name == "RMSprop":
        v = state["square_avg"].numpy()
        if options.get("centered"):
            v = v - state["grad_avg"].numpy() ** 2
        return lr / (np.sqrt(v) + options.get("eps", 1e-8))
    assert name == "Adagrad"
    clr = lr / (1 + (t - 1) * options.get("lr_decay", 0.0))
    return clr / (np.sqrt(state["sum"].numpy()) + options.get("eps", 1e-10))


@pytest.mark.parametrize("name, options", L1_CASES)
def test_l1_proximal_reference_is_the_prox_of_torchs_step(name, options):
    """Each proximal step is torch.optim's step z from the same param (and, the gradients not
    depending on the param, the same states) followed by the proximal operator of
    lr_eff * l1 * |w|, checked through its optimality condition: w = z - lr_eff * l1 * sign(w)
    where w != 0, and |z| <= lr_eff * l1 where w == 0."""
    rng = np.random.default_rng(2)
    initial_param = l1_initial(rng)
    grads = rng.standard_normal((STEPS, *initial_param.shape))
    ref_param, ref_state = initial_param.copy(), {}
    torch_param = torch.tensor(initial_param, requires_grad=True)
    optimizer = getattr(torch.optim, name)([torch_param], lr=LR[name], foreach=False, **options)
    zeros = 0
    for step, grad in enumerate(grads, start=1):
        with torch.no_grad():
            torch_param.copy_(torch.from_numpy(ref_param))
        REFERENCES[name](ref_param, grad, ref_state, lr=LR[name], l1_decay=L1_DECAY,
                         l1_mode="proximal", **options)
        torch_param.grad = torch.tensor(grad)
        optimizer.step()
        state = optimizer.state[torch_param]
        where = f"after step {step}"
        for key, torch_value in state.items():
            if key != "step":
                assert_close(ref_state[key], torch_value.numpy(), f"state[{key!r}] {where}")
        z = torch_param.detach().numpy()
        threshold = lr_eff_from_torch_state(name, options, state, LR[name]) * L1_DECAY
        threshold = np.broadcast_to(threshold, z.shape)
        nonzero = ref_param != 0
        assert_close(ref_param[nonzero], (z - threshold * np.sign(ref_param))[nonzero],
                     f"param off zero {where}")
        assert np.all(np.abs(z[~nonzero]) <= threshold[~nonzero] * (1 + RTOL)), where
        zeros = max(zeros, int((~nonzero).sum()))
    assert zeros > 0, "no weight reached zero: the test would not see a wrong threshold there"
