"""The drop-in contract: fused_opt.X behaves like torch.optim.X wherever user code can tell."""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode

import fused_opt
from optim_helpers import (
    FULL_STATE_OPTIONS,
    FUSED_GROUP_DEFAULTS,
    NAMES,
    SHAPES,
    assert_params_close,
    assert_states_close,
    build,
    clone_params,
    make_params,
    set_grads,
    as_torch_group,
    train,
    twins,
)

# ------------------------------------------------------------------------------------------------
# Constructor: signature, validation, stored options


def _parameters(signature: inspect.Signature) -> list[tuple]:
    # Annotations are left out: fused_opt writes them as strings (PEP 563), which changes nothing
    # for callers.
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature_matches_torch(name):
    fused = _parameters(inspect.signature(getattr(fused_opt, name).__init__))
    reference = _parameters(inspect.signature(getattr(torch.optim, name).__init__))
    # torch's parameters, in torch's order, then fused_opt's own, keyword-only.
    assert fused[: len(reference)] == reference
    keyword_only = inspect.Parameter.KEYWORD_ONLY
    assert fused[len(reference) :] == [
        (key, keyword_only, default) for key, default in FUSED_GROUP_DEFAULTS.items()
    ] + [("shard_group", keyword_only, None)]


def _one_param():
    return [torch.nn.Parameter(torch.zeros(3))]


_SHARED = torch.nn.Parameter(torch.zeros(3))

# (optimizer, params factory, keyword options): each must make torch.optim raise.
INVALID = {
    "lr<0": ("Adam", _one_param, {"lr": -1e-3}),
    "lr-tensor-2-elements": ("Adam", _one_param, {"lr": torch.tensor([1e-3, 1e-3])}),
    "lr-tensor-with-foreach": ("Adam", _one_param, {"lr": torch.tensor(1e-3), "foreach": True}),
    "eps<0": ("Adam", _one_param, {"eps": -1e-8}),
    "beta1=1": ("Adam", _one_param, {"betas": (1.0, 0.999)}),
    "beta1<0": ("Adam", _one_param, {"betas": (-0.1, 0.999)}),
    "beta2=1": ("Adam", _one_param, {"betas": (0.9, 1.0)}),
    "beta-tensor-with-foreach": (
        "Adam",
        _one_param,
        {"betas": (torch.tensor(0.9), 0.999), "foreach": True},
    ),
    "adam-weight_decay<0": ("Adam", _one_param, {"weight_decay": -1.0}),
    "adam-foreach-and-fused": ("Adam", _one_param, {"foreach": True, "fused": True}),
    "adamw-lr<0": ("AdamW", _one_param, {"lr": -1.0}),
    "adamw-weight_decay<0": ("AdamW", _one_param, {"weight_decay": -1.0}),
    "adamw-beta2<0": ("AdamW", _one_param, {"betas": (0.9, -0.5)}),
    "sgd-lr<0": ("SGD", _one_param, {"lr": -0.1}),
    "sgd-momentum<0": ("SGD", _one_param, {"momentum": -0.9}),
    "sgd-weight_decay<0": ("SGD", _one_param, {"weight_decay": -1.0}),
    "sgd-nesterov-without-momentum": ("SGD", _one_param, {"nesterov": True}),
    "sgd-nesterov-with-dampening": (
        "SGD",
        _one_param,
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
    ),
    "sgd-foreach-and-fused": ("SGD", _one_param, {"foreach": True, "fused": True}),
    "rmsprop-lr<0": ("RMSprop", _one_param, {"lr": -0.1}),
    "rmsprop-alpha<0": ("RMSprop", _one_param, {"alpha": -0.5}),
    "rmsprop-eps<0": ("RMSprop", _one_param, {"eps": -1.0}),
    "rmsprop-momentum<0": ("RMSprop", _one_param, {"momentum": -0.5}),
    "rmsprop-weight_decay<0": ("RMSprop", _one_param, {"weight_decay": -1.0}),
    "adagrad-lr<0": ("Adagrad", _one_param, {"lr": -0.1}),
    "adagrad-lr_decay<0": ("Adagrad", _one_param, {"lr_decay": -0.1}),
    "adagrad-weight_decay<0": ("Adagrad", _one_param, {"weight_decay": -0.1}),
    "adagrad-initial_accumulator_value<0": (
        "Adagrad",
        _one_param,
        {"initial_accumulator_value": -0.1},
    ),
    "adagrad-eps<0": ("Adagrad", _one_param, {"eps": -1.0}),
    "empty-param-list": ("Adam", list, {}),
    "params-as-a-bare-tensor": ("SGD", lambda: torch.zeros(3), {}),
    "non-leaf-param": ("RMSprop", lambda: [torch.zeros(3, requires_grad=True) * 2], {}),
    "param-in-two-groups": ("Adagrad", lambda: [{"params": [_SHARED]}, {"params": [_SHARED]}], {}),
    "some-params-named": ("AdamW", lambda: [("w", _SHARED), torch.nn.Parameter(torch.ones(1))], {}),
}


def _construction_error(module, name, params_factory, options):
    try:
        build(module, name, params_factory(), **options)
    except Exception as exc:  # noqa: BLE001  (the type itself is what is compared)
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize(
    ("name", "params_factory", "options"), INVALID.values(), ids=INVALID.keys()
)
def test_invalid_arguments_raise_what_torch_raises(name, params_factory, options):
    expected = _construction_error(torch.optim, name, params_factory, options)
    assert expected is not None, "torch.optim accepts this case; it tests nothing"
    assert _construction_error(fused_opt, name, params_factory, options) == expected


@pytest.mark.parametrize("name", NAMES)
def test_param_listed_twice_warns_as_torch_does(name):
    # torch warns (and promises an error "in future") instead of raising.
    messages = {}
    for module in (torch.optim, fused_opt):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build(module, name, [_SHARED, _SHARED])
        messages[module] = [(w.category, str(w.message)) for w in caught]
    assert messages[torch.optim]
    assert messages[fused_opt] == messages[torch.optim]


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_is_rejected(name):
    with pytest.raises(NotImplementedError, match="differentiable"):
        build(fused_opt, name, _one_param(), differentiable=True)


# The implementation switches each torch twin accepts; fused_opt must accept and store them so
# that state dicts and code reading param_groups see what torch would show.
SWITCHES = {
    "Adam": ({"foreach": True}, {"fused": True}, {"capturable": True}, {"foreach": False}),
    "AdamW": ({"foreach": True}, {"fused": True}, {"capturable": True, "fused": True}),
    "SGD": ({"foreach": True}, {"fused": True}, {"foreach": False}),
    "RMSprop": ({"foreach": True}, {"capturable": True}, {"foreach": False}),
    "Adagrad": ({"foreach": True}, {"fused": True}),
}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        pytest.param(name, options, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items())}")
        for name, cases in SWITCHES.items()
        for options in cases
    ],
)
def test_implementation_switches_are_stored_like_torch(name, options):
    fused = build(fused_opt, name, _one_param(), **options)
    reference = build(torch.optim, name, _one_param(), **options)
    assert as_torch_group(fused.defaults) == reference.defaults
    assert fused.defaults.items() >= FUSED_GROUP_DEFAULTS.items()
    strip = lambda group: {k: v for k, v in group.items() if k != "params"}  # noqa: E731
    assert strip(as_torch_group(fused.param_groups[0])) == strip(reference.param_groups[0])
    for key, value in options.items():
        assert fused.param_groups[0][key] is value


def test_version_and_build_flags():
    assert isinstance(fused_opt.__version__, str) and fused_opt.__version__
    assert isinstance(fused_opt.built_with_cuda(), bool)
    if torch.version.cuda is None:
        assert fused_opt.built_with_cuda() is False


@pytest.mark.parametrize("name", NAMES)
def test_is_a_torch_optimizer_and_its_twin(name):
    opt = build(fused_opt, name, _one_param())
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, getattr(torch.optim, name))
    assert isinstance(opt, fused_opt.FusedOptimizer)


# ------------------------------------------------------------------------------------------------
# LR schedulers

# Options with momentum (or betas) wherever the optimizer has it, so CyclicLR and OneCycleLR
# cycle a momentum that the kernels must pick up from the param group.
SCHEDULED = {
    "Adam": {"lr": 1e-2},
    "AdamW": {"lr": 1e-2, "amsgrad": True},
    "SGD": {"lr": 1e-1, "momentum": 0.9, "nesterov": True},
    "RMSprop": {"lr": 1e-2, "momentum": 0.5, "centered": True},
    "Adagrad": {"lr": 1e-1, "lr_decay": 1e-2},
}
HAS_MOMENTUM = {"Adam": True, "AdamW": True, "SGD": True, "RMSprop": True, "Adagrad": False}

SCHEDULERS = {
    "StepLR": lambda opt, m: lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
    "MultiStepLR": lambda opt, m: lr_scheduler.MultiStepLR(opt, milestones=[3, 7, 11], gamma=0.3),
    "ExponentialLR": lambda opt, m: lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "CosineAnnealingLR": lambda opt, m: lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda opt, m: lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=4, T_mult=2
    ),
    "CyclicLR": lambda opt, m: lr_scheduler.CyclicLR(
        opt,
        base_lr=1e-3,
        max_lr=5e-2,
        step_size_up=3,
        mode="triangular2",
        cycle_momentum=m,
        base_momentum=0.8,
        max_momentum=0.95,
    ),
    "OneCycleLR": lambda opt, m: lr_scheduler.OneCycleLR(
        opt, max_lr=5e-2, total_steps=16, cycle_momentum=m
    ),
    "LinearLR": lambda opt, m: lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=8),
    "ConstantLR": lambda opt, m: lr_scheduler.ConstantLR(opt, factor=0.25, total_iters=5),
    "LambdaLR": lambda opt, m: lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
    "MultiplicativeLR": lambda opt, m: lr_scheduler.MultiplicativeLR(opt, lambda epoch: 0.9),
    "PolynomialLR": lambda opt, m: lr_scheduler.PolynomialLR(opt, total_iters=12, power=2.0),
    "ReduceLROnPlateau": lambda opt, m: lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=1
    ),
    "SequentialLR": lambda opt, m: lr_scheduler.SequentialLR(
        opt,
        [
            lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4),
            lr_scheduler.ExponentialLR(opt, gamma=0.85),
        ],
        milestones=[4],
    ),
    "ChainedScheduler": lambda opt, m: lr_scheduler.ChainedScheduler(
        [
            lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=6),
            lr_scheduler.ExponentialLR(opt, gamma=0.9),
        ]
    ),
}
SCHEDULED_STEPS = 15


def _drive(name, params, opt, scheduler_name):
    scheduler = SCHEDULERS[scheduler_name](opt, HAS_MOMENTUM[name])
    lrs = []
    for step in range(SCHEDULED_STEPS):
        set_grads(params, step)
        opt.step()
        if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)  # a flat metric: the plateau cuts the lr every other step
        else:
            scheduler.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
    return lrs


@pytest.mark.parametrize("lr_kind", ["float-lr", "tensor-lr"])
@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_drives_fused_like_torch(name, scheduler_name, lr_kind):
    options = dict(SCHEDULED[name])
    if lr_kind == "tensor-lr":
        # Schedulers fill a tensor lr in place; the kernels must read the new value each step.
        options["lr"] = torch.tensor(options["lr"])
    torch_params, torch_opt, fused_params, fused_opt_ = twins(name, options)
    expected_lrs = _drive(name, torch_params, torch_opt, scheduler_name)
    actual_lrs = _drive(name, fused_params, fused_opt_, scheduler_name)
    assert len(set(expected_lrs)) > 1, "the scheduler never changed the lr; it tests nothing"
    assert actual_lrs == expected_lrs
    assert_params_close(fused_params, torch_params)
    assert_states_close(fused_opt_, fused_params, torch_opt, torch_params)


# ------------------------------------------------------------------------------------------------
# step(), zero_grad(), param groups, hooks


@pytest.mark.parametrize("name", NAMES)
def test_closure_runs_with_grad_enabled_and_its_loss_is_returned(name):
    target = torch.linspace(-1, 1, 6)
    results = {}
    for module in (torch.optim, fused_opt):
        (weight,) = make_params([(6,)])
        opt = build(module, name, [weight], **FULL_STATE_OPTIONS[name])
        grad_enabled = []

        def closure():
            grad_enabled.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = ((weight - target) ** 2).sum()
            loss.backward()
            return loss

        losses = []
        # Training loops often sit under no_grad; the closure still has to build a graph.
        with torch.no_grad():
            for _ in range(3):
                losses.append(opt.step(closure))
        assert grad_enabled == [True, True, True]
        assert all(torch.is_tensor(loss) and loss.requires_grad for loss in losses)
        results[module] = (weight, [loss.item() for loss in losses])
    assert results[fused_opt][1] == pytest.approx(results[torch.optim][1], rel=1e-5)
    assert_params_close([results[fused_opt][0]], [results[torch.optim][0]])


@pytest.mark.parametrize("name", NAMES)
def test_step_without_closure_returns_none(name):
    params = make_params()
    opt = build(fused_opt, name, params)
    set_grads(params, 0)
    assert opt.step() is None


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zero_fill"])
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_matches_torch(name, set_to_none):
    outcome = {}
    for module in (torch.optim, fused_opt):
        params = make_params()
        opt = build(module, name, params)
        set_grads(params, 0)
        before = [p.grad for p in params]
        opt.zero_grad(set_to_none=set_to_none)
        outcome[module] = [
            None if p.grad is None else (p.grad is old, bool((p.grad == 0).all()))
            for p, old in zip(params, before)
        ]
    assert outcome[fused_opt] == outcome[torch.optim]
    expected = None if set_to_none else (True, True)
    assert outcome[fused_opt] == [expected] * len(SHAPES)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_is_stepped_with_its_own_options(name):
    options = FULL_STATE_OPTIONS[name]
    torch_params, torch_opt, fused_params, fused = twins(name, options)
    added = make_params([(3, 2), (7,)], seed=5)
    torch_added, fused_added = clone_params(added), clone_params(added)
    torch_opt.add_param_group({"params": torch_added, "lr": options["lr"] * 3})
    fused.add_param_group({"params": fused_added, "lr": options["lr"] * 3})
    assert fused.param_groups[1]["lr"] == options["lr"] * 3
    torch_all, fused_all = torch_params + torch_added, fused_params + fused_added
    for opt, params in ((torch_opt, torch_all), (fused, fused_all)):
        train(opt, params, steps=4)
    assert all(fused.state.get(p) for p in fused_added), "the added group has no state"
    assert not torch.equal(fused_added[0], added[0]), "the added group was not stepped"
    assert_params_close(fused_all, torch_all)
    assert_states_close(fused, fused_all, torch_opt, torch_all)


def test_adagrad_state_of_an_added_group_is_filled_like_torch():
    # torch.optim.Adagrad fills state in its constructor; params added later get theirs on their
    # first step, filled with the constructor's initial_accumulator_value, not the group's.
    torch_params, torch_opt, fused_params, fused = twins(
        "Adagrad", {"lr": 0.1, "initial_accumulator_value": 0.3}
    )
    for opt, params in ((torch_opt, torch_params), (fused, fused_params)):
        extra = torch.nn.Parameter(torch.ones(4))
        opt.add_param_group({"params": [extra], "initial_accumulator_value": 1.5})
        params.append(extra)
    assert (fused_params[-1] in fused.state) == (torch_params[-1] in torch_opt.state)
    for opt, params in ((torch_opt, torch_params), (fused, fused_params)):
        train(opt, params, steps=3)
    assert float(fused.state[fused_params[-1]]["step"]) == 3.0
    assert_params_close(fused_params, torch_params)
    assert_states_close(fused, fused_params, torch_opt, torch_params)


@pytest.mark.parametrize("name", NAMES)
def test_params_without_grads_are_skipped(name):
    torch_params, torch_opt, fused_params, fused = twins(name, FULL_STATE_OPTIONS[name])
    frozen = fused_params[0].detach().clone()
    for opt, params in ((torch_opt, torch_params), (fused, fused_params)):
        for step in range(3):
            set_grads(params, step)
            params[0].grad = None
            opt.step()
    assert torch.equal(fused_params[0], frozen)
    assert_params_close(fused_params, torch_params)
    assert_states_close(fused, fused_params, torch_opt, torch_params)


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_fire_in_torch_order(name):
    events = {}
    for module in (torch.optim, fused_opt):
        params = make_params()
        opt = build(module, name, params, **FULL_STATE_OPTIONS[name])
        set_grads(params, 0)
        start = params[0].detach().clone()
        log = events[module] = []

        def record(tag):
            # Each hook notes whether the step has moved the params yet.
            def hook(hooked_opt, args, kwargs):
                log.append((tag, hooked_opt is opt, torch.equal(params[0], start)))

            return hook

        handles = [
            register_optimizer_step_pre_hook(record("global-pre")),
            register_optimizer_step_post_hook(record("global-post")),
            opt.register_step_pre_hook(record("pre")),
            opt.register_step_post_hook(record("post")),
        ]
        try:
            opt.step()
        finally:
            for handle in handles:
                handle.remove()
    assert events[fused_opt] == events[torch.optim]
    assert events[fused_opt] == [
        ("global-pre", True, True),
        ("pre", True, True),
        ("post", True, False),
        ("global-post", True, False),
    ]


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck on the ops, with the arguments the optimizers really pass


class _RecordFusedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fused_opt":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _recorded_op_call(name, options):
    """The op call of a fused_opt step on fp32 and bf16 params of several sizes, one empty."""
    params = make_params() + make_params([(3, 5), (0, 4)], dtype=torch.bfloat16, seed=3)
    opt = build(fused_opt, name, params, **options)
    # The second step: states hold real values and SGD's buffers are no longer first-step.
    train(opt, params, steps=1)
    set_grads(params, 1)
    with _RecordFusedOps() as recorder:
        opt.step()
    assert len(recorder.calls) == 1, "one op call per device"
    return recorder.calls[0]


OP_MODES = {
    "adam": ("Adam", {"weight_decay": 0.1}),
    "adam-amsgrad": ("Adam", {"amsgrad": True}),
    "adamw-amsgrad": ("AdamW", {"amsgrad": True}),
    "sgd": ("SGD", {"lr": 0.1}),
    "sgd-momentum": ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "rmsprop": ("RMSprop", {}),
    "rmsprop-centered": ("RMSprop", {"centered": True}),
    "rmsprop-momentum": ("RMSprop", {"momentum": 0.5}),
    "rmsprop-centered-momentum": ("RMSprop", {"centered": True, "momentum": 0.5}),
    "adagrad": ("Adagrad", {"lr_decay": 0.01}),
}


@pytest.mark.parametrize("lr_kind", ["float-lr", "tensor-lr"])
@pytest.mark.parametrize(("name", "options"), OP_MODES.values(), ids=OP_MODES.keys())
def test_opcheck(name, options, lr_kind):
    options = dict(options)
    if lr_kind == "tensor-lr":
        options["lr"] = torch.tensor(options.get("lr", 1e-2))
    op, args, kwargs = _recorded_op_call(name, options)
    assert [t is not None for t in kwargs["lr_tensor"]] == [lr_kind == "tensor-lr"]
    results = torch.library.opcheck(op, args, kwargs)
    assert results and all(outcome == "SUCCESS" for outcome in results.values()), results


@pytest.mark.parametrize("name", NAMES)
def test_float64_default_dtype(name):
    # torch.optim then keeps Adagrad's step counters in float64 on the CPU; the kernels keep
    # every counter in float32 beside its param, whatever the default dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        reference_params, reference, fused_params, fused = twins(
            name, FULL_STATE_OPTIONS[name], dtype=torch.float64
        )
        train(fused, fused_params, steps=3)
        train(reference, reference_params, steps=3)
    finally:
        torch.set_default_dtype(previous)
    assert_params_close(fused_params, reference_params, dtype=torch.float64)
    for p in fused_params:
        step = fused.state[p].get("step")
        assert step is None or step.dtype == torch.float32


@pytest.mark.parametrize("cls", [fused_opt.Adam, fused_opt.AdamW, fused_opt.SGD, fused_opt.RMSprop,
                                 fused_opt.Adagrad], ids=lambda cls: cls.__name__)
def test_every_class_documents_its_parameters_and_attributes(cls):
    """help(cls) is where a user looks first: every constructor argument and fused_opt's own
    attributes are listed in the class's own docstring, not only on Adam's."""
    doc = cls.__dict__["__doc__"]
    documented = set(re.findall(r"^        (\w+(?:, \w+)*):", doc, re.MULTILINE))
    names = {name for entry in documented for name in entry.split(", ")}
    parameters = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert parameters <= names, sorted(parameters - names)
    assert {"last_grad_norm", "last_step_skipped", "master_weights", "max_grad_norm"} <= names


def test_the_package_ships_py_typed():
    assert (Path(fused_opt.__file__).parent / "py.typed").is_file()
