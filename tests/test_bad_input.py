"""Inputs fused_opt must refuse (or, for sparse grads, hand to torch): clear errors, no half
steps."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import fused_opt
from fused_opt import _ops
from optim_helpers import (
    FULL_STATE_OPTIONS,
    GROUP_NAMES,
    NAMES,
    assert_params_close,
    assert_same_tree,
    assert_states_close,
    build,
    make_params,
    set_grads,
    two_groups,
)

# Sparse-grad tests build sparse COO grads through nn.Embedding; torch warns about its own
# invariant checks being off, which says nothing about fused_opt.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")


# ------------------------------------------------------------------------------------------------
# Sparse gradients


def _embedding_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1))


def _sparse_step_inputs(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randint(0, 10, (6,), generator=gen)


def _backward(model, step):
    model.zero_grad(set_to_none=True)
    model(_sparse_step_inputs(step)).pow(2).sum().backward()


def _snapshot(opt):
    """Everything a step may change: every param, grad and state tensor of every group."""
    params = [p for group in opt.param_groups for p in group["params"]]
    return copy.deepcopy(
        (
            [p.detach() for p in params],
            [p.grad for p in params],
            [dict(opt.state.get(p, {})) for p in params],
        )
    )


def _outcome_of_sparse_step(module, name, options):
    model = _embedding_model()
    opt = build(module, name, model.parameters(), **options)
    _backward(model, 0)
    before = _snapshot(opt)
    try:
        opt.step()
    except Exception as exc:  # noqa: BLE001  (the type itself is what is compared)
        return (type(exc), str(exc)), opt, before
    return None, opt, before


SPARSE_REFUSED = {
    "Adam": ("Adam", {}),
    "AdamW": ("AdamW", {}),
    "RMSprop": ("RMSprop", {"centered": True}),
    # torch's sparse paths cannot apply weight decay.
    "SGD-weight_decay": ("SGD", {"lr": 0.1, "weight_decay": 0.01}),
    "SGD-momentum-weight_decay": ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    "Adagrad-weight_decay": ("Adagrad", {"weight_decay": 0.01}),
}


@pytest.mark.parametrize(
    ("name", "options"), SPARSE_REFUSED.values(), ids=SPARSE_REFUSED.keys()
)
def test_sparse_grad_is_refused_like_torch_and_changes_nothing(name, options):
    expected, _, _ = _outcome_of_sparse_step(torch.optim, name, options)
    assert expected is not None, "torch.optim accepts this case; it tests nothing"
    actual, opt, before = _outcome_of_sparse_step(fused_opt, name, options)
    assert actual == expected
    # torch's Adagrad counts a step for params it visits before raising; fused_opt raises first.
    assert_same_tree(_snapshot(opt), before)


SPARSE_ACCEPTED = {
    "SGD": ("SGD", {"lr": 0.1}),
    "SGD-momentum": ("SGD", {"lr": 0.1, "momentum": 0.9}),
    "SGD-momentum-dampening-maximize": (
        "SGD",
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "maximize": True},
    ),
    "SGD-nesterov": ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "Adagrad": ("Adagrad", {"lr": 0.1}),
    "Adagrad-lr_decay-initial-maximize": (
        "Adagrad",
        {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.2, "maximize": True},
    ),
}


@pytest.mark.parametrize(
    ("name", "options"), SPARSE_ACCEPTED.values(), ids=SPARSE_ACCEPTED.keys()
)
def test_sparse_grads_train_like_torch(name, options):
    # One group holds the sparse embedding and the dense linear layer: both paths in one step.
    models, opts = {}, {}
    for module in (torch.optim, fused_opt):
        models[module] = _embedding_model()
        opts[module] = build(module, name, models[module].parameters(), **options)
        for step in range(6):
            _backward(models[module], step)
            opts[module].step()
    assert models[fused_opt][0].weight.grad.is_sparse
    fused_params = list(models[fused_opt].parameters())
    torch_params = list(models[torch.optim].parameters())
    assert_params_close(fused_params, torch_params)
    assert_states_close(opts[fused_opt], fused_params, opts[torch.optim], torch_params)


# ------------------------------------------------------------------------------------------------
# Grads that do not fit their param, and params the kernels cannot walk

BAD_GROUP, BAD_INDEX = 1, 1  # the last param of the last group: every other group is "before"


def _strided(shape):
    # Every other column of a wider tensor: a view with gaps, as a param.
    *lead, last = shape
    return torch.nn.Parameter(torch.randn(*lead, 2 * last)[..., ::2])


def _grad_of_wrong_dtype(p):
    # torch 2.13 lets a param declare another grad dtype; the setter then accepts it.
    p.grad = None
    p.grad_dtype = torch.float64
    p.grad = torch.ones(p.shape, dtype=torch.float64)


def _grad_of_wrong_shape(p):
    # The grad setter checks the size, but .data on an existing grad does not.
    p.grad = torch.ones(p.shape)
    p.grad.data = torch.ones(p.numel())


BAD_GRADS = {
    # id: (makes the param bad at construction, makes its grad bad before the step, message words)
    "grad-dtype": (None, _grad_of_wrong_dtype, "has dtype torch.float64 but the param has dtype"),
    "grad-shape": (None, _grad_of_wrong_shape, "has shape (6,) but the param has shape (2, 1, 3)"),
    "strided-param": (_strided, None, "is a strided view with gaps"),
}


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
@pytest.mark.parametrize("case", BAD_GRADS)
@pytest.mark.parametrize("name", NAMES)
def test_bad_grad_or_param_is_refused_and_changes_nothing(name, case, named, kernels):
    make_bad_param, make_bad_grad, message = BAD_GRADS[case]
    params = make_params()
    if make_bad_param is not None:
        params[-1] = make_bad_param(params[-1].shape)
    opt = two_groups(fused_opt, name, params, named)
    # Earlier steps give every group real state, so "unchanged" below means something. A strided
    # param is left out of them: it would be refused.
    for step in range(2):
        set_grads(params, step)
        if make_bad_param is not None:
            params[-1].grad = None
        opt.step()
    set_grads(params, 2)
    if make_bad_grad is not None:
        make_bad_grad(params[-1])
    before = _snapshot(opt)

    with pytest.raises(RuntimeError) as excinfo:
        opt.step()

    label = (
        f"param '{GROUP_NAMES[BAD_GROUP][BAD_INDEX]}'"
        if named
        else f"param_groups[{BAD_GROUP}]['params'][{BAD_INDEX}]"
    )
    assert label in str(excinfo.value)
    assert message in str(excinfo.value)
    assert_same_tree(_snapshot(opt), before)


def test_grad_on_another_device_cannot_be_set():
    # Why the device check is tested at the op level: torch refuses every way of giving a CPU
    # param a grad on another device, so no fused_opt optimizer can be handed one.
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="device"):
        p.grad = torch.zeros(3, device="meta")
    p.grad = torch.zeros(3)
    with pytest.raises(RuntimeError, match="incompatible tensor type"):
        p.grad.data = torch.zeros(3, device="meta")


# ------------------------------------------------------------------------------------------------
# A param listed twice, bad hyperparameters: refused before any group steps


def _trained_in_two_calls(name):
    """Two trained groups that step in separate op calls (the second maximizes), so that a
    refusal found only while launching would come after the first group had stepped."""
    params = make_params()
    opt = build(
        fused_opt,
        name,
        [{"params": params[:2]}, {"params": params[2:], "maximize": True}],
        **FULL_STATE_OPTIONS[name],
    )
    for step in range(2):
        set_grads(params, step)
        opt.step()
    set_grads(params, 2)
    return params, opt


def _counters(opt):
    return [
        opt.state[p]["step"].item() if "step" in opt.state.get(p, {}) else None
        for group in opt.param_groups
        for p in group["params"]
    ]


# where the duplicate goes: (group, param of FULL_STATE_OPTIONS' params it repeats, its first place)
DUPLICATES = {"same-group": (1, 2, "param_groups[1]['params'][0]"),
              "other-group": (1, 0, "param_groups[0]['params'][0]")}


@pytest.mark.parametrize("where", DUPLICATES)
@pytest.mark.parametrize("name", NAMES)
def test_param_listed_twice_is_refused_and_changes_nothing(name, where):
    params, opt = _trained_in_two_calls(name)
    group, repeated, first = DUPLICATES[where]
    # Appended after construction (as code that edits param_groups does): torch.optim's
    # constructor only warns about a param listed twice in one group, and steps it twice.
    opt.param_groups[group]["params"].append(params[repeated])
    before, counters = _snapshot(opt), _counters(opt)

    with pytest.raises(ValueError) as excinfo:
        opt.step()

    message = str(excinfo.value)
    assert f"param_groups[{group}]['params'][2]" in message and first in message, message
    assert_same_tree(_snapshot(opt), before)
    assert _counters(opt) == counters


@pytest.mark.parametrize("name", NAMES)
def test_param_listed_twice_without_a_grad_steps_like_torch(name):
    # A frozen param listed twice is never updated: torch.optim skips it twice, and so does
    # fused_opt, without refusing the step.
    results = []
    for module in (torch.optim, fused_opt):
        params = make_params()
        opt = build(module, name, params[:2], **FULL_STATE_OPTIONS[name])
        opt.param_groups[0]["params"].append(params[2])
        opt.param_groups[0]["params"].append(params[2])
        for step in range(3):
            set_grads(params[:2], step)
            opt.step()
        results.append((params, opt))
    (torch_params, torch_opt), (fused_params, fused) = results
    assert_params_close(fused_params, torch_params)
    assert_states_close(fused, fused_params[:2], torch_opt, torch_params[:2])


# Hyperparameters every optimizer reads, and each one's own: (key, bad value).
BAD_HYPERS = [("lr", None), ("lr", "0.1"), ("lr", torch.tensor([1e-3, 1e-3])),
              ("lr", torch.tensor(1, dtype=torch.int64)), ("weight_decay", None),
              ("weight_decay", torch.tensor([0.1, 0.1])),
              # Off the CPU: read on the host, it would synchronize with the device every step.
              ("weight_decay", torch.tensor(0.1, device="meta")),
              ("l1_decay", None), ("l1_decay", -0.1), ("l1_decay", float("nan")),
              ("l1_decay", float("inf")), ("l1_mode", "lasso"), ("l1_mode", None)]
OWN_BAD_HYPERS = {
    "Adam": [("eps", None), ("betas", (0.9,)), ("betas", (0.9, None)),
             ("betas", (torch.tensor([0.9, 0.8]), 0.999))],
    "AdamW": [("eps", "1e-8"), ("betas", None)],
    "SGD": [("momentum", None), ("dampening", "0.1")],
    "RMSprop": [("alpha", None), ("eps", None), ("momentum", [0.9])],
    "Adagrad": [("lr_decay", None), ("eps", None)],
}
BAD_HYPER_CASES = [
    pytest.param(name, key, value, id=f"{name}-{key}={value!r}")
    for name in NAMES
    for key, value in BAD_HYPERS + OWN_BAD_HYPERS[name]
]


@pytest.mark.parametrize("name, key, value", BAD_HYPER_CASES)
def test_bad_hyperparameter_in_a_later_group_is_refused_before_any_group_steps(name, key, value):
    _, opt = _trained_in_two_calls(name)
    opt.param_groups[1][key] = value
    before, counters = _snapshot(opt), _counters(opt)

    with pytest.raises((TypeError, ValueError)) as excinfo:
        opt.step()

    assert f"param_groups[1]['{key}']" in str(excinfo.value), str(excinfo.value)
    assert_same_tree(_snapshot(opt), before)
    assert _counters(opt) == counters


@pytest.mark.parametrize("name", NAMES)
def test_cpu_tensor_weight_decay_steps_as_its_value(name):
    """A CPU tensor is host memory: taken by value without a sync, it steps as the float does."""
    runs = []
    for weight_decay in (0.1, torch.tensor(0.1, dtype=torch.float64)):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((4, 3), (7,))]
        opt = getattr(fused_opt, name)(params, lr=0.01, weight_decay=weight_decay)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(params)
    for index, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"params[{index}]"


# ------------------------------------------------------------------------------------------------
# The ops' own checks

SHAPES = ((4, 3), (5,))


def _tensors(fill=None, shapes=SHAPES):
    gen = torch.Generator().manual_seed(len(shapes))
    return [torch.randn(s, generator=gen) if fill is None else torch.full(s, fill) for s in shapes]


def _steps(n=len(SHAPES)):
    return [torch.tensor(3.0) for _ in range(n)]


def _valid_call(op_name, master=False, **modes):
    """Keyword arguments of a valid call of `op_name` on two params, for the given mode flags;
    with `master`, bfloat16 params and grads with float32 masters and states."""
    call = _valid_fp32_call(op_name, **modes)
    if master:
        call["master_params"] = [p.clone() for p in call["params"]]
        call["params"] = [p.bfloat16() for p in call["params"]]
        call["grads"] = [g.bfloat16() for g in call["grads"]]
    return call


def _valid_fp32_call(op_name, **modes):
    if op_name == "grad_norm_":
        return {
            "grads": _tensors(),
            "norm": torch.zeros(()),
            "found_inf": torch.zeros(()),
            "workspace": torch.zeros(fused_opt._ops.GRAD_NORM_WORKSPACE_NUMEL),
        }
    # Two param groups of one param each, with their own hyperparameters.
    common = {
        "params": _tensors(),
        "grads": _tensors(),
        "master_params": [],
        "group_sizes": [1, 1],
        "lr": [0.1, 0.05],
        "l1_decay": [0.0, 0.01],
        "l1_proximal": [False, True],
        "stochastic_rounding_seed": [None, None],
        "lr_tensor": [None, None],
        "maximize": False,
        "workspace": torch.zeros(1, dtype=torch.int32),
    }
    if op_name == "adam_":
        amsgrad = modes.get("amsgrad", False)
        return {
            **common,
            "exp_avgs": _tensors(),
            "exp_avg_sqs": _tensors(0.5),
            "max_exp_avg_sqs": _tensors(0.5) if amsgrad else [],
            "steps": _steps(),
            "beta1": [0.9, 0.8],
            "beta2": [0.999, 0.99],
            "weight_decay": [0.0, 0.1],
            "eps": [1e-8, 1e-6],
            "amsgrad": amsgrad,
            "decoupled_weight_decay": False,
            "beta1_tensor": [None, None],
            "beta2_tensor": [None, None],
        }
    if op_name == "sgd_":
        momentum = modes.get("momentum", 0.0)
        return {
            **common,
            "momentum_buffers": _tensors() if momentum else [],
            "steps": _steps() if momentum else [],
            "momentum": [momentum, momentum / 2],
            "dampening": [0.0, 0.1],
            "weight_decay": [0.0, 0.1],
            "nesterov": modes.get("nesterov", False),
        }
    if op_name == "rmsprop_":
        centered, momentum = modes.get("centered", False), modes.get("momentum", 0.0)
        return {
            **common,
            "square_avgs": _tensors(0.5),
            "grad_avgs": _tensors(0.1) if centered else [],
            "momentum_buffers": _tensors() if momentum else [],
            "steps": _steps(),
            "alpha": [0.99, 0.9],
            "eps": [1e-8, 1e-6],
            "weight_decay": [0.0, 0.1],
            "momentum": [momentum, momentum / 2],
            "centered": centered,
        }
    assert op_name == "adagrad_"
    return {
        **common,
        "state_sums": _tensors(0.5),
        "steps": _steps(),
        "lr_decay": [0.0, 0.01],
        "weight_decay": [0.0, 0.1],
        "eps": [1e-10, 1e-8],
    }


def _set(key, index, value):
    def mutate(call):
        call[key][index] = value(call[key][index])

    return mutate


def _replace(key, value):
    def mutate(call):
        call[key] = value(call.get(key))

    return mutate


def _in_float64(index):
    """Param `index` and its grad (and states) in float64."""

    def mutate(call):
        for key in ("params", "grads"):
            call[key][index] = call[key][index].double()

    return mutate


def _to_meta(t):
    return t.to("meta")


# (op, mode flags, how to spoil the valid call, what the message must say)
OP_CASES = {
    "adam-fewer-grads": (
        "adam_",
        {},
        _replace("grads", lambda g: g[:1]),
        "got 2 params but 1 grads",
    ),
    "adam-fewer-exp_avgs": (
        "adam_",
        {},
        _replace("exp_avgs", lambda s: s[:1]),
        "got 2 params but 1 exp_avgs",
    ),
    "adam-more-steps": (
        "adam_",
        {},
        _replace("steps", lambda s: s + _steps(1)),
        "got 2 params but 3 steps",
    ),
    "adam-max_exp_avg_sqs-without-amsgrad": (
        "adam_",
        {},
        _replace("max_exp_avg_sqs", lambda s: _tensors()),
        "max_exp_avg_sqs must be given exactly when amsgrad is set",
    ),
    "adam-amsgrad-without-max_exp_avg_sqs": (
        "adam_",
        {"amsgrad": True},
        _replace("max_exp_avg_sqs", lambda s: []),
        "got 2 params but 0 max_exp_avg_sqs",
    ),
    "adam-step-float64": (
        "adam_",
        {},
        _set("steps", 1, lambda s: s.double()),
        "steps[1] must be a one-element float32 tensor",
    ),
    "adam-step-two-elements": (
        "adam_",
        {},
        _set("steps", 1, lambda s: torch.zeros(2)),
        "steps[1] must be a one-element float32 tensor",
    ),
    "adam-int-param": (
        "adam_",
        {},
        _set("params", 1, lambda p: p.int()),
        "params[1] has dtype Int; supported: float32, float64, float16, bfloat16",
    ),
    "adam-grad-dtype": (
        "adam_",
        {},
        _set("grads", 1, lambda g: g.double()),
        "grads[1] has dtype Double but params[1] has dtype Float",
    ),
    "adam-state-shape": (
        "adam_",
        {},
        _set("exp_avg_sqs", 0, lambda s: s.reshape(3, 4)),
        "exp_avg_sqs[0] has shape [3, 4] but params[0] has shape [4, 3]",
    ),
    "adam-state-strides": (
        "adam_",
        {},
        _set("exp_avgs", 0, lambda s: s.t().contiguous().t()),
        "exp_avgs[0] has strides [1, 4] but params[0] has strides [3, 1]",
    ),
    "adam-lr_tensor-two-elements": (
        "adam_",
        {},
        _set("lr_tensor", 1, lambda _: torch.tensor([0.1, 0.1])),
        "lr_tensor[1] must have one element",
    ),
    "sgd-fewer-grads": (
        "sgd_",
        {},
        _replace("grads", lambda g: g[:1]),
        "got 2 params but 1 grads",
    ),
    "sgd-buffers-without-momentum": (
        "sgd_",
        {},
        _replace("momentum_buffers", lambda s: _tensors()),
        "momentum_buffers must be given exactly when momentum != 0",
    ),
    "sgd-momentum-without-buffers": (
        "sgd_",
        {"momentum": 0.9},
        _replace("momentum_buffers", lambda s: []),
        "got 2 params but 0 momentum_buffers",
    ),
    "sgd-fewer-steps": (
        "sgd_",
        {"momentum": 0.9},
        _replace("steps", lambda s: s[:1]),
        "got 2 params but 1 steps",
    ),
    "sgd-steps-without-momentum": (
        "sgd_",
        {},
        _replace("steps", lambda s: _steps()),
        "steps must be given exactly when momentum != 0 or a group rounds stochastically",
    ),
    "adam-fewer-master_params": (
        "adam_",
        {"master": True},
        _replace("master_params", lambda s: s[:1]),
        "params up to params[1] include 2 float16/bfloat16 params but there are 1 master_params",
    ),
    "adam-master-for-fp32-param": (
        "adam_",
        {},
        _replace("master_params", lambda s: _tensors()),
        "got 2 master_params but 0 float16/bfloat16 params (one master each)",
    ),
    "adam-fp64-param-under-master": (
        "adam_",
        {"master": True},
        _in_float64(0),
        "params[0] has dtype Double; with master_params, params are float16 or bfloat16",
    ),
    "adam-master-float16": (
        "adam_",
        {"master": True},
        _set("master_params", 1, lambda m: m.half()),
        "master_params[1] (of params[1]) must be a float32 tensor (a master), or a bfloat16",
    ),
    # A bfloat16 entry beside a bfloat16 param is its Kahan compensation, whose states share the
    # param's dtype: float32 states are a master's.
    "adam-compensation-beside-float32-states": (
        "adam_",
        {"master": True},
        _set("master_params", 1, lambda m: m.bfloat16()),
        "exp_avgs[1] has dtype Float but params[1] has dtype BFloat16",
    ),
    "adam-master-shape": (
        "adam_",
        {"master": True},
        _set("master_params", 0, lambda m: m.reshape(3, 4)),
        "master_params[0] must have the device, shape and strides of params[0]",
    ),
    "adam-bf16-state-under-master": (
        "adam_",
        {"master": True},
        _set("exp_avg_sqs", 1, lambda s: s.bfloat16()),
        "exp_avg_sqs[1] has dtype BFloat16 but the first state of params[1] has dtype Float",
    ),
    "sgd-grad_scale-float64": (
        "sgd_",
        {},
        _replace("grad_scale", lambda _: torch.tensor(2.0, dtype=torch.float64)),
        "grad_scale must be a one-element float32 tensor",
    ),
    "rmsprop-found_inf-two-elements": (
        "rmsprop_",
        {},
        _replace("found_inf", lambda _: torch.zeros(2)),
        "found_inf must be a one-element float32 tensor",
    ),
    "adagrad-grad_norm-without-max_grad_norm": (
        "adagrad_",
        {},
        _replace("grad_norm", lambda _: torch.tensor(1.0)),
        "grad_norm must be given exactly when max_grad_norm is",
    ),
    "adagrad-max_grad_norm-without-grad_norm": (
        "adagrad_",
        {},
        _replace("max_grad_norm", lambda _: 1.0),
        "grad_norm must be given exactly when max_grad_norm is",
    ),
    "adam-negative-max_grad_norm": (
        "adam_",
        {},
        lambda call: call.update(grad_norm=torch.tensor(1.0), max_grad_norm=-1.0),
        "max_grad_norm must be >= 0, got -1",
    ),
    "adam-negative-l1_decay": (
        "adam_",
        {},
        _set("l1_decay", 1, lambda _: -0.5),
        "l1_decay[1] is -0.5; it must be a finite number >= 0",
    ),
    "sgd-nan-l1_decay": (
        "sgd_",
        {},
        _set("l1_decay", 0, lambda _: float("nan")),
        "l1_decay[0] is nan; it must be a finite number >= 0",
    ),
    "rmsprop-l1_proximal-one-entry-for-two-groups": (
        "rmsprop_",
        {},
        _replace("l1_proximal", lambda flags: flags[:1]),
        "got 2 param groups but 1 l1_proximal (one per group)",
    ),
    "adam-stochastic_rounding_seed-one-entry-for-two-groups": (
        "adam_",
        {},
        _replace("stochastic_rounding_seed", lambda seeds: seeds[:1]),
        "got 2 param groups but 1 stochastic_rounding_seed (one per group)",
    ),
    "adagrad-l1_decay-three-entries-for-two-groups": (
        "adagrad_",
        {},
        _replace("l1_decay", lambda values: values + [0.1]),
        "got 2 param groups but 3 l1_decay (one per group)",
    ),
    "sgd-nesterov-without-momentum": (
        "sgd_",
        {},
        _replace("nesterov", lambda _: True),
        "nesterov requires momentum",
    ),
    "sgd-int-param": (
        "sgd_",
        {},
        _set("params", 0, lambda p: p.long()),
        "params[0] has dtype Long",
    ),
    "sgd-strided-param": (
        "sgd_",
        {},
        _set("params", 0, lambda p: torch.zeros(4, 6)[:, ::2]),
        "params[0] is not dense in memory",
    ),
    "rmsprop-fewer-square_avgs": (
        "rmsprop_",
        {},
        _replace("square_avgs", lambda s: s[:1]),
        "got 2 params but 1 square_avgs",
    ),
    "rmsprop-grad_avgs-without-centered": (
        "rmsprop_",
        {},
        _replace("grad_avgs", lambda s: _tensors()),
        "grad_avgs must be given exactly when centered",
    ),
    "rmsprop-centered-without-grad_avgs": (
        "rmsprop_",
        {"centered": True},
        _replace("grad_avgs", lambda s: []),
        "got 2 params but 0 grad_avgs",
    ),
    "rmsprop-buffers-without-momentum": (
        "rmsprop_",
        {},
        _replace("momentum_buffers", lambda s: _tensors()),
        "momentum_buffers exactly when momentum > 0",
    ),
    "rmsprop-momentum-without-buffers": (
        "rmsprop_",
        {"momentum": 0.5},
        _replace("momentum_buffers", lambda s: []),
        "got 2 params but 0 momentum_buffers",
    ),
    "rmsprop-step-float64": (
        "rmsprop_",
        {},
        _set("steps", 0, lambda s: s.double()),
        "steps[0] must be a one-element float32 tensor",
    ),
    "rmsprop-grad-avg-shape": (
        "rmsprop_",
        {"centered": True},
        _set("grad_avgs", 1, lambda s: torch.zeros(6)),
        "grad_avgs[1] has shape [6] but params[1] has shape [5]",
    ),
    "adagrad-fewer-state_sums": (
        "adagrad_",
        {},
        _replace("state_sums", lambda s: s[:1]),
        "got 2 params but 1 state_sums",
    ),
    "adagrad-fewer-steps": (
        "adagrad_",
        {},
        _replace("steps", lambda s: s[:1]),
        "got 2 params but 1 steps",
    ),
    "adagrad-step-float16": (
        "adagrad_",
        {},
        _set("steps", 1, lambda s: s.half()),
        "steps[1] must be a one-element float32 tensor",
    ),
    "adagrad-int-param": (
        "adagrad_",
        {},
        _set("params", 1, lambda p: p.to(torch.int16)),
        "params[1] has dtype Short",
    ),
    "adam-group_sizes-short": (
        "adam_",
        {},
        _replace("group_sizes", lambda _: [1]),
        "group_sizes add up to 1 but there are 2 params",
    ),
    "rmsprop-group_sizes-negative": (
        "rmsprop_",
        {},
        _replace("group_sizes", lambda _: [3, -1]),
        "group_sizes[1] is -1",
    ),
    "adam-hyper-list-short": (
        "adam_",
        {},
        _replace("eps", lambda e: e[:1]),
        "got 2 param groups but 1 eps (one per group)",
    ),
    "adagrad-lr-list-long": (
        "adagrad_",
        {},
        _replace("lr", lambda lr: lr + [0.1]),
        "got 2 param groups but 3 lr (one per group)",
    ),
    "sgd-lr_tensor-list-short": (
        "sgd_",
        {},
        _replace("lr_tensor", lambda _: [None]),
        "got 2 param groups but 1 lr_tensor (one per group)",
    ),
    "sgd-momentum-in-one-group-only": (
        "sgd_",
        {"momentum": 0.9},
        _replace("momentum", lambda _: [0.9, 0.0]),
        "momentum[1] is 0 but momentum[0] is 0.9",
    ),
    "rmsprop-momentum-in-one-group-only": (
        "rmsprop_",
        {},
        _replace("momentum", lambda _: [0.0, 0.5]),
        "momentum[1] is 0.5 but momentum[0] is 0",
    ),
    "adam-no-workspace": (
        "adam_",
        {},
        _replace("workspace", lambda _: None),
        "a workspace is required with step counters",
    ),
    "adagrad-workspace-of-floats": (
        "adagrad_",
        {},
        _replace("workspace", lambda _: torch.zeros(1)),
        "workspace must be a contiguous int32 tensor of at least one element on cpu",
    ),
}

# Cases the dispatcher routes away from the CPU kernel: a call with a meta tensor runs the ops'
# fake (meta) kernel, which checks and writes nothing, and a sparse tensor asks for a SparseCPU
# kernel that does not exist. They call the CPU kernel directly, so its own checks are tested;
# a CUDA build reaches those checks through the dispatcher with a CPU tensor among CUDA ones.
CPU_KERNEL_CASES = {
    "adagrad-sparse-grad": (
        "adagrad_",
        {},
        _set("grads", 1, lambda g: g.to_sparse()),
        "grads[1] is sparse",
    ),
    "adam-param-on-another-device": (
        "adam_",
        {},
        _set("params", 1, _to_meta),
        "params[1] is on meta but params[0] is on cpu",
    ),
    "adam-grad-on-another-device": (
        "adam_",
        {},
        _set("grads", 0, _to_meta),
        "grads[0] is on meta but params[0] is on cpu",
    ),
    "adam-state-on-another-device": (
        "adam_",
        {},
        _set("exp_avg_sqs", 1, _to_meta),
        "exp_avg_sqs[1] is on meta but params[1] is on cpu",
    ),
    "adam-step-on-another-device": (
        "adam_",
        {},
        _set("steps", 1, _to_meta),
        "steps[1] is on meta but params[1] is on cpu",
    ),
    "sgd-param-on-another-device": (
        "sgd_",
        {},
        _set("params", 1, _to_meta),
        "params[1] is on meta but params[0] is on cpu",
    ),
    "rmsprop-buffer-on-another-device": (
        "rmsprop_",
        {"momentum": 0.5},
        _set("momentum_buffers", 1, _to_meta),
        "momentum_buffers[1] is on meta but params[1] is on cpu",
    ),
    "adagrad-param-on-another-device": (
        "adagrad_",
        {},
        _set("params", 1, _to_meta),
        "params[1] is on meta but params[0] is on cpu",
    ),
    "adagrad-lr_tensor-on-another-device": (
        "adagrad_",
        {},
        _set("lr_tensor", 0, lambda _: torch.tensor(0.1, device="meta")),
        "lr_tensor[0] is on meta but the params are on cpu",
    ),
    "grad_norm-int-grad": (
        "grad_norm_",
        {},
        _set("grads", 1, lambda g: g.int()),
        "grads[1] has dtype Int; supported: float32, float64, float16, bfloat16",
    ),
    "grad_norm-strided-grad": (
        "grad_norm_",
        {},
        _set("grads", 0, lambda g: torch.zeros(4, 6)[:, ::2]),
        "grads[0] is not dense in memory",
    ),
    "grad_norm-norm-float64": (
        "grad_norm_",
        {},
        _replace("norm", lambda _: torch.zeros((), dtype=torch.float64)),
        "norm must be a one-element float32 tensor",
    ),
    "grad_norm-workspace-float16": (
        "grad_norm_",
        {},
        _replace("workspace", lambda w: w.half()),
        "workspace must be a contiguous float32 tensor",
    ),
    "grad_norm-grad_scale-two-elements": (
        "grad_norm_",
        {},
        _replace("grad_scale", lambda _: torch.ones(2)),
        "grad_scale must be a one-element float32 tensor",
    ),
    "adam-beta2_tensor-on-another-device": (
        "adam_",
        {},
        _set("beta2_tensor", 1, lambda _: torch.tensor(0.99, device="meta")),
        "beta2_tensor[1] is on meta but the params are on cpu",
    ),
    "adam-beta1_tensor-two-elements": (
        "adam_",
        {},
        _set("beta1_tensor", 0, lambda _: torch.tensor([0.9, 0.9])),
        "beta1_tensor[0] must have one element",
    ),
    "sgd-found_inf-on-another-device": (
        "sgd_",
        {},
        _replace("found_inf", lambda _: torch.tensor(0.0, device="meta")),
        "found_inf is on meta but the params are on cpu",
    ),
}


def _call_op(op_name, call, cpu_kernel):
    op = getattr(_ops.op_namespace, op_name).default
    if cpu_kernel:
        return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), **call)
    return op(**call)


def _check_op_refuses(op_name, modes, spoil, message, cpu_kernel):
    call = _valid_call(op_name, **modes)
    _call_op(op_name, copy.deepcopy(call), cpu_kernel)  # the unspoilt call is accepted
    spoil(call)
    before = copy.deepcopy(call)
    with pytest.raises(RuntimeError, match=re.escape(f"fused_opt::{op_name}")) as excinfo:
        _call_op(op_name, call, cpu_kernel)
    assert message in str(excinfo.value)
    # The checks run before any tensor is written, including the step counters.
    for key, value in call.items():
        if isinstance(value, list):
            for index, (a, e) in enumerate(zip(value, before[key])):
                if torch.is_tensor(a) and a.device.type != "meta":
                    assert torch.equal(a.to_dense(), e.to_dense()), f"{key}[{index}] changed"


@pytest.mark.parametrize(
    ("op_name", "modes", "spoil", "message"), OP_CASES.values(), ids=OP_CASES.keys()
)
def test_op_refuses_inconsistent_lists(op_name, modes, spoil, message, kernels):
    _check_op_refuses(op_name, modes, spoil, message, cpu_kernel=False)


@pytest.mark.parametrize(
    ("op_name", "modes", "spoil", "message"), CPU_KERNEL_CASES.values(), ids=CPU_KERNEL_CASES.keys()
)
def test_cpu_kernel_refuses_tensors_it_cannot_update(op_name, modes, spoil, message, kernels):
    _check_op_refuses(op_name, modes, spoil, message, cpu_kernel=True)


def test_meta_tensors_reach_the_fake_kernel_not_the_checks():
    # Why CPU_KERNEL_CASES call the CPU kernel directly.
    call = _valid_call("adam_")
    call["params"][1] = call["params"][1].to("meta")
    before = copy.deepcopy(call["params"][0])
    assert torch.ops.fused_opt.adam_(**call) is None
    assert torch.equal(call["params"][0], before)
