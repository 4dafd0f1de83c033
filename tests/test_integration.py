"""fused_opt inside the machinery of real training: torch.compile, DDP, ZeroRedundancyOptimizer,
torch.distributed.checkpoint, and a trainer's clipping under mixed precision (Lightning where it
is installed)."""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

import fused_opt
from optim_helpers import (
    FULL_STATE_OPTIONS,
    NAMES,
    assert_params_close,
    assert_same_tree,
    assert_states_close,
)

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


def test_compiled_step_with_master_weights_equals_eager_and_refreshes_on_request():
    # A compiled step cannot branch on version counters, so it never looks for edits;
    # refresh_master_weights() after an edit gives what the eager step does by itself.
    eager_model, compiled_model = _model().bfloat16(), _model().bfloat16()
    eager = fused_opt.AdamW(eager_model.parameters(), lr=1e-2, master_weights=True)
    compiled = fused_opt.AdamW(compiled_model.parameters(), lr=1e-2, master_weights=True)
    compiled_step = torch.compile(compiled.step)
    for index, batch in enumerate(_batches(2)):
        if index == 2:
            with torch.no_grad():
                for model in (eager_model, compiled_model):
                    model[0].weight.clamp_(-0.125, 0.125)
            compiled.refresh_master_weights()
        for model in (eager_model, compiled_model):
            model.zero_grad()
            _loss(model, tuple(t.bfloat16() for t in batch)).backward()
        eager.step()
        compiled_step()
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.equal(a, b)
        for key, value in eager.state[a].items():
            assert torch.equal(compiled.state[b][key], value), key
    assert eager_model[0].weight.abs().max() < 0.2, "the clipping was kept"


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


# ------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint

MODULES = {"torch": torch.optim, "fused": fused_opt}


def _train_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    for batch in batches:
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()


# One process, no process group: DCP says it saves and loads as a single process.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("direction", ["torch-to-fused", "fused-to-torch"])
@pytest.mark.parametrize("name", NAMES)
def test_distributed_checkpoint_moves_between_torch_and_fused(name, direction, tmp_path):
    # DCP loads a checkpoint into the keys of the target's own state dict: a key that only the
    # target has is a missing key. Loaded, the target must train on exactly as one that loaded
    # the same checkpoint with load_state_dict (tests/test_state_dict.py compares those with
    # torch.optim).
    source_module, target_module = (MODULES[side] for side in direction.split("-to-"))
    options = FULL_STATE_OPTIONS[name]
    source_model = _model()
    source = getattr(source_module, name)(source_model.parameters(), **options)
    _train_model(source_model, source, _batches(20))
    _assert_dcp_resumes_as_load_state_dict(
        source_model, source, lambda params: getattr(target_module, name)(params, **options), tmp_path)


def _assert_dcp_resumes_as_load_state_dict(source_model, source, make_target, tmp_path,
                                           check_loaded=None) -> None:
    """Saves `source` with DCP, loads it into an optimizer of `make_target` over a copy of the
    model (`check_loaded(target)` then, when given), and asserts that 21 more steps give the same
    params and state as a twin given the same checkpoint by load_state_dict."""
    dcp.save({"optim": get_optimizer_state_dict(source_model, source)}, checkpoint_id=tmp_path)
    trained = []
    for through_dcp in (True, False):
        model = copy.deepcopy(source_model)
        target = make_target(model.parameters())
        if through_dcp:
            loaded = {"optim": get_optimizer_state_dict(model, target)}
            dcp.load(loaded, checkpoint_id=tmp_path)
            set_optimizer_state_dict(model, target, optim_state_dict=loaded["optim"])
            if check_loaded is not None:
                check_loaded(target)
        else:
            target.load_state_dict(copy.deepcopy(source.state_dict()))
        _train_model(model, target, _batches(21))
        trained.append(([p.detach() for p in model.parameters()], target.state_dict()))
    assert_same_tree(trained[0], trained[1])


# 8-bit states are flat uint8 tensors beside float32 ones (a first layer of 16 x 300 weights is
# above the 4,096 elements from which states are quantized; the rest stays float32): DCP must
# save and load them byte for byte, so the loaded optimizer trains on exactly as one given the
# same state dict by load_state_dict.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("name", NAMES)
def test_distributed_checkpoint_keeps_8bit_states(name, tmp_path):
    # Centered RMSprop refuses 8-bit states (its variance estimate diverged; fused_opt/rmsprop.py).
    options = {**FULL_STATE_OPTIONS[name], "centered": False} if name == "RMSprop" else FULL_STATE_OPTIONS[name]
    options = {**options, "state_dtype": torch.uint8}

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.Tanh(), torch.nn.Linear(300, 4))

    source_model = model()
    source = getattr(fused_opt, name)(source_model.parameters(), **options)
    _train_model(source_model, source, _batches(20))
    saved = source.state_dict()
    assert saved["state"][0][next(iter(saved["state"][0].keys() - {"step"}))].dtype == torch.uint8
    _assert_dcp_resumes_as_load_state_dict(
        source_model, source, lambda params: getattr(fused_opt, name)(params, **options), tmp_path,
        check_loaded=lambda target: assert_same_tree(target.state_dict()["state"], saved["state"]))


# ------------------------------------------------------------------------------------------------
# A trainer's own clipping under mixed precision


def _trainer_step(optimizer, scaler, loss: torch.Tensor, params, clip: float) -> None:
    """One step as trainers drive an optimizer (Lightning's MixedPrecision plugin): an optimizer
    that declares _step_supports_amp_scaling unscales in its step, so the trainer cannot clip
    its grads; any other has its grads unscaled by the trainer and then clipped."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        raise RuntimeError("does not allow for gradient clipping")
    if scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()


SCALERS = {
    "no-scaler": lambda: None,
    "torch-scaler": lambda: torch.amp.GradScaler("cpu", init_scale=2.0**10),
    "fused-scaler": lambda: fused_opt.GradScaler("cpu", init_scale=2.0**10),
}


@pytest.mark.parametrize("scaler_kind", SCALERS)
@pytest.mark.parametrize("name", NAMES)
def test_trainer_clipping_with_or_without_a_scaler_trains_like_torch(name, scaler_kind):
    results = []
    for module in (torch.optim, fused_opt):
        model = _model()
        optimizer = getattr(module, name)(model.parameters(), **FULL_STATE_OPTIONS[name])
        scaler = SCALERS[scaler_kind]()
        for batch in _batches(30):
            optimizer.zero_grad()
            _trainer_step(optimizer, scaler, _loss(model, batch), list(model.parameters()), 0.1)
        results.append((list(model.parameters()), optimizer))
    (torch_params, torch_opt), (fused_params, fused) = results
    assert_params_close(fused_params, torch_params)
    assert_states_close(fused, fused_params, torch_opt, torch_params)


def test_optimizer_that_clips_itself_takes_the_scaling_in_its_kernels():
    # With max_grad_norm the optimizer clips, so a trainer must not; torch's GradScaler then
    # hands it grad_scale and found_inf, and no pass writes the grads.
    model = _model()
    optimizer = fused_opt.AdamW(model.parameters(), max_grad_norm=0.1)
    assert optimizer._step_supports_amp_scaling
    assert not fused_opt.AdamW(model.parameters())._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(_loss(model, _batches(31)[0])).backward()
    versions = [p.grad._version for p in model.parameters()]
    scaler.step(optimizer)
    assert [p.grad._version for p in model.parameters()] == versions


LIGHTNING = importlib.util.find_spec("lightning") is not None


@pytest.mark.skipif(not LIGHTNING, reason="Lightning is not installed (pip install lightning)")
@pytest.mark.parametrize("scaler_kind", [None, "torch-scaler", "fused-scaler"],
                         ids=["bf16-mixed", "16-mixed-torch-scaler", "16-mixed-fused-scaler"])
def test_lightning_gradient_clipping_trains_like_torch(scaler_kind):
    import lightning
    from lightning.pytorch.plugins import MixedPrecision

    def precision():
        # Lightning turns precision="16-mixed" into bf16 on a CPU; its plugin keeps fp16 and the
        # scaler it is given.
        if scaler_kind is None:
            return {"precision": "bf16-mixed"}
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=SCALERS[scaler_kind]())]}

    class Module(lightning.LightningModule):
        def __init__(self, optimizer_class):
            super().__init__()
            self.net, self.optimizer_class = _model(), optimizer_class

        def training_step(self, batch, batch_index):
            return _loss(self.net, batch)

        def configure_optimizers(self):
            return self.optimizer_class(self.parameters(), lr=1e-2)

    generator = torch.Generator().manual_seed(32)
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 16, generator=generator), torch.randn(24, 4, generator=generator)
    )
    trained = []
    for optimizer_class in (torch.optim.AdamW, fused_opt.AdamW):
        module = Module(optimizer_class)
        trainer = lightning.Trainer(
            accelerator="cpu", **precision(), gradient_clip_val=0.1, max_steps=3,
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )
        with warnings.catch_warnings():
            # Lightning's advice on workers and logging says nothing about fused_opt.
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        trained.append(list(module.parameters()))
    assert_params_close(trained[1], trained[0])
