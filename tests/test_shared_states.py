"""Small params' first states are views of shared buffers (FusedOptimizer._make_states_together):
the views are disjoint and in each param's shape, the results are torch.optim's, and the
buffers neither leak into checkpoints twice nor bind states that are made later or elsewhere."""

import io

import pytest
import torch

import fused_opt
from fused_opt.optimizer import SHARED_STATE_MAX_NUMEL
from optim_helpers import (
    FULL_STATE_OPTIONS,
    NAMES,
    assert_params_close,
    assert_states_close,
    build,
    clone_params,
    set_grads,
)

# Small params of two dtypes, one at the size limit and one past it, an empty one, a
# non-contiguous one, and a run of one-element params.
SMALL_SHAPES = [(3, 5), (1,), (0,), (7,), (2, 1, 3), (SHARED_STATE_MAX_NUMEL,)] + [(1,)] * 9
LARGE_SHAPE = (SHARED_STATE_MAX_NUMEL + 1,)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SMALL_SHAPES]
    params.append(torch.nn.Parameter(torch.randn(LARGE_SHAPE, generator=gen)))
    params.append(torch.nn.Parameter(torch.randn(6, 4, generator=gen).t()))
    params += [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in [(4,), (3,)]
    ]
    return params


def _state_tensors(opt, p) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in opt.state[p].items() if torch.is_tensor(v)]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", NAMES)
def test_small_params_take_disjoint_views_and_torch_results(name):
    options = FULL_STATE_OPTIONS[name]
    torch_params = _params()
    fused_params = clone_params(torch_params)
    torch_opt = build(torch.optim, name, torch_params, **options)
    fused_opt_ = build(fused_opt, name, fused_params, **options)
    for step in range(4):
        set_grads(torch_params, step)
        set_grads(fused_params, step)
        torch_opt.step()
        fused_opt_.step()
        assert_params_close(fused_params, torch_params)
        assert_states_close(fused_opt_, fused_params, torch_opt, torch_params)

    small32 = [p for p in fused_params if p.dtype == torch.float32 and p.is_contiguous()
               and p.numel() <= SHARED_STATE_MAX_NUMEL]
    small64 = [p for p in fused_params if p.dtype == torch.float64]
    alone = [p for p in fused_params if p.numel() > SHARED_STATE_MAX_NUMEL or not p.is_contiguous()]
    assert len(alone) == 2
    if name == "Adagrad":
        # torch.optim.Adagrad makes its sums in its constructor, param by param: each its own.
        for p in small32:
            own = fused_opt_.state[p]["sum"]
            assert own.untyped_storage().nbytes() == own.nbytes
        return
    for key, value in _state_tensors(fused_opt_, small32[0]):
        shared = {_storage(fused_opt_.state[p][key]) for p in small32}
        assert shared == {_storage(value)}, f"{key!r} of the small float32 params"
        assert {_storage(fused_opt_.state[p][key]) for p in small64} - shared, key
        for p in alone:
            own = fused_opt_.state[p][key]
            assert own.untyped_storage().nbytes() == own.nbytes, f"{key!r} of a param alone"
    for p in small32:
        for key, value in _state_tensors(fused_opt_, p):
            assert value.shape == (() if key == "step" else p.shape), key
            assert value.is_contiguous(), key
    # Disjoint: each state's bytes begin where the one before ends, in the order of the params.
    first_key = _state_tensors(fused_opt_, small32[0])[0][0]
    starts = [fused_opt_.state[p][first_key].data_ptr() for p in small32]
    ends = [s + fused_opt_.state[p][first_key].nbytes for s, p in zip(starts, small32)]
    assert starts[1:] == ends[:-1]


def test_a_checkpoint_holds_each_shared_buffer_once():
    params = [torch.nn.Parameter(torch.randn(1 + i % 7)) for i in range(200)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fused_opt.AdamW(params, amsgrad=True)
    opt.step()
    state_bytes = sum(v.nbytes for s in opt.state.values() for v in s.values())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    # Every buffer saved once, beside the pickled dict. Saved once per view instead, the 600
    # views of the three shared state buffers would write each of them 200 times (over 1 MB).
    assert state_bytes <= buffer.tell() < state_bytes + 2048 * len(params)
    buffer.seek(0)
    restored = fused_opt.AdamW(clone_params(params), amsgrad=True)
    restored.load_state_dict(torch.load(buffer))
    for p, q in zip(params, restored.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            torch.testing.assert_close(restored.state[q][key], value, rtol=0, atol=0)


def test_params_without_a_grad_get_their_own_state_later():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    reference = clone_params(params)
    opt = fused_opt.Adam(params, lr=1e-2)
    torch_opt = torch.optim.Adam(reference, lr=1e-2)
    for step in range(3):
        # The last two params have no grad on the first step, so their states come later.
        with_grads = params if step else params[:2]
        set_grads(with_grads, step)
        set_grads(reference if step else reference[:2], step)
        for p in params[len(with_grads):]:
            p.grad = None
        for p in reference[len(with_grads):]:
            p.grad = None
        opt.step()
        torch_opt.step()
    assert_params_close(params, reference)
    assert_states_close(opt, params, torch_opt, reference)
    first = {_storage(opt.state[p]["exp_avg"]) for p in params[:2]}
    later = {_storage(opt.state[p]["exp_avg"]) for p in params[2:]}
    assert len(first) == 1 and len(later) == 1 and first != later


def test_a_write_to_one_view_changes_no_other_param():
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fused_opt.AdamW(params)
    opt.step()
    before = [opt.state[p]["exp_avg"].clone() for p in params]
    opt.state[params[1]]["exp_avg"].fill_(7.0)
    torch.testing.assert_close(opt.state[params[0]]["exp_avg"], before[0], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[params[2]]["exp_avg"], before[2], rtol=0, atol=0)
