"""The step plan (fused_opt/_plan.py): a step that reuses the last step's plan must do exactly
what a step without one does, whatever changed in between.

Each test runs the same script of steps and changes on two copies of one optimizer: one steps
as users get it, the other never uses a plan (its full path every step), and after every step
both must hold the same bits in every param and every state tensor, or raise the same error.
A plan used where it no longer fits would leave the first copy behind the second. The tests
also check that the plan was used where nothing changed, so that they test the plan at all.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import fused_opt
from fused_opt._plan import StepPlan
from fused_opt.optimizer import FusedOptimizer

RICH = {
    "Adam": {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1},
    "AdamW": {"lr": 1e-2},
    "SGD": {"lr": 1e-2, "momentum": 0.9, "nesterov": True},
    "RMSprop": {"lr": 1e-2, "centered": True, "momentum": 0.5},
    "Adagrad": {"lr": 1e-2, "lr_decay": 0.01},
}
SHAPES = [(3, 5), (1,), (0,), (1031,), (2, 3, 4)]


def make_params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES
    ]


class Twins:
    """One optimizer and a deep copy of it (params and all) that never uses a plan."""

    def __init__(self, name, params=None, groups=None, **options):
        self.planned_params = params if params is not None else make_params()
        argument = groups(self.planned_params) if groups else self.planned_params
        self.planned = getattr(fused_opt, name)(argument, **options)
        self.planless = copy.deepcopy(self.planned)
        self.planless._plan_with_grads = lambda: None
        self.planless_params = [p for g in self.planless.param_groups for p in g["params"]]
        self.plan_steps = 0
        self.seed = 100

    def both(self, change):
        """Applies ``change(optimizer, params)`` to both copies."""
        change(self.planned, self.planned_params)
        change(self.planless, self.planless_params)

    def set_grads(self, which=None, dtype=None):
        self.seed += 1
        for params in (self.planned_params, self.planless_params):
            generator = torch.Generator().manual_seed(self.seed)
            for index, p in enumerate(params):
                grad = torch.randn(p.shape, generator=generator).to(dtype or p.dtype)
                if dtype is not None:
                    p.grad = None
                    p.grad_dtype = dtype
                p.grad = grad if which is None or index in which else None

    def step(self, expect_plan: bool | None = None):
        plan = self.planned._step_plan
        used = plan is not None and plan.fits(self.planned) and plan.gather_grads()
        if used:
            plan.release_grads()
        outcomes = []
        for optimizer in (self.planned, self.planless):
            try:
                optimizer.step()
                outcomes.append(None)
            except Exception as exc:  # noqa: BLE001 - both copies must fail alike
                outcomes.append((type(exc), str(exc)))
        assert outcomes[0] == outcomes[1]
        if expect_plan is not None:
            assert bool(used) == expect_plan
        self.plan_steps += bool(used)
        self.assert_same()
        return outcomes[0]

    def assert_same(self):
        for index, (p, q) in enumerate(zip(self.planned_params, self.planless_params)):
            assert p.dtype == q.dtype and torch.equal(p, q), f"param {index}"
            state, twin_state = self.planned.state.get(p, {}), self.planless.state.get(q, {})
            assert state.keys() == twin_state.keys(), f"state keys of param {index}"
            for key, value in state.items():
                if torch.is_tensor(value):
                    assert torch.equal(value, twin_state[key]), f"state[{index}][{key!r}]"
                else:
                    assert value == twin_state[key], f"state[{index}][{key!r}]"


@pytest.mark.parametrize("name", list(RICH))
def test_unchanged_steps_use_the_plan_and_match_the_full_path(name):
    twins = Twins(name, **RICH[name])
    twins.set_grads()
    twins.step(expect_plan=False)
    for _ in range(4):
        twins.set_grads()
        twins.step(expect_plan=True)
    assert twins.plan_steps == 4


@pytest.mark.parametrize("name", list(RICH))
def test_a_grad_set_to_none_or_back_changes_the_plan(name):
    twins = Twins(name, **RICH[name])
    for which in (None, None, {0, 2, 3}, {0, 2, 3}, None, {1}, None):
        twins.set_grads(which)
        twins.step()
    assert twins.plan_steps >= 1


def test_a_grad_of_another_layout_is_taken_through_the_full_path():
    twins = Twins("AdamW", **RICH["AdamW"])
    twins.set_grads()
    twins.step()
    twins.set_grads()
    twins.step(expect_plan=True)
    for optimizer_params in (twins.planned_params, twins.planless_params):
        # Same values, transposed memory: the kernels need the param's layout.
        optimizer_params[0].grad = optimizer_params[0].grad.t().contiguous().t()
    twins.step(expect_plan=False)


def test_a_grad_of_the_wrong_dtype_raises_before_anything_changes():
    twins = Twins("Adam", **RICH["Adam"])
    twins.set_grads()
    twins.step()
    twins.set_grads()
    twins.step(expect_plan=True)
    twins.set_grads(dtype=torch.float64)
    before = [p.detach().clone() for p in twins.planned_params]
    error = twins.step(expect_plan=False)
    assert error is not None and "param_groups[0]['params'][0]" in error[1]
    assert all(torch.equal(p, b) for p, b in zip(twins.planned_params, before))


def test_a_param_given_data_of_another_dtype_is_taken_through_the_full_path():
    twins = Twins("SGD", **RICH["SGD"])
    twins.set_grads()
    twins.step()

    def to_double(optimizer, params):
        params[3].data = params[3].data.double()

    twins.both(to_double)
    twins.set_grads()
    twins.step(expect_plan=False)


def test_requires_grad_toggled_steps_as_the_full_path():
    twins = Twins("AdamW", **RICH["AdamW"])
    twins.set_grads()
    twins.step()

    def freeze(optimizer, params):
        params[0].requires_grad_(False)
        params[0].grad = None

    twins.both(freeze)
    twins.set_grads(which={1, 2, 3, 4})
    twins.step(expect_plan=False)
    twins.set_grads(which={1, 2, 3, 4})
    twins.step(expect_plan=True)

    def unfreeze(optimizer, params):
        params[0].requires_grad_(True)

    twins.both(unfreeze)
    twins.set_grads()
    twins.step(expect_plan=False)


def change_by_hand_and_step(twins, key, value):
    """Two steps, group 0's `key` set to `value` on both twins, three more steps."""
    for _ in range(2):
        twins.set_grads()
        twins.step()

    def change(optimizer, params):
        optimizer.param_groups[0][key] = value

    twins.both(change)
    for _ in range(3):
        twins.set_grads()
        twins.step()
    assert twins.plan_steps >= 2


@pytest.mark.parametrize(
    "key, value",
    [("lr", 0.5), ("weight_decay", 0.3), ("betas", (0.5, 0.6)), ("eps", 1e-3),
     ("amsgrad", False), ("maximize", True), ("l1_decay", 0.01), ("l1_mode", "proximal"),
     ("max_grad_norm", 0.01), ("lr", torch.tensor(0.2))],
)
def test_a_hyperparameter_changed_by_hand_takes_effect(key, value):
    change_by_hand_and_step(Twins("Adam", **RICH["Adam"]), key, value)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
@pytest.mark.parametrize(
    "key, value",
    [("param_rounding", "stochastic"), ("param_rounding", "kahan"), ("rounding_seed", 7)])
def test_param_rounding_changed_by_hand_takes_effect(name, key, value):
    # bfloat16 params, where the rounding shows; plain SGD also gains step counters with
    # stochastic rounding, and every optimizer a compensation with Kahan's.
    options = {"lr": 1e-2} if name == "SGD" else RICH[name]
    if key == "rounding_seed":
        options = {**options, "param_rounding": "stochastic"}
    twins = Twins(name, params=make_params(torch.bfloat16), **options)
    change_by_hand_and_step(twins, key, value)


def test_hyperparameters_changed_in_place_take_effect():
    # A list or a tensor can change without being replaced: such groups are read every step.
    twins = Twins("Adam", **RICH["Adam"])

    def mutable_values(optimizer, params):
        optimizer.param_groups[0]["betas"] = [0.9, 0.999]
        optimizer.param_groups[0]["weight_decay"] = torch.tensor(0.1)

    twins.both(mutable_values)
    for step in range(4):
        twins.set_grads()
        twins.step()

        def change_in_place(optimizer, params, step=step):
            optimizer.param_groups[0]["betas"][0] = 0.5 + 0.1 * step
            optimizer.param_groups[0]["weight_decay"].fill_(0.2 * step)

        twins.both(change_in_place)
    assert twins.plan_steps == 3


def test_a_scheduler_changes_lr_every_step_and_the_plan_follows():
    twins = Twins("AdamW", **RICH["AdamW"])
    schedulers = [
        torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for opt in (twins.planned, twins.planless)
    ]
    for _ in range(5):
        twins.set_grads()
        twins.step()
        for scheduler in schedulers:
            scheduler.step()
    assert twins.plan_steps == 4


def test_add_param_group_and_load_state_dict_drop_the_plan():
    params = make_params()
    twins = Twins("RMSprop", params=params[:3], **RICH["RMSprop"])
    twins.set_grads()
    twins.step()
    twins.set_grads()
    twins.step(expect_plan=True)
    saved = copy.deepcopy(twins.planned.state_dict())

    def add_group(optimizer, own):
        extra = [torch.nn.Parameter(torch.randn(6, 7)), torch.nn.Parameter(torch.randn(3))]
        torch.manual_seed(5)
        for p in extra:
            p.data.normal_()
        optimizer.add_param_group({"params": extra, "lr": 0.1})
        own.extend(extra)

    twins.both(add_group)
    twins.set_grads()
    twins.step(expect_plan=False)
    twins.set_grads()
    twins.step(expect_plan=True)

    def drop_group_and_load(optimizer, own):
        del optimizer.param_groups[1]
        del own[3:]
        optimizer.load_state_dict(copy.deepcopy(saved))

    twins.both(drop_group_and_load)
    twins.set_grads()
    twins.step(expect_plan=False)


def test_state_cleared_by_hand_restarts_as_in_the_full_path():
    twins = Twins("Adam", **RICH["Adam"])
    for _ in range(2):
        twins.set_grads()
        twins.step()
    twins.both(lambda optimizer, params: optimizer.state.clear())
    twins.set_grads()
    twins.step(expect_plan=False)


@pytest.mark.parametrize("name", list(RICH))
def test_state_tensors_replaced_by_hand_are_the_ones_stepped(name):
    """A state tensor replaced by another object (a momentum reset, say) is what the next step
    updates, as on the full path; so is a param whose whole state dict was replaced."""
    twins = Twins(name, **RICH[name])
    for _ in range(2):
        twins.set_grads()
        twins.step()

    def replace_tensors(optimizer, params):
        state = optimizer.state[params[0]]
        for key, value in list(state.items()):
            state[key] = value * 0.5 + 0.25

    def reset_state(optimizer, params):
        optimizer.state[params[3]] = {}

    for change in (replace_tensors, reset_state):
        twins.both(change)
        twins.set_grads()
        twins.step(expect_plan=False)
        twins.set_grads()
        twins.step(expect_plan=True)


def test_params_of_a_group_swapped_by_hand_are_seen():
    twins = Twins("SGD", **RICH["SGD"])
    twins.set_grads()
    twins.step()

    def swap(optimizer, params):
        optimizer.param_groups[0]["params"] = list(reversed(optimizer.param_groups[0]["params"]))

    twins.both(swap)
    twins.set_grads()
    twins.step(expect_plan=False)


def test_a_master_weight_param_written_in_place_refreshes_its_master():
    params = make_params(torch.bfloat16)
    twins = Twins("AdamW", params=params, master_weights=True, **RICH["AdamW"])
    for _ in range(2):
        twins.set_grads()
        twins.step()

    def prune(optimizer, own):
        own[0].data[0].zero_()  # not a version bump: refresh_master_weights' case
        with torch.no_grad():
            own[3].mul_(0.5)

    twins.both(prune)
    twins.set_grads()
    twins.step(expect_plan=False)
    twins.set_grads()
    twins.step(expect_plan=True)


@pytest.mark.parametrize("name", list(RICH))
def test_the_fused_grad_scaler_and_clipping_use_the_plan(name):
    twins = Twins(name, max_grad_norm=0.5, **RICH[name])
    scalers = [fused_opt.GradScaler("cpu", init_scale=4.0) for _ in range(2)]
    for step in range(5):
        twins.set_grads()
        if step == 3:
            for params in (twins.planned_params, twins.planless_params):
                params[3].grad[7] = float("inf")
        norms = []
        for optimizer, scaler in zip((twins.planned, twins.planless), scalers):
            scaler.scale(torch.ones(()))  # makes the scale, as scaling the loss does
            scaler.step(optimizer)
            scaler.update()
            norms.append(optimizer.last_grad_norm.clone())
        assert torch.equal(norms[0], norms[1])
        twins.assert_same()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0
    plan = twins.planned._step_plan
    assert plan is not None and plan.fits(twins.planned) and not plan.holding


@pytest.mark.parametrize("name", list(RICH))
def test_a_scaled_step_reads_the_grads_once(name, monkeypatch):
    # The scaler's dense-grads check, its statistics pass and the step share one reading of the
    # grads (SGD and Adagrad, which take sparse grads, read them twice before).
    twins = Twins(name, **RICH[name])
    scaler = fused_opt.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    twins.set_grads()
    scaler.step(twins.planned)
    scaler.update()
    reads = []
    original = StepPlan.gather_grads
    monkeypatch.setattr(StepPlan, "gather_grads", lambda plan: reads.append(plan) or original(plan))
    for _ in range(3):
        twins.set_grads()
        scaler.step(twins.planned)
        scaler.update()
    assert len(reads) == 3 and not twins.planned._step_plan.holding


@pytest.mark.parametrize("scaled", [False, True])
def test_the_plan_keeps_no_grad_alive_after_a_step(scaled):
    # zero_grad(set_to_none=True) must free the grads, as without a plan.
    params = make_params()
    optimizer = fused_opt.AdamW(params, max_grad_norm=1.0)
    scaler = fused_opt.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if scaled:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    assert optimizer._step_plan is not None and not optimizer._step_plan.holding
    grads = [weakref.ref(p.grad) for p in params]
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    assert all(ref() is None for ref in grads)


def test_a_plan_step_allocates_nothing_and_calls_one_op():
    from torch.profiler import ProfilerActivity, profile

    params = make_params()
    optimizer = fused_opt.AdamW(params, max_grad_norm=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.step()
    assert optimizer._step_plan is not None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer.step()
    events = prof.events()
    assert [(e.name, e.cpu_memory_usage) for e in events if e.cpu_memory_usage > 0] == []
    names = [e.name for e in events if e.name.startswith("fused_opt::")]
    assert names == ["fused_opt::grad_norm_", "fused_opt::adam_"]


def test_no_plan_for_what_it_could_not_repeat():
    complex_params = [torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))]
    sparse = torch.nn.Embedding(5, 3, sparse=True)
    for params, name in ((complex_params, "Adam"), (list(sparse.parameters()), "SGD")):
        optimizer = getattr(fused_opt, name)(params, lr=0.1)
        if name == "SGD":
            sparse(torch.tensor([1, 3])).sum().backward()
        else:
            params[0].grad = torch.randn_like(params[0])
        optimizer.step()
        assert optimizer._step_plan is None


def test_copies_and_pickles_make_their_own_plan():
    params = make_params()
    optimizer = fused_opt.Adagrad(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert optimizer._step_plan is not None
    copied = copy.deepcopy(optimizer)
    assert copied._step_plan is None
    assert isinstance(copied, FusedOptimizer)


@pytest.mark.slow
def test_compiled_steps_between_planned_eager_steps_match_the_full_path():
    # torch.compile traces the full path even where an eager step left a plan.
    twins = Twins("AdamW", **RICH["AdamW"])
    for _ in range(2):
        twins.set_grads()
        twins.step()
    compiled_step = torch.compile(twins.planned.step)
    for _ in range(2):
        twins.set_grads()
        compiled_step()
        twins.planless.step()
        twins.assert_same()
    twins.set_grads()
    twins.step()
