"""fused_opt inside the machinery of real training: torch.compile, DDP and ZeroRedundancyOptimizer."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer

import fused_opt
from optim_helpers import FULL_STATE_OPTIONS, NAMES

STEPS = 3


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batches(seed: int, count: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen))
            for _ in range(count)]


def _loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_equals_eager_step(name):
    options = {**FULL_STATE_OPTIONS[name], "lr": torch.tensor(FULL_STATE_OPTIONS[name]["lr"]),
               "max_grad_norm": 0.5}
    eager_model, compiled_model = _model(), _model()

    def groups(model: torch.nn.Module) -> list[dict]:
        # Two groups in one op call: a float lr beside the tensor lr of the defaults.
        return [{"params": model[0].parameters()},
                {"params": model[2].parameters(), "lr": options["lr"].item() / 2}]

    eager = getattr(fused_opt, name)(groups(eager_model), **options)
    compiled = getattr(fused_opt, name)(groups(compiled_model), **options)
    compiled_step = torch.compile(compiled.step)
    for batch in _batches(1):
        for model in (eager_model, compiled_model):
            model.zero_grad()
            _loss(model, batch).backward()
        eager.step()
        compiled_step()
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        for key, value in eager.state[a].items():
            assert torch.equal(compiled.state[b][key], value), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        trained = {}
        for kind in ("fused_opt", "torch", "zero"):
            model = torch.nn.parallel.DistributedDataParallel(_model())
            if kind == "fused_opt":
                optimizer = fused_opt.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5)
            elif kind == "zero":
                optimizer = ZeroRedundancyOptimizer(
                    model.parameters(), optimizer_class=fused_opt.AdamW, lr=1e-2,
                    max_grad_norm=None,
                )
            else:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            # Each rank sees its own data; DDP averages the grads.
            for batch in _batches(10 + rank):
                optimizer.zero_grad()
                _loss(model, batch).backward()
                if kind == "torch":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                optimizer.step()
            trained[kind] = [p.detach().clone() for p in model.parameters()]
        results[rank] = trained
    finally:
        dist.destroy_process_group()


def test_ddp_and_zero_redundancy_train_like_torch():
    world_size = 2
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(world_size, _free_port(), results), nprocs=world_size, join=True)
    ranks = [results[rank] for rank in range(world_size)]
    for kind in ("fused_opt", "torch", "zero"):
        for a, b in zip(ranks[0][kind], ranks[1][kind]):
            assert torch.equal(a, b), f"{kind}: the ranks' params differ"
    # Clipped (global norm of the averaged grads, which every rank holds) and unclipped AdamW.
    for a, b in zip(ranks[0]["fused_opt"], ranks[0]["torch"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    reference = _unclipped_reference()
    for a, b in zip(ranks[0]["zero"], reference):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def _unclipped_reference() -> list[torch.Tensor]:
    """torch.optim.AdamW on the two ranks' batches, grads averaged, in one process."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch0, batch1 in zip(_batches(10), _batches(11)):
        optimizer.zero_grad()
        ((_loss(model, batch0) + _loss(model, batch1)) / 2).backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]
