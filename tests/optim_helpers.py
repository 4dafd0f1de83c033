"""Shared builders for the drop-in tests: twin optimizers on identical params, identical grads.

Every helper here builds the torch.optim and fused_opt sides the same way, so a difference the
tests find is a difference between the two libraries and not between their setups.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import ModuleType

import torch

import fused_opt
from config import tolerance

NAMES = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad")

# Options under which each optimizer creates every state key it has (and uses every term of its
# update), so round trips and comparisons cover the whole state.
FULL_STATE_OPTIONS = {
    "Adam": {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True},
    "AdamW": {"lr": 1e-2, "amsgrad": True},
    "SGD": {"lr": 1e-1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
    "RMSprop": {"lr": 1e-2, "momentum": 0.5, "centered": True, "weight_decay": 1e-2},
    "Adagrad": {
        "lr": 1e-1,
        "lr_decay": 1e-2,
        "weight_decay": 1e-2,
        "initial_accumulator_value": 0.1,
    },
}

# What fused_opt adds to torch.optim's param groups (with the defaults), and to the state of a
# param: SGD with momentum counts steps so that its kernel knows when to start the buffer.
FUSED_GROUP_DEFAULTS = {
    "master_weights": False,
    "max_grad_norm": None,
    "l1_decay": 0.0,
    "l1_mode": "subgradient",
    "state_dtype": None,
    "param_rounding": "nearest",
    "rounding_seed": 0,
}
FUSED_STATE_KEYS = {"SGD": ("step",)}


def as_torch_group(group: dict) -> dict:
    """A fused_opt param group (or defaults) without fused_opt's own options."""
    return {k: v for k, v in group.items() if k not in FUSED_GROUP_DEFAULTS}


def as_torch_state(name: str, state: dict) -> dict:
    """A fused_opt param state as torch.optim keeps it."""
    extra = FUSED_STATE_KEYS.get(name, ())
    return {k: v for k, v in state.items() if k not in extra}


# A matrix, a vector, an empty tensor and a tensor with a size-1 dimension.
SHAPES = ((4, 3), (5,), (0,), (2, 1, 3))
# Names of the SHAPES params when two_groups passes them as named params.
GROUP_NAMES = (("enc.weight", "enc.bias"), ("dec.weight", "dec.bias"))


def make_params(
    shapes=SHAPES, dtype=torch.float32, seed=0, device="cpu"
) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
        for s in shapes
    ]


def clone_params(params) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, step: int, seed: int = 1) -> None:
    """Gives every param a grad that depends only on (seed, step, position), never on values."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)


def resume_midway(name: str, options: dict, new_params, step_grads, steps: int, split: int):
    """Trains fused_opt's `name` on new_params() for `steps` steps straight, and on another
    new_params() for `split` steps, then from its state dict in a new optimizer for the rest;
    step_grads(params, step) sets the grads of a step. Returns (straight params, their optimizer),
    (resumed params, the new optimizer) and the state dict."""
    straight = new_params()
    run_straight = getattr(fused_opt, name)(straight, **options)
    resumed = new_params()
    first = getattr(fused_opt, name)(resumed, **options)
    for step in range(steps):
        step_grads(straight, step)
        run_straight.step()
        if step < split:
            step_grads(resumed, step)
            first.step()
    saved = copy.deepcopy(first.state_dict())
    second = getattr(fused_opt, name)(resumed, lr=1.0)
    second.load_state_dict(copy.deepcopy(saved))
    for step in range(split, steps):
        step_grads(resumed, step)
        second.step()
    return (straight, run_straight), (resumed, second), saved


def build(module, name: str, params, **options):
    # A tensor lr or beta is updated in place by schedulers: each optimizer gets its own copy.
    return getattr(module, name)(params, **copy.deepcopy(options))


def twins(name: str, options: dict, shapes=SHAPES, dtype=torch.float32):
    """(torch params, torch optimizer, fused params, fused optimizer) on equal initial params."""
    torch_params = make_params(shapes, dtype)
    fused_params = clone_params(torch_params)
    return (
        torch_params,
        build(torch.optim, name, torch_params, **options),
        fused_params,
        build(fused_opt, name, fused_params, **options),
    )


def two_groups(module, name: str, params, named: bool = False):
    """An optimizer over four params in two groups of two, the second at half the lr."""
    groups = [params[:2], params[2:]]
    if named:
        groups = [list(zip(names, group)) for names, group in zip(GROUP_NAMES, groups)]
    options = FULL_STATE_OPTIONS[name]
    return build(
        module,
        name,
        [{"params": groups[0]}, {"params": groups[1], "lr": options["lr"] / 2}],
        **options,
    )


def train(opt, params, steps, start: int = 0) -> None:
    for step in range(start, start + steps):
        set_grads(params, step)
        opt.step()


def assert_params_close(actual, expected, dtype=torch.float32) -> None:
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(
            a.detach(), e.detach(), **tolerance(dtype), msg=lambda m: f"param {index}: {m}"
        )


def assert_states_close(actual_opt, actual_params, expected_opt, expected_params) -> None:
    """Same state keys per param, same values, and step counters of the same dtype and device
    (fused_opt's beside the param, where torch's for-loop keeps CUDA params' counters on the
    CPU). Against torch.optim, the keys only fused_opt keeps are left out."""
    for index, (a, e) in enumerate(zip(actual_params, expected_params)):
        actual, expected = actual_opt.state.get(a, {}), expected_opt.state.get(e, {})
        if not isinstance(expected_opt, fused_opt.FusedOptimizer):
            actual = as_torch_state(type(expected_opt).__name__, actual)
        assert sorted(actual) == sorted(expected), f"state keys of param {index}"
        for key, value in expected.items():
            if key == "step":
                fused = isinstance(actual_opt, fused_opt.FusedOptimizer)
                device = a.device if fused else value.device
                assert actual[key].dtype == value.dtype, f"step dtype of param {index}"
                assert actual[key].device == device, f"step device of param {index}"
                assert actual[key].shape == value.shape, f"step shape of param {index}"
            assert actual[key].layout == value.layout, f"layout of {key!r} of param {index}"
            # Sparse results may differ only in the order of their (uncoalesced) entries.
            densify = (lambda t: t.to_dense()) if value.is_sparse else (lambda t: t)
            # The step's device is checked above; its value is compared where torch keeps it.
            actual_value = actual[key].to(value.device) if key == "step" else actual[key]
            torch.testing.assert_close(
                densify(actual_value),
                densify(value),
                **tolerance(a.dtype),
                msg=lambda m: f"state {key!r} of param {index}: {m}",
            )


def assert_same_tree(actual, expected, where: str = "value") -> None:
    """Equal nested dicts/lists/tuples whose tensors agree bit for bit in dtype, layout and value."""
    assert type(actual) is type(expected), where
    if torch.is_tensor(expected):
        assert (actual.dtype, actual.device, actual.layout, actual.shape) == (
            expected.dtype,
            expected.device,
            expected.layout,
            expected.shape,
        ), where
        assert torch.equal(actual.to_dense(), expected.to_dense()), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same_tree(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tree(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


def load_repo_script(relative_path: str) -> ModuleType:
    """A script of the repository (benchmarks/, examples/) as a module, without running its main."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
