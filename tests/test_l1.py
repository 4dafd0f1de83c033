"""L1 and elastic-net regularization (``l1_decay``, ``l1_mode``) in every optimizer.

subgradient: each step must be the step torch.optim takes on the autograd gradient of
``loss + l1_decay * p.abs().sum()``, and the float64 reference's. proximal: each step must be the
reference's (torch has no such mode), and must produce exact zeros that stay zero. Every state
tensor is compared after every step, in every dtype, with master weights, on the CPU kernels and
the emulated CUDA kernels.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import pytest
import torch
from torch import Tensor

import fused_opt
from optim_helpers import load_repo_script, make_params, set_grads
from reference import REFERENCES
from test_parity import GRID_SHAPES, LR, as_float64, assert_close, magnitude, random_params

STEPS = 8
# Powers of two for SGD's lr and for L1: plain SGD then computes a float32 master of 16-bit grads
# exactly, as the float64 reference does. With lr = 0.1, a master that the reference has at
# exactly zero (coarse 16-bit grads cancel) sat 1e-9 off it, took the subgradient of the other
# sign and moved lr * L1 away.
LR = {**LR, "SGD": 0.125}
L1 = 0.0625
# A 16-bit param (without a master) sits up to half an ulp from the reference's float64 one, so one
# within that of zero may take the other sign and get the other subgradient, +-L1: exp_avg then
# differs by (1 - beta1) * 2 * L1 for a while. The L1 of those runs keeps that inside the 16-bit
# tolerances, and still moves states by several times them over the steps.
L1_16BIT = 2**-8
WEIGHT_DECAY = 0.1
MODES = ("subgradient", "proximal")

# Per optimizer: its plain form, and its richest forms with weight decay (elastic net).
OPTIONS = {
    "Adam": [
        {},
        {"amsgrad": True, "weight_decay": WEIGHT_DECAY},
        {"decoupled_weight_decay": True, "weight_decay": WEIGHT_DECAY, "maximize": True},
    ],
    "AdamW": [{"weight_decay": WEIGHT_DECAY, "amsgrad": True}],
    "SGD": [
        {},
        {"momentum": 0.9, "dampening": 0.3, "weight_decay": WEIGHT_DECAY},
        {"momentum": 0.9, "nesterov": True, "maximize": True},
    ],
    "RMSprop": [{}, {"centered": True, "momentum": 0.9, "weight_decay": WEIGHT_DECAY}],
    "Adagrad": [
        {},
        {"lr_decay": 0.1, "weight_decay": WEIGHT_DECAY, "initial_accumulator_value": 0.5},
    ],
}
NAMES = list(OPTIONS)


def options_id(options: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in options.items()) or "defaults"


CASES = [
    pytest.param(name, options, id=f"{name}-{options_id(options)}")
    for name, option_list in OPTIONS.items()
    for options in option_list
]
DTYPES = [
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.float64, False, id="fp64"),
    pytest.param(torch.bfloat16, False, id="bf16"),
    pytest.param(torch.float16, False, id="fp16"),
    pytest.param(torch.bfloat16, True, id="bf16-master"),
    pytest.param(torch.float16, True, id="fp16-master"),
]


def params_with_zeros(dtype: torch.dtype, seed: int) -> list[Tensor]:
    """GRID_SHAPES (odd sizes, one across chunk boundaries, an empty one) with every fifth
    element exactly zero, where the subgradient is 0."""
    params = random_params(GRID_SHAPES, dtype, seed)
    for p in params:
        p.view(-1)[::5] = 0
    return params


def random_grad(t: Tensor, generator: torch.Generator) -> Tensor:
    """Random signs, magnitudes in [0.5, 1.5] (see test_parity.random_grad)."""
    size = 0.5 + torch.rand(t.shape, generator=generator, dtype=torch.float64)
    sign = torch.randint(0, 2, t.shape, generator=generator, dtype=torch.float64) * 2 - 1
    return (sign * size).to(t.dtype)


class L1Run:
    """fused_opt with L1 beside the float64 reference and, in subgradient mode, torch.optim
    stepping on the autograd gradient of ``loss + l1 * p.abs().sum()``.

    With master weights, fused_opt keeps 16-bit params and float32 masters; torch.optim then runs
    in float32 on the same (upcast) grads, as the masters' own optimizer."""

    def __init__(self, name: str, initial: list[Tensor], master: bool, l1_mode: str,
                 l1_decay: float = L1, **options: Any):
        self.name, self.master, self.l1_mode, self.l1_decay = name, master, l1_mode, l1_decay
        self.dtype = torch.float32 if master else initial[0].dtype
        self.maximize = options.get("maximize", False)
        options = {"lr": LR[name], **options}
        self.fused_params = [torch.nn.Parameter(t.clone()) for t in initial]
        self.fused = getattr(fused_opt, name)(
            self.fused_params, l1_decay=l1_decay, l1_mode=l1_mode, master_weights=master,
            **options,
        )
        self.torch_params = [torch.nn.Parameter(t.to(self.dtype, copy=True)) for t in initial]
        self.torch = (
            getattr(torch.optim, name)(self.torch_params, foreach=False, **options)
            if l1_mode == "subgradient"
            else None
        )
        self.ref_params = [as_float64(t).numpy().copy() for t in initial]
        self.ref_states: list[dict[str, Any]] = [{} for _ in initial]
        self.ref_options = {**options, "l1_decay": l1_decay, "l1_mode": l1_mode}

    def step(self, generator: torch.Generator) -> None:
        grads = [random_grad(p, generator) for p in self.fused_params]
        for p, grad in zip(self.fused_params, grads):
            p.grad = grad.clone()
        if self.torch is not None:
            # The objective whose gradient is `grad` for the weights, with the L1 penalty that
            # shrinks them: added to a loss, subtracted from an objective that is maximized (as
            # weight decay shrinks weights under maximize too).
            penalty = -self.l1_decay if self.maximize else self.l1_decay
            self.torch.zero_grad()
            with torch.enable_grad():
                loss = sum(
                    (p * grad.to(self.dtype)).sum() + penalty * p.abs().sum()
                    for p, grad in zip(self.torch_params, grads)
                )
                loss.backward()
            self.torch.step()
        for param, grad, state in zip(self.ref_params, grads, self.ref_states):
            REFERENCES[self.name](param, as_float64(grad).numpy(), state, **self.ref_options)
        self.fused.step()

    def updated(self, p: Tensor) -> Tensor:
        """What the update math updated: the master of a 16-bit param under master weights."""
        return self.fused.state[p]["master_param"] if self.master else p

    def check(self, when: str) -> None:
        dtype = self.dtype
        param_scale = magnitude(self.ref_params_as_tensors())
        for index, (p, ref_p, ref_state) in enumerate(
            zip(self.fused_params, self.ref_params, self.ref_states)
        ):
            where = f"{when}, param {index} {tuple(p.shape)}"
            updated = self.updated(p)
            assert_close(updated, ref_p, dtype, f"param vs reference, {where}", param_scale)
            if self.master:
                assert torch.equal(p.detach(), updated.to(p.dtype)), f"16-bit param, {where}"
            state = self.fused.state[p]
            for key, ref_value in ref_state.items():
                what = f"state[{key!r}], {where}"
                if key == "step":
                    assert state["step"].item() == ref_value, what
                    continue
                scale = magnitude([torch.from_numpy(s[key]) for s in self.ref_states])
                assert state[key].dtype == dtype, what
                assert_close(state[key], ref_value, dtype, f"{what} vs reference", scale)
            if self.torch is None:
                continue
            torch_p = self.torch_params[index]
            torch_state = self.torch.state[torch_p]
            assert_close(updated, torch_p, dtype, f"param vs torch autograd, {where}", param_scale)
            for key, torch_value in torch_state.items():
                what = f"state[{key!r}], {where}"
                if key == "step":
                    assert state["step"].item() == torch_value.item(), what
                    continue
                scale = magnitude([self.torch.state[q][key] for q in self.torch_params])
                assert_close(state[key], torch_value, dtype, f"{what} vs torch autograd", scale)

    def ref_params_as_tensors(self) -> list[Tensor]:
        return [torch.from_numpy(p) for p in self.ref_params]


@pytest.mark.parametrize("l1_mode", MODES)
@pytest.mark.parametrize("dtype, master", DTYPES)
@pytest.mark.parametrize("name, options", CASES)
def test_steps_match_autograd_and_reference(name, options, dtype, master, l1_mode, kernels):
    l1_decay = L1 if master or dtype.itemsize > 2 else L1_16BIT
    run = L1Run(name, params_with_zeros(dtype, seed=11), master, l1_mode, l1_decay, **options)
    generator = torch.Generator().manual_seed(12)
    for step in range(1, STEPS + 1):
        run.step(generator)
        run.check(f"after step {step}")
    if l1_mode == "proximal":
        # Elements inside the threshold band land on exact zeros.
        zeros = sum(int((run.updated(p) == 0).sum()) for p in run.fused_params)
        assert zeros > 0


@pytest.mark.parametrize("name", NAMES)
def test_proximal_zeros_are_exact_and_stay_zero(name, kernels):
    """Gradients smaller than l1_decay can never move a zero weight: its update stays inside the
    threshold (|update| <= lr_eff * |grad|, with the same lr_eff in both). Without momentum,
    every weight then shrinks to exactly zero and stays there."""
    l1_decay = 1.0
    initial = [t * 0.05 for t in random_params([(1031,), (3, 7, 5), (0,)], torch.float32, 21)]
    params = [torch.nn.Parameter(t) for t in initial]
    opt = getattr(fused_opt, name)(params, lr=LR[name], l1_decay=l1_decay, l1_mode="proximal")
    generator = torch.Generator().manual_seed(22)
    was_zero = [torch.zeros(p.shape, dtype=torch.bool) for p in params]
    for _ in range(60):
        for p in params:
            p.grad = random_grad(p, generator) * 0.6  # |grad| <= 0.9 < l1_decay
        opt.step()
        for p, zero in zip(params, was_zero):
            assert bool((p.detach()[zero] == 0).all()), "a zero weight moved"
            zero |= p.detach() == 0
    for index, p in enumerate(params):
        assert bool((p == 0).all()), f"param {index}: {int((p != 0).sum())} nonzero weights left"
        # The kernels subtract the clamped weight, which leaves +0 where sign(w) * 0 is -0.
        assert not bool(torch.signbit(p).any()), f"param {index}: -0 in place of +0"


@pytest.mark.parametrize("l1_mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_zero_l1_decay_is_the_step_without_l1(name, l1_mode, kernels):
    """l1_decay = 0 runs the loops compiled without L1: the same bits as no L1 keyword at all."""
    runs = []
    for keywords in ({}, {"l1_decay": 0.0, "l1_mode": l1_mode}):
        params = make_params(seed=31)
        opt = getattr(fused_opt, name)(params, lr=LR[name], **keywords)
        for step in range(3):
            set_grads(params, step)
            opt.step()
        runs.append((params, opt))
    (plain, plain_opt), (zero, zero_opt) = runs
    for index, (a, b) in enumerate(zip(plain, zero)):
        assert torch.equal(a, b), f"param {index}"
        for key, value in plain_opt.state[a].items():
            assert torch.equal(zero_opt.state[b][key], value), f"state[{key!r}] of param {index}"


@pytest.mark.parametrize("name", NAMES)
def test_groups_with_every_l1_mode_in_one_step(name, kernels):
    """Groups without L1, with subgradient and with proximal L1 step together (on CUDA, in
    separate launches), each as its own reference says, states included."""
    modes = [(0.0, "subgradient"), (L1, "subgradient"), (2 * L1, "proximal")]
    initial = [params_with_zeros(torch.float32, seed=41 + g) for g in range(len(modes))]
    groups = [[torch.nn.Parameter(t.clone()) for t in init] for init in initial]
    opt = getattr(fused_opt, name)(
        [{"params": ps, "l1_decay": l1, "l1_mode": mode} for ps, (l1, mode) in zip(groups, modes)],
        lr=LR[name],
    )
    refs = [[as_float64(t).numpy().copy() for t in init] for init in initial]
    ref_states = [[{} for _ in init] for init in initial]
    generator = torch.Generator().manual_seed(44)
    for step in range(1, 5):
        for ps, ref_ps, states, (l1, mode) in zip(groups, refs, ref_states, modes):
            for p, ref_p, state in zip(ps, ref_ps, states):
                p.grad = random_grad(p, generator)
                REFERENCES[name](ref_p, as_float64(p.grad).numpy(), state, lr=LR[name],
                                 l1_decay=l1, l1_mode=mode)
        opt.step()
        for g, (ps, ref_ps, states) in enumerate(zip(groups, refs, ref_states)):
            scale = magnitude([torch.from_numpy(r) for r in ref_ps])
            for index, (p, ref_p, ref_state) in enumerate(zip(ps, ref_ps, states)):
                where = f"step {step}, group {g}, param {index}"
                assert_close(p, ref_p, torch.float32, f"param, {where}", scale)
                for key, value in ref_state.items():
                    if key == "step":
                        assert opt.state[p]["step"].item() == value, where
                    else:
                        assert_close(opt.state[p][key], value, torch.float32,
                                     f"state[{key!r}], {where}", magnitude([opt.state[p][key]]))


@pytest.mark.parametrize("l1_mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_skipped_step_changes_nothing(name, l1_mode, kernels):
    params = make_params(dtype=torch.bfloat16, seed=51)
    opt = getattr(fused_opt, name)(params, lr=LR[name], l1_decay=L1, l1_mode=l1_mode,
                                   master_weights=True)
    scaler = fused_opt.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # makes the scale tensor, as the first scaled loss does
    for step in range(3):
        set_grads(params, step)
        for p in params:
            p.grad.mul_(scaler.get_scale())
        if step == 2:
            params[0].grad.view(-1)[0] = math.inf
            before = [
                (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                for p in params
            ]
        scaler.step(opt)
        scaler.update()
    for index, (p, (param_before, state_before)) in enumerate(zip(params, before)):
        assert torch.equal(p, param_before), f"param {index}"
        for key, value in state_before.items():
            assert torch.equal(opt.state[p][key], value), f"state[{key!r}] of param {index}"


# ------------------------------------------------------------------------------------------------
# Options: validation, sparse grads, state dicts


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "keywords, message",
    [
        ({"l1_decay": -0.1}, "Invalid l1_decay value: -0.1"),
        ({"l1_decay": math.nan}, "Invalid l1_decay value: nan"),
        ({"l1_mode": "lasso"}, "Invalid l1_mode value: 'lasso'"),
    ],
    ids=["negative", "nan", "unknown-mode"],
)
def test_constructor_refuses_bad_l1(name, keywords, message):
    with pytest.raises(ValueError, match=message):
        getattr(fused_opt, name)(make_params(), **keywords)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_sparse_grads_with_l1_are_refused_before_anything_changes(name):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    linear = torch.nn.Linear(4, 1)
    opt = getattr(fused_opt, name)(
        [{"params": linear.parameters()}, {"params": embedding.parameters(), "l1_decay": 0.1}],
        lr=0.1,
    )
    linear(embedding(torch.tensor([1, 2, 3]))).sum().backward()
    before = [p.detach().clone() for p in (*embedding.parameters(), *linear.parameters())]
    with pytest.raises(RuntimeError, match=r"param_groups\[1\] has l1_decay=0.1") as excinfo:
        opt.step()
    assert "sparse grad" in str(excinfo.value)
    after = [p.detach() for p in (*embedding.parameters(), *linear.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert not opt.state or all(
        s.get("step") is None or s["step"].item() == 0 for s in opt.state.values()
    )


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keeps_l1_of_the_groups_that_use_it(name):
    params = make_params()
    opt = getattr(fused_opt, name)(
        [{"params": params[:2]}, {"params": params[2:], "l1_decay": 0.2, "l1_mode": "proximal"}],
        lr=LR[name],
    )
    train_steps = 2
    for step in range(train_steps):
        set_grads(params, step)
        opt.step()
    saved = opt.state_dict()
    # A group without L1 has torch.optim's keys only.
    assert "l1_decay" not in saved["param_groups"][0] and "l1_mode" not in saved["param_groups"][0]
    assert saved["param_groups"][1]["l1_decay"] == 0.2
    assert saved["param_groups"][1]["l1_mode"] == "proximal"

    # Into an optimizer whose defaults have L1: the saved groups keep what they had.
    other = getattr(fused_opt, name)(
        [{"params": make_params()[:2]}, {"params": make_params()[2:]}], l1_decay=0.7
    )
    other.load_state_dict(saved)
    assert [(g["l1_decay"], g["l1_mode"]) for g in other.param_groups] == [
        (0.0, "subgradient"), (0.2, "proximal")
    ]

    # torch.optim loads it too, and keeps the keys it ignores.
    twin = getattr(torch.optim, name)([{"params": make_params()[:2]}, {"params": make_params()[2:]}])
    twin.load_state_dict(saved)
    assert twin.param_groups[1]["l1_decay"] == 0.2

    # A torch.optim checkpoint had no L1.
    fused = getattr(fused_opt, name)(make_params(), l1_decay=0.3, l1_mode="proximal")
    reference = getattr(torch.optim, name)(make_params())
    fused.load_state_dict(reference.state_dict())
    assert fused.param_groups[0]["l1_decay"] == 0.0
    assert fused.param_groups[0]["l1_mode"] == "subgradient"



def test_the_sparse_regression_example_recovers_the_support_only_by_proximal_steps(
    tmp_path, monkeypatch
):
    example = load_repo_script("examples/sparse_regression.py")
    output = tmp_path / "sparse-regression.md"
    monkeypatch.setattr(sys, "argv", ["sparse_regression.py", "--output", str(output)])
    example.main()
    rows = {
        cells[0]: cells[1:]
        for cells in (line.strip("| ").split(" | ") for line in output.read_text().splitlines())
        if cells[0] in example.RUNS
    }
    assert list(rows) == list(example.RUNS)
    for name, (loss, error, zeros, recovered) in rows.items():
        proximal = example.RUNS[name].get("l1_mode") == "proximal"
        assert math.isfinite(float(loss)) and math.isfinite(float(error))
        # Exact zeros come from soft-thresholding alone, and there they are the true support's
        # complement: 980 of the 1,000 weights.
        expected_zeros = example.FEATURES - example.NONZERO if proximal else 0
        assert zeros.endswith(f"({expected_zeros})"), name
        assert recovered == ("yes" if proximal else "no"), name
    # The penalty that recovers the support also lands far nearer the true weights.
    assert float(rows["L1 proximal"][1]) < float(rows["no penalty"][1]) / 10


def test_the_l1_cost_script_tables_both_modes_of_every_optimizer(tmp_path, monkeypatch):
    cost = load_repo_script("benchmarks/l1_cost.py")
    # The script sets its own thread count; the tests after this one keep theirs.
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    monkeypatch.setattr(sys, "argv", ["l1_cost.py", "--numel", "5000", "--rounds", "2",
                                      "--steps", "1", "--output", str(tmp_path)])
    cost.main()
    rows = [line.strip("| ").split(" | ") for line in
            (tmp_path / "cost-cpu-wall.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| case")]
    assert [(case, variant) for case, variant, *_ in rows] == [
        (case, variant) for case in cost.CASES for variant in cost.VARIANTS
    ]
    for case, variant, ms, ratio in rows:
        assert float(ms) >= 0
        if variant == "none":
            assert ratio == "1.00x"
        else:
            assert float(ratio.split("x")[0]) > 0
    records = [json.loads(line) for line in (tmp_path / "cost-cpu.jsonl").read_text().splitlines()]
    assert [(record["case"], record["l1"]) for record in records] == [tuple(row[:2]) for row in rows]
    for record in records:
        assert record["numel"] == 5000 and record["ms_median"] > 0
        assert record["ratio_min"] <= record["ratio_median"] <= record["ratio_max"]
    # A run on more threads is reported beside the one-thread run, not over it.
    monkeypatch.setattr(sys, "argv", ["l1_cost.py", "--numel", "5000", "--rounds", "1",
                                      "--steps", "1", "--threads", "2", "--output", str(tmp_path)])
    cost.main()
    assert "2 thread(s)" in (tmp_path / "cost-cpu-wall-2-threads.md").read_text()
    assert "1 thread(s)" in (tmp_path / "cost-cpu-wall.md").read_text()
