"""DTensor params on two ranks (gloo, CPU): FSDP2's fully_shard, tensor-parallel placements on 1-D
and 2-D meshes, the global gradient norm and inf/NaN skip across ranks, and distributed
checkpoints. torch.optim on the same models is the oracle.

Each test spawns its ranks with tests/ranks.py.
"""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist

from torch.profiler import ProfilerActivity, profile

import fused_opt
from config import tolerance
from optim_helpers import FULL_STATE_OPTIONS, NAMES
from ranks import WORLD, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

if dist.is_available():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 3
# Small enough that every step clips.
MAX_NORM = 0.05


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_close(actual, expected, what: str) -> None:
    torch.testing.assert_close(_full(actual), _full(expected), **tolerance(torch.float32),
                               msg=lambda m: f"rank {dist.get_rank()}, {what}: {m}")


def _fsdp_model(dtype: torch.dtype = torch.float32, mesh=None) -> torch.nn.Module:
    torch.manual_seed(0)
    # Odd sizes: rank 0 holds 7 rows of the first weight and rank 1 six (on four ranks: 4, 3, 3,
    # 3, and the last layer's 3 rows leave rank 3 an empty shard).
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    model.to(dtype)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _backward(model: torch.nn.Module, rank: int, step: int, scaler=None) -> None:
    gen = torch.Generator().manual_seed(100 * step + rank)  # each rank its own data, as in DP
    x, y = torch.randn(5, 7, generator=gen), torch.randn(5, 3, generator=gen)
    dtype = next(model.parameters()).dtype
    loss = torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
    (loss if scaler is None else scaler.scale(loss)).backward()


def _assert_same_training(fused_model, fused, torch_model, torch_opt) -> None:
    for (name, a), b in zip(fused_model.named_parameters(), torch_model.parameters()):
        assert isinstance(a, DTensor) and a.placements == b.placements
        _assert_close(a, b, name)
        fused_state, torch_state = fused.state[a], torch_opt.state[b]
        for key, value in torch_state.items():
            if key == "step":
                assert float(fused_state[key]) == float(value), name
                continue
            assert isinstance(fused_state[key], DTensor), f"{name}: state {key} is no DTensor"
            assert fused_state[key].placements == value.placements, (name, key)
            _assert_close(fused_state[key], value, f"{name} state {key}")


def _fsdp_worker(rank: int, name: str, mesh_shape: tuple[int, ...] | None = None) -> None:
    options = FULL_STATE_OPTIONS[name]
    # A 2-D mesh is HSDP: replicated over its first dimension, sharded over the second.
    mesh = None if mesh_shape is None else init_device_mesh(
        "cpu", mesh_shape, mesh_dim_names=("replicate", "shard")[-len(mesh_shape):])
    fused_model, torch_model = _fsdp_model(mesh=mesh), _fsdp_model(mesh=mesh)
    fused = getattr(fused_opt, name)(fused_model.parameters(), max_grad_norm=MAX_NORM, **options)
    torch_opt = getattr(torch.optim, name)(torch_model.parameters(), **options)
    for step in range(STEPS):
        for model in (fused_model, torch_model):
            model.zero_grad()
            _backward(model, rank, step)
        fused.step()
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), MAX_NORM)
        torch_opt.step()
        assert float(_full(torch_norm)) > MAX_NORM, "the step clips"
        _assert_close(fused.last_grad_norm, _full(torch_norm).float(), "global grad norm")
    _assert_same_training(fused_model, fused, torch_model, torch_opt)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_trains_like_torch_with_global_clipping(name):
    spawn(_fsdp_worker, name)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(4,), (2, 2)], ids=["fsdp-4", "hsdp-2x2"])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_fsdp2_on_four_ranks_trains_like_torch_with_global_clipping(name, mesh_shape):
    spawn(_fsdp_worker, name, mesh_shape, world=4)


def _placements_worker(rank: int, mesh_shape: tuple[int, ...], master: bool) -> None:
    # Tensor-parallel placements: the same full params and grads on every rank, distributed.
    # With master weights the params are bf16 and the oracle trains their fp32 masters.
    mesh = init_device_mesh("cpu", mesh_shape)
    if len(mesh_shape) == 1:
        layouts = [[Shard(0)], [Shard(1)], [Replicate()], [Shard(0)]]
    else:
        layouts = [[Shard(0), Replicate()], [Replicate(), Shard(1)], [Replicate(), Replicate()],
                   [Shard(0), Shard(1)]]
    dtype = torch.bfloat16 if master else torch.float32
    shapes = [(9, 4), (3, 5), (6,), (1031, 2)]
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
    plain = [torch.nn.Parameter(t.float()) for t in full]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, layout))
               for t, layout in zip(full, layouts)]
    fused = fused_opt.AdamW(sharded, lr=1e-2, amsgrad=True, max_grad_norm=MAX_NORM,
                            master_weights=master)
    torch_opt = torch.optim.AdamW(plain, lr=1e-2, amsgrad=True)
    for _ in range(STEPS):
        grads = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
        for p, q, g, layout in zip(sharded, plain, grads, layouts):
            p.grad = distribute_tensor(g.clone(), mesh, layout)
            q.grad = g.float()
        fused.step()
        torch_norm = torch.nn.utils.clip_grad_norm_(plain, MAX_NORM)
        torch_opt.step()
        # Replicated elements count once, not once per rank that holds them.
        _assert_close(fused.last_grad_norm, torch_norm, "global grad norm")
    for index, (p, q) in enumerate(zip(sharded, plain)):
        state = fused.state[p]
        if master:
            assert state["master_param"].placements == p.placements
            _assert_close(state["master_param"], q, f"param {index} master")
            assert torch.equal(p.full_tensor(), state["master_param"].full_tensor().to(dtype))
        else:
            _assert_close(p, q, f"param {index}")
        for key, value in torch_opt.state[q].items():
            if key != "step":
                assert state[key].placements == p.placements
                _assert_close(state[key], value, f"param {index} state {key}")


@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master"])
@pytest.mark.parametrize("mesh_shape", [(2,), (2, 1), (1, 2)], ids=["1d", "2d-dp", "2d-tp"])
def test_tensor_parallel_placements_train_like_torch(mesh_shape, master):
    spawn(_placements_worker, mesh_shape, master)


def _inf_worker(rank: int) -> None:
    model = _fsdp_model()
    optimizer = fused_opt.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    scaler = fused_opt.GradScaler("cpu", init_scale=2.0**8)
    for step in range(STEPS):
        model.zero_grad()
        _backward(model, rank, step, scaler)
        before = [p.detach().full_tensor() for p in model.parameters()]
        if step == 1 and rank == 1:
            next(model.parameters()).grad.to_local()[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        after = [p.detach().full_tensor() for p in model.parameters()]
        skipped = step == 1
        # Only rank 1 saw the inf; both skip and both back off.
        assert float(optimizer.last_step_skipped) == float(skipped), (rank, step)
        assert all(torch.equal(a, b) for a, b in zip(before, after)) == skipped, (rank, step)
        assert scaler.get_scale() == (2.0**7 if step >= 1 else 2.0**8), (rank, step)
    scales = [None] * WORLD
    dist.all_gather_object(scales, scaler.get_scale())
    assert scales[0] == scales[1]


def test_inf_on_one_rank_skips_the_step_on_every_rank():
    spawn(_inf_worker)


# ------------------------------------------------------------------------------------------------
# ZeroRedundancyOptimizer: each rank steps a part of the plain params, shard_group makes the
# gradient statistics global.


def _plain_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def _zero(model: torch.nn.Module, name: str, **options):
    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=getattr(fused_opt, name),
                                   shard_group=True, **options)


def _zero_worker(rank: int, name: str) -> None:
    options = FULL_STATE_OPTIONS[name]
    zero_model, torch_model = DDP(_plain_model()), DDP(_plain_model())
    zero = _zero(zero_model, name, max_grad_norm=MAX_NORM, **options)
    torch_opt = getattr(torch.optim, name)(torch_model.parameters(), **options)
    local = zero.optim
    owned = [p for group in local.param_groups for p in group["params"]]
    assert 0 < len(owned) < len(list(zero_model.parameters())), "each rank steps a part"
    for step in range(STEPS):
        for model in (zero_model, torch_model):
            model.zero_grad()
            _backward(model, rank, step)
        zero.step()
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), MAX_NORM)
        torch_opt.step()
        assert float(torch_norm) > MAX_NORM, "the step clips"
        # The norm of every rank's part, not of the part this rank steps.
        _assert_close(local.last_grad_norm, torch_norm.float(), f"step {step} global grad norm")
        for (key, a), b in zip(zero_model.named_parameters(), torch_model.parameters()):
            _assert_close(a, b, f"step {step} {key}")
    torch_params = dict(zip(zero_model.parameters(), torch_model.parameters()))
    for p in owned:
        for key, value in torch_opt.state[torch_params[p]].items():
            if key == "step":
                assert float(local.state[p][key]) == float(value)
            else:
                _assert_close(local.state[p][key], value, f"state {key}")
    compared = [None] * WORLD
    dist.all_gather_object(compared, len(owned))
    assert sum(compared) == len(list(zero_model.parameters())), "every param's state compared"
    # ZeRO keeps the keywords it passes on in its own param groups, so its checkpoint holds
    # shard_group=True, which pickles (a ProcessGroup would not).
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save(zero.state_dict(), io.BytesIO())


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_zero_redundancy_optimizer_clips_by_the_global_norm(name):
    spawn(_zero_worker, name)


def _zero_inf_worker(rank: int) -> None:
    model = DDP(_plain_model())
    zero = _zero(model, "AdamW", lr=1e-2, max_grad_norm=1.0)
    scaler = fused_opt.GradScaler("cpu", init_scale=2.0**8)
    stepped_here = zero.optim.param_groups[0]["params"][0]
    for step in range(STEPS):
        model.zero_grad()
        _backward(model, rank, step, scaler)
        before = [p.detach().clone() for p in model.parameters()]
        if step == 1 and rank == 1:
            # DDP gave both ranks the same grads; rank 1 alone sees an inf, in a part it steps.
            stepped_here.grad.view(-1)[0] = float("inf")
        scaler.step(zero)
        scaler.update()
        skipped = step == 1
        assert float(zero.optim.last_step_skipped) == float(skipped), (rank, step)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert unchanged == skipped, (rank, step)
        assert scaler.get_scale() == (2.0**7 if step >= 1 else 2.0**8), (rank, step)


def test_zero_redundancy_optimizer_skips_on_every_rank_when_one_sees_an_inf():
    spawn(_zero_inf_worker)


def _no_allocation_worker(rank: int) -> None:
    # Both kinds of global statistics: DTensor params summed over their mesh, and plain tensors
    # summed over shard_group. Each rank's plain tensors are its own part of a model.
    model = _fsdp_model()
    gen = torch.Generator().manual_seed(rank)
    plain = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(5, 3), (4,)]]

    def plain_backward(step: int, scaler) -> None:
        loss = sum((p * torch.randn(p.shape, generator=gen)).sum() for p in plain)
        scaler.scale(loss).backward()

    for params, backward, options in (
        (list(model.parameters()), lambda step, scaler: _backward(model, rank, step, scaler), {}),
        (plain, plain_backward, {"shard_group": True}),
    ):
        optimizer = fused_opt.AdamW(params, lr=1e-2, max_grad_norm=MAX_NORM, **options)
        scaler = fused_opt.GradScaler("cpu")
        for step in range(3):
            optimizer.zero_grad()
            backward(step, scaler)
            # The first step makes the states and the statistics' buffers; the later ones,
            # with and without a scaler, allocate nothing.
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                if step == 1:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
            if step == 1:
                scaler.update()
            if step > 0:
                events = prof.events()
                assert [(e.name, e.cpu_memory_usage) for e in events
                        if e.cpu_memory_usage > 0] == [], (rank, step, options)
                assert [e.name for e in events if e.name.startswith("c10d::")] == [
                    "c10d::allreduce_"
                ], "one collective per step"


def test_global_statistics_allocate_nothing_after_the_first_step():
    spawn(_no_allocation_worker)


def _shard_without_grads_worker(rank: int) -> None:
    # Rank 1's part has no grads this step (frozen or unused params): it still joins the
    # collective that rank 0's clipping waits for, adding nothing to the norm.
    gen = torch.Generator().manual_seed(rank)
    params = [torch.nn.Parameter(torch.randn(6, generator=gen)) for _ in range(2)]
    optimizer = fused_opt.SGD(params, lr=0.1, max_grad_norm=MAX_NORM, shard_group=True)
    if rank == 0:
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
    squares = sum(p.grad.square().sum() for p in params) if rank == 0 else torch.zeros(())
    dist.all_reduce(squares)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    # Both ranks report the group's norm, rank 1 too: its statistics are the group's.
    _assert_close(optimizer.last_grad_norm, squares.sqrt(), "grad norm")
    if rank == 1:
        assert all(torch.equal(a, p) for a, p in zip(before, params))


def test_a_rank_without_grads_joins_the_global_norm():
    spawn(_shard_without_grads_worker)


def _scaled_part_without_grads_worker(rank: int, wrapper: str) -> None:
    # Every rank holds the same full params and gets the same grads, as under DDP; on most steps
    # only rank 0's part has grads (frozen or unused params), so rank 1's local optimizer has
    # none, yet it must skip, step and move the scale exactly as rank 0 does. The oracle on each
    # rank is torch.optim with torch's GradScaler, unscale_ and clip_grad_norm_ on all params.
    options = FULL_STATE_OPTIONS["AdamW"]
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(shape, generator=gen) for shape in [(6, 5), (7,), (4, 3), (5,)]]
    params = [torch.nn.Parameter(t.clone()) for t in full]
    oracle = [torch.nn.Parameter(t.clone()) for t in full]
    if wrapper == "zero":
        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=fused_opt.AdamW,
                                            shard_group=True, max_grad_norm=MAX_NORM, **options)
        local = optimizer.optim
    else:
        optimizer = local = fused_opt.AdamW(params[rank::WORLD], max_grad_norm=MAX_NORM,
                                            shard_group=True, **options)
    owned = {id(p) for group in local.param_groups for p in group["params"]}
    mine = [i for i, p in enumerate(params) if id(p) in owned]
    parts = [None] * WORLD
    dist.all_gather_object(parts, mine)
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1]), parts
    torch_opt = torch.optim.AdamW(oracle, **options)
    # growth_interval=2: the scale grows after steps 4 and 5 as well as backing off twice.
    scaler = fused_opt.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    # (which params have grads, whether rank 0 sees an inf in its part)
    schedule = [(parts[0], False), (parts[0], True), (range(len(params)), False),
                (parts[0], True), (parts[0], False), (parts[0], False)]
    for step, (with_grads, inf) in enumerate(schedule):
        gen = torch.Generator().manual_seed(step)  # the same grads on every rank
        grads = {i: torch.randn(params[i].shape, generator=gen) for i in with_grads}
        for model, grad_scaler in ((params, scaler), (oracle, torch_scaler)):
            for p in model:
                p.grad = None
            loss = sum((model[i] * g).sum() for i, g in grads.items())
            grad_scaler.scale(loss).backward()
        if inf:
            oracle[parts[0][0]].grad.view(-1)[0] = float("inf")
            if rank == 0:
                params[parts[0][0]].grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in params]
        states_before = {i: {k: v.clone() for k, v in local.state[params[i]].items()}
                         for i in mine if params[i] in local.state}

        scaler.step(optimizer)
        scaler.update()
        torch_scaler.unscale_(torch_opt)
        torch_norm = torch.nn.utils.clip_grad_norm_(oracle, MAX_NORM)
        torch_scaler.step(torch_opt)
        torch_scaler.update()

        assert float(local.last_step_skipped) == float(inf), (rank, step)
        if not inf:
            assert float(torch_norm) > MAX_NORM, "the step clips"
            _assert_close(local.last_grad_norm, torch_norm, f"step {step} global grad norm")
        assert scaler.get_scale() == torch_scaler.get_scale(), (rank, step)
        assert scaler.state_dict() == torch_scaler.state_dict(), (rank, step)
        # ZeRO broadcasts every rank's part; without it a rank holds its own part alone.
        for i in range(len(params)) if wrapper == "zero" else mine:
            _assert_close(params[i], oracle[i], f"step {step} param {i}")
        for i in mine:
            state, torch_state = local.state.get(params[i], {}), torch_opt.state.get(oracle[i], {})
            assert state.keys() == torch_state.keys(), (rank, step, i)
            for key, value in torch_state.items():
                if key == "step":
                    assert float(state[key]) == float(value), (rank, step, i)
                else:
                    _assert_close(state[key], value, f"step {step} param {i} state {key}")
            if inf or i not in grads:
                # Bit for bit: a skipped step, or a part without grads, changes nothing.
                assert torch.equal(params[i], before[i]), (rank, step, i)
                for key, value in states_before.get(i, {}).items():
                    assert torch.equal(state[key], value), (rank, step, i, key)
    scaler_states = [None] * WORLD
    dist.all_gather_object(scaler_states, scaler.state_dict())
    assert scaler_states[0] == scaler_states[1]


@pytest.mark.parametrize("wrapper", ["zero", "shard_group"])
def test_a_rank_without_grads_skips_and_scales_with_the_others_under_grad_scaler(wrapper):
    spawn(_scaled_part_without_grads_worker, wrapper)


def _shard_group_set_later_worker(rank: int) -> None:
    # The way to ZeroRedundancyOptimizer over a subgroup: a ProcessGroup set on the optimizer
    # after construction, here after a step that made a step plan of this process's grads.
    gen = torch.Generator().manual_seed(rank)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(4, 3), (5,)]]
    optimizer = fused_opt.Adam(params, lr=0.1, max_grad_norm=MAX_NORM)
    group = dist.new_group([0, 1])
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        squares = sum(p.grad.square().sum() for p in params)
        if step == 1:
            optimizer.shard_group = group
        if step >= 1:
            dist.all_reduce(squares, group=group)
        optimizer.step()
        _assert_close(optimizer.last_grad_norm, squares.sqrt(), f"step {step} grad norm")


def test_shard_group_set_after_steps_takes_effect():
    spawn(_shard_group_set_later_worker)


def test_shard_group_must_name_a_process_group():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match=r"shard_group must be None, True \(the default process "
                                        r"group\) or a torch.distributed.ProcessGroup, got 'world'"):
        fused_opt.AdamW(params, shard_group="world")
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"shard_group=True .* not initialized"):
        fused_opt.AdamW(params, shard_group=True)


def _dtensor_shard_group_worker(rank: int) -> None:
    model = _fsdp_model()
    optimizer = fused_opt.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, shard_group=True)
    _backward(model, rank, 0)
    before = [p.detach().full_tensor() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*is a DTensor.*"
                                         "shard_group is for plain-tensor shards"):
        optimizer.step()
    assert all(torch.equal(a, p.detach().full_tensor()) for a, p in zip(before, model.parameters()))
    assert not optimizer.state


def test_shard_group_with_dtensor_params_is_refused_before_any_change():
    spawn(_dtensor_shard_group_worker)


def _checkpoint_worker(rank: int, name: str, precision: str, directory: str) -> None:
    # bfloat16 params keep a float32 master, or a bfloat16 Kahan compensation, in the state.
    companion = {"bf16-master": "master_param", "bf16-kahan": "kahan_compensation"}.get(precision)
    options = {**FULL_STATE_OPTIONS[name], "master_weights": precision == "bf16-master",
               "param_rounding": "kahan" if precision == "bf16-kahan" else "nearest"}

    def build(module=fused_opt):
        model = _fsdp_model(torch.float32 if companion is None else torch.bfloat16)
        opts = options if module is fused_opt else FULL_STATE_OPTIONS[name]
        return model, getattr(module, name)(model.parameters(), **opts)

    def train(model, optimizer, steps):
        for step in steps:
            optimizer.zero_grad()
            _backward(model, rank, step)
            optimizer.step()

    def load(model, optimizer):
        state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=directory)
        model.load_state_dict(state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])

    model, optimizer = build()
    train(model, optimizer, range(2))
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=directory)
    saved = {key: {k: _full(v).clone() for k, v in optimizer.state[p].items()}
             for key, p in model.named_parameters()}
    train(model, optimizer, range(2, 4))

    resumed_model, resumed = build()
    load(resumed_model, resumed)
    train(resumed_model, resumed, range(2, 4))
    for (key, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), key
        for state_key, value in optimizer.state[a].items():
            if name == "SGD" and state_key == "step":
                continue  # not saved, as torch.optim.SGD saves none: it only tells a started buffer
            assert torch.equal(_full(resumed.state[b][state_key]), _full(value)), (key, state_key)
        if companion is not None:
            assert resumed.state[b][companion].placements == b.placements

    # Into torch.optim: the same states, rounded to the params' dtype (torch has no master or
    # compensation).
    torch_model, torch_opt = build(torch.optim)
    load(torch_model, torch_opt)
    for key, p in torch_model.named_parameters():
        for state_key, value in torch_opt.state[p].items():
            if state_key != "step":
                expected = saved[key][state_key].to(p.dtype)
                assert torch.equal(_full(value), expected), (key, state_key)


@pytest.mark.parametrize("precision", ["fp32", "bf16-master", "bf16-kahan"])
@pytest.mark.parametrize("name", NAMES)
def test_distributed_checkpoint_resumes_bit_identically(name, precision, tmp_path):
    spawn(_checkpoint_worker, name, precision, str(tmp_path))


def _bad_grad_worker(rank: int) -> None:
    model = _fsdp_model()
    optimizer = fused_opt.Adam(model.parameters(), lr=1e-2)
    _backward(model, rank, 0)
    weight = model[2].weight
    weight.grad = weight.grad.full_tensor()  # a plain tensor for a sharded param
    before = [p.detach().full_tensor() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[2\].*the grad is a "
                                           "plain tensor but the param is a DTensor"):
        optimizer.step()
    assert all(torch.equal(a, p.detach().full_tensor()) for a, p in zip(before, model.parameters()))
    assert not optimizer.state


def test_plain_grad_of_a_dtensor_param_is_refused_before_any_change():
    spawn(_bad_grad_worker)


def _save_for_resharding_worker(rank: int, name: str, directory: str) -> None:
    model = _fsdp_model(torch.bfloat16)
    optimizer = getattr(fused_opt, name)(model.parameters(), master_weights=True,
                                         **FULL_STATE_OPTIONS[name])
    for step in range(2):
        optimizer.zero_grad()
        _backward(model, rank, step)
        optimizer.step()
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=directory)
    gathered = {key: {"param": p.full_tensor(),
                      **{k: _full(v) for k, v in optimizer.state[p].items()}}
                for key, p in model.named_parameters()}
    if rank == 0:
        torch.save(gathered, os.path.join(directory, "gathered.pt"))


def _load_resharded_worker(rank: int, name: str, directory: str) -> None:
    model = _fsdp_model(torch.bfloat16)
    optimizer = getattr(fused_opt, name)(model.parameters(), master_weights=True,
                                         **FULL_STATE_OPTIONS[name])
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=directory)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    expected = torch.load(os.path.join(directory, "gathered.pt"), weights_only=True)
    for key, p in model.named_parameters():
        assert p.device_mesh.size() == dist.get_world_size()
        assert torch.equal(p.full_tensor(), expected[key]["param"]), key
        for state_key, value in optimizer.state[p].items():
            if name == "SGD" and state_key == "step":
                continue  # not saved (see test_distributed_checkpoint_resumes_bit_identically)
            assert torch.equal(_full(value), expected[key][state_key]), (key, state_key)
    # And it trains on: one more step with every rank's own data.
    _backward(model, rank, 2)
    optimizer.step()
    assert all(torch.isfinite(p.full_tensor()).all() for p in model.parameters())


@pytest.mark.parametrize("load_world", [1, 4])
@pytest.mark.parametrize("name", ["AdamW", "Adagrad"])
def test_checkpoint_of_two_ranks_loads_into_another_number_of_ranks(name, load_world, tmp_path):
    spawn(_save_for_resharding_worker, name, str(tmp_path))
    spawn(_load_resharded_worker, name, str(tmp_path), world=load_world)
