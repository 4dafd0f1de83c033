"""What one step costs beyond its arithmetic: no memory after the first step, one op per group."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fused_opt

# Options that give each optimizer every state tensor it can have.
RICH = {
    "Adam": {"amsgrad": True, "weight_decay": 0.1},
    "AdamW": {"amsgrad": True},
    "SGD": {"momentum": 0.9, "weight_decay": 0.1},
    "RMSprop": {"centered": True, "momentum": 0.9},
    "Adagrad": {"lr_decay": 0.1},
}


def mixed_params():
    """fp32, bf16, fp64 and complex params with grads, in one group."""
    params = [
        torch.nn.Parameter(torch.randn(1031)),
        torch.nn.Parameter(torch.randn(7, 5, dtype=torch.bfloat16)),
        torch.nn.Parameter(torch.randn(65537, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(9, dtype=torch.complex64)),
        torch.nn.Parameter(torch.randn(0)),
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def profile_step(optimizer):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer.step()
    return prof.events()


@pytest.mark.parametrize("name", list(RICH))
def test_no_memory_is_allocated_after_the_first_step(name):
    optimizer = getattr(fused_opt, name)(mixed_params(), **RICH[name])
    optimizer.step()
    events = profile_step(optimizer)
    allocations = [(e.name, e.cpu_memory_usage) for e in events if e.cpu_memory_usage > 0]
    assert allocations == []


def test_the_memory_probe_sees_allocations():
    # torch's for-loop allocates temporaries every step; the probe above must notice such a thing.
    optimizer = torch.optim.Adam(mixed_params(), foreach=False, **RICH["Adam"])
    optimizer.step()
    assert any(e.cpu_memory_usage > 0 for e in profile_step(optimizer))


@pytest.mark.parametrize("name", list(RICH))
def test_one_op_call_for_all_param_groups(name):
    groups = [
        {"params": mixed_params(), "weight_decay": 0.0},
        {"params": mixed_params(), "lr": 1e-4},
        {"params": mixed_params(), "lr": torch.tensor(1e-3)},
    ]
    optimizer = getattr(fused_opt, name)(groups, **RICH[name])
    optimizer.step()
    op_calls = [e.name for e in profile_step(optimizer) if e.name.startswith("fused_opt::")]
    assert len(op_calls) == 1, op_calls


# A group option that changes which state tensors exist, or a bool of the op.
SPLITTING_OPTIONS = {
    "Adam": {"amsgrad": False},
    "AdamW": {"maximize": True},
    "SGD": {"momentum": 0.0},
    "RMSprop": {"centered": False},
    "Adagrad": {"maximize": True},
}


@pytest.mark.parametrize("name", list(RICH))
def test_groups_that_differ_in_a_mode_take_one_op_call_each(name):
    assert SPLITTING_OPTIONS[name].items() - RICH[name].items(), "the option must differ"
    groups = [{"params": mixed_params()}, {"params": mixed_params(), **SPLITTING_OPTIONS[name]}]
    optimizer = getattr(fused_opt, name)(groups, **RICH[name])
    optimizer.step()
    op_calls = [e.name for e in profile_step(optimizer) if e.name.startswith("fused_opt::")]
    assert len(op_calls) == 2, op_calls
