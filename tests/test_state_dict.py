"""Checkpoints: fused_opt and torch.optim state dicts are interchangeable, and bad ones are refused
before anything is loaded."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fused_opt
from devices import requires_cuda_kernels
from optim_helpers import (
    as_torch_group,
    as_torch_state,
    FULL_STATE_OPTIONS,
    GROUP_NAMES,
    NAMES,
    assert_params_close,
    assert_same_tree,
    assert_states_close,
    build,
    clone_params,
    make_params,
    train,
    two_groups,
)

MODULES = {"torch": torch.optim, "fused": fused_opt}
BEFORE, AFTER = 4, 5  # steps before the checkpoint and after it


def _trained(module, name, steps=BEFORE, device="cpu"):
    params = make_params(device=device)
    opt = build(module, name, params, **FULL_STATE_OPTIONS[name])
    train(opt, params, steps)
    return params, opt


@pytest.mark.parametrize(
    "direction, device",
    [
        ("torch-to-fused", "cpu"),
        ("fused-to-torch", "cpu"),
        # torch's CUDA for-loop keeps step counters on the CPU, fused_opt beside the params.
        pytest.param("torch-to-fused", "cuda", marks=requires_cuda_kernels),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_moves_between_torch_and_fused(name, direction, device):
    source_module, target_module = (MODULES[side] for side in direction.split("-to-"))
    reference_params, reference = _trained(torch.optim, name, BEFORE + AFTER, device)

    source_params, source = _trained(source_module, name, device=device)
    target_params = clone_params(source_params)
    target = build(target_module, name, target_params, **FULL_STATE_OPTIONS[name])
    # load_state_dict keeps the given tensors (torch's does too), so a checkpoint shared with the
    # still-training source must be a copy, as one read back from disk is.
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    # Both continue from the checkpoint: the target from what it loaded, the source from its own.
    for opt, params in ((source, source_params), (target, target_params)):
        train(opt, params, AFTER, start=BEFORE)
        assert_params_close(params, reference_params)
        assert_states_close(opt, params, reference, reference_params)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_matches_torch(name):
    _, fused = _trained(fused_opt, name)
    _, reference = _trained(torch.optim, name)
    fused_dict, reference_dict = fused.state_dict(), reference.state_dict()
    assert [as_torch_group(g) for g in fused_dict["param_groups"]] == reference_dict["param_groups"]
    assert fused_dict["state"].keys() == reference_dict["state"].keys()
    for index, expected in reference_dict["state"].items():
        actual = as_torch_state(name, fused_dict["state"][index])
        assert actual.keys() == expected.keys(), f"state keys of param {index}"
        for key, value in expected.items():
            assert (actual[key].dtype, actual[key].device, actual[key].shape) == (
                value.dtype,
                value.device,
                value.shape,
            ), f"state {key!r} of param {index}"
        if "step" in expected:
            assert actual["step"].dtype == torch.float32 and actual["step"].dim() == 0


def _save_and_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    # weights_only (torch's default) proves the checkpoint holds no pickled Python objects.
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_torch_save_and_load_round_trip(name, device):
    uninterrupted_params, uninterrupted = _trained(fused_opt, name, BEFORE + AFTER, device)
    saved_params, saved = _trained(fused_opt, name, device=device)
    loaded_dict = _save_and_load(saved.state_dict())
    assert_same_tree(loaded_dict, saved.state_dict())

    params = clone_params(saved_params)
    opt = build(fused_opt, name, params, **FULL_STATE_OPTIONS[name])
    opt.load_state_dict(loaded_dict)
    train(opt, params, AFTER, start=BEFORE)
    # Same kernels on the same inputs: resuming must be bitwise invisible.
    assert_same_tree([p.detach() for p in params], [p.detach() for p in uninterrupted_params])
    assert_same_tree(opt.state_dict(), uninterrupted.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_continues_identically_and_independently(name):
    params, opt = _trained(fused_opt, name)
    params_copy, opt_copy = copy.deepcopy((params, opt))
    assert type(opt_copy) is type(opt)
    assert opt_copy.param_groups[0]["params"][0] is params_copy[0]

    original = copy.deepcopy(([p.detach() for p in params], opt.state_dict()))
    train(opt_copy, params_copy, AFTER, start=BEFORE)
    assert_same_tree(([p.detach() for p in params], opt.state_dict()), original)

    train(opt, params, AFTER, start=BEFORE)
    assert_same_tree([p.detach() for p in params_copy], [p.detach() for p in params])
    assert_same_tree(opt_copy.state_dict(), opt.state_dict())


# ------------------------------------------------------------------------------------------------
# Mismatched state dicts

# One state key of each optimizer (under FULL_STATE_OPTIONS), to corrupt or remove.
STATE_KEY = {
    "Adam": "exp_avg_sq",
    "AdamW": "max_exp_avg_sq",
    "SGD": "momentum_buffer",
    "RMSprop": "grad_avg",
    "Adagrad": "sum",
}
# The param every corruption targets: the last of the last group, flat index 3 in the state dict.
GROUP, INDEX, FLAT_INDEX = 1, 1, 3


def _corrupt_shape(state_dict, name):
    state_dict["state"][FLAT_INDEX][STATE_KEY[name]] = torch.zeros(6)


def _drop_key(state_dict, name):
    del state_dict["state"][FLAT_INDEX][STATE_KEY[name]]


def _drop_step(state_dict, name):
    del state_dict["state"][FLAT_INDEX]["step"]


def _extra_group(state_dict, name):
    state_dict["param_groups"].append(copy.deepcopy(state_dict["param_groups"][GROUP]))


def _missing_group(state_dict, name):
    del state_dict["param_groups"][GROUP]


def _missing_param(state_dict, name):
    group = state_dict["param_groups"][GROUP]
    group["params"] = group["params"][:INDEX]
    if "param_names" in group:
        group["param_names"] = group["param_names"][:INDEX]


def _replace_state(key_of, value):
    def corrupt(state_dict, name):
        state_dict["state"][FLAT_INDEX][key_of(name)] = value

    return corrupt


def _state_key(name):
    return STATE_KEY[name]


def _step_key(name):
    return "step"


PER_PARAM = {
    "state-shape": _corrupt_shape,
    "missing-state-key": _drop_key,
    "missing-step": _drop_step,
    "state-not-a-tensor": _replace_state(_state_key, [0.0] * 6),
    "state-of-int-dtype": _replace_state(_state_key, torch.zeros((2, 1, 3), dtype=torch.int64)),
    "step-a-string": _replace_state(_step_key, "three"),
    "step-of-shape-2": _replace_state(_step_key, torch.tensor([2.0, 2.0])),
    "step-a-bool-tensor": _replace_state(_step_key, torch.tensor(True)),
}
PER_GROUP = {
    "extra-group": _extra_group,
    "missing-group": _missing_group,
    "missing-param": _missing_param,
}

# SGD saves no step, and a missing momentum buffer is legal (see the SGD test below).
_NOT_APPLICABLE = {("SGD", "missing-step"), ("SGD", "missing-state-key")}
MISMATCHES = [
    pytest.param(name, corrupt, kind in PER_PARAM, named, id=f"{name}-{kind}-{naming}")
    for kind, corrupt in {**PER_PARAM, **PER_GROUP}.items()
    for name in NAMES
    if (name, kind) not in _NOT_APPLICABLE
    for named, naming in ((False, "unnamed"), (True, "named"))
]


def _trained_two_groups(module, name, named=False, params=None):
    params = make_params() if params is None else params
    opt = two_groups(module, name, params, named)
    train(opt, params, 2)
    return opt


def _assert_refused_and_usable(name, opt, params, state_dict, named=False):
    """Loading state_dict into opt (trained 2 steps on params) raises a ValueError and changes
    nothing: the optimizer then trains on bit for bit as a twin that was never handed it."""
    before = copy.deepcopy((opt.state_dict(), opt.param_groups, [p.detach() for p in params]))
    with pytest.raises(ValueError) as excinfo:
        opt.load_state_dict(state_dict)
    assert_same_tree((opt.state_dict(), opt.param_groups, [p.detach() for p in params]), before)

    twin_params = make_params()
    twin = _trained_two_groups(fused_opt, name, named, twin_params)
    train(opt, params, 2, start=2)
    train(twin, twin_params, 2, start=2)
    assert_same_tree([p.detach() for p in params], [p.detach() for p in twin_params])
    assert_same_tree(opt.state_dict(), twin.state_dict())
    return str(excinfo.value)


@pytest.mark.parametrize(("name", "corrupt", "names_param", "named"), MISMATCHES)
def test_mismatched_state_dict_is_refused_and_changes_nothing(name, corrupt, names_param, named):
    params = make_params()
    opt = _trained_two_groups(fused_opt, name, named, params)
    state_dict = copy.deepcopy(opt.state_dict())
    corrupt(state_dict, name)

    message = _assert_refused_and_usable(name, opt, params, state_dict, named)

    if names_param:
        label = (
            f"param '{GROUP_NAMES[GROUP][INDEX]}'"
            if named
            else f"param_groups[{GROUP}]['params'][{INDEX}]"
        )
        assert label in message and f"state[{FLAT_INDEX}]" in message, message


@pytest.mark.parametrize("corrupt", PER_GROUP.values(), ids=PER_GROUP.keys())
@pytest.mark.parametrize("name", NAMES)
def test_torch_also_refuses_mismatched_groups(name, corrupt):
    # fused_opt checks group sizes before torch does; torch must refuse the same dicts, or
    # fused_opt would reject checkpoints torch accepts.
    reference = _trained_two_groups(torch.optim, name)
    state_dict = copy.deepcopy(reference.state_dict())
    corrupt(state_dict, name)
    with pytest.raises(ValueError):
        reference.load_state_dict(state_dict)


# Group values a checkpoint of this optimizer cannot have: (key, value, words of the message).
BAD_GROUP_VALUES = {
    "lr-none": ("lr", None, "param_groups[1]['lr']"),
    "lr-of-two-elements": ("lr", torch.tensor([0.1, 0.1]), "param_groups[1]['lr']"),
    "weight_decay-a-string": ("weight_decay", "0.1", "param_groups[1]['weight_decay']"),
}


@pytest.mark.parametrize("corruption", BAD_GROUP_VALUES)
@pytest.mark.parametrize("name", NAMES)
def test_bad_group_value_is_refused_and_changes_nothing(name, corruption):
    key, value, words = BAD_GROUP_VALUES[corruption]
    params = make_params()
    opt = _trained_two_groups(fused_opt, name, params=params)
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["param_groups"][GROUP][key] = value
    message = _assert_refused_and_usable(name, opt, params, state_dict)
    assert words in message, message


# A checkpoint of another optimizer, and what the target's groups have that its groups lack.
OTHER_OPTIMIZERS = {
    "SGD": ("Adam", ("momentum", "dampening")),
    "Adam": ("SGD", ("betas", "eps")),
    "AdamW": ("RMSprop", ("betas",)),
    "RMSprop": ("Adagrad", ("alpha",)),
    "Adagrad": ("SGD", ("lr_decay", "eps", "initial_accumulator_value")),
}


@pytest.mark.parametrize("name", NAMES)
def test_another_optimizers_state_dict_is_refused_and_changes_nothing(name):
    # torch.optim loads it and fails in the next step (an Adam state dict in SGD: KeyError
    # 'momentum'); fused_opt says so before loading anything.
    source, lacking = OTHER_OPTIMIZERS[name]
    state_dict = copy.deepcopy(_trained_two_groups(torch.optim, source).state_dict())
    params = make_params()
    opt = _trained_two_groups(fused_opt, name, params=params)
    message = _assert_refused_and_usable(name, opt, params, state_dict)
    assert "param_groups[0]" in message and all(repr(key) in message for key in lacking), message


def test_sgd_checkpoint_without_momentum_buffer_loads_like_torch():
    # torch's SGD starts a missing buffer afresh on the next step, so such a checkpoint is valid.
    results = {}
    for key, module in MODULES.items():
        params, opt = _trained(module, "SGD", steps=2)
        state_dict = copy.deepcopy(opt.state_dict())
        del state_dict["state"][1]["momentum_buffer"]
        resumed_params = clone_params(params)
        resumed = build(module, "SGD", resumed_params, **FULL_STATE_OPTIONS["SGD"])
        resumed.load_state_dict(state_dict)
        train(resumed, resumed_params, 3, start=2)
        results[key] = (resumed_params, resumed)
    (fused_params, fused), (torch_params, reference) = results["fused"], results["torch"]
    assert_params_close(fused_params, torch_params)
    assert_states_close(fused, fused_params, reference, torch_params)


def test_torch_sgd_buffer_in_the_grads_layout_loads_into_the_params_layout():
    # torch.optim.SGD clones its first grad into the momentum buffer, so a hand-set contiguous
    # grad on a transposed param gives a buffer whose strides differ from the param's.
    torch.manual_seed(3)
    weights = [torch.nn.Parameter(torch.randn(5, 7).t()) for _ in range(2)]
    torch_opt = torch.optim.SGD([weights[0]], lr=0.1, momentum=0.9)
    weights[0].grad = torch.randn(7, 5)
    torch_opt.step()
    assert torch_opt.state[weights[0]]["momentum_buffer"].stride() != weights[0].stride()

    with torch.no_grad():
        weights[1].copy_(weights[0])
    fused = fused_opt.SGD([weights[1]], lr=0.1, momentum=0.9)
    fused.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    grad = torch.randn(7, 5)
    for w in weights:
        w.grad = grad.clone()
    torch_opt.step()
    fused.step()
    torch.testing.assert_close(weights[1], weights[0])
    torch.testing.assert_close(
        fused.state[weights[1]]["momentum_buffer"], torch_opt.state[weights[0]]["momentum_buffer"]
    )
