"""fused_opt under a trainer's FSDP2 strategy, on two CPU ranks (gloo): Lightning's
ModelParallelStrategy (``fully_shard`` in ``configure_model``) and accelerate's FSDP2 plugin train,
checkpoint and resume a fused_opt optimizer as they do torch.optim's, which is the oracle.

accelerate 1.16 turns FSDP on only for GPU distributed types (README: Sharded models), so its test
sets the distributed type to FSDP after the Accelerator is made: its FSDP2 code (prepare(), which
shards the model and swaps the optimizer's params for the shards, clip_grad_norm_, save_state and
load_state) then runs on CPU ranks as it would on GPUs, but for the device.

Each test spawns its ranks with tests/ranks.py; Lightning and accelerate join the process group
they made.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
import torch.distributed as dist

import fused_opt
from config import tolerance
from optim_helpers import FULL_STATE_OPTIONS
from ranks import WORLD, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
requires_lightning = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                        reason="Lightning is not installed (pip install lightning)")
requires_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="accelerate is not installed (pip install accelerate)")

# Small enough that every step clips.
CLIP = 0.05
EPOCHS = 2


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _gathered(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every param of a sharded module and its optimizer state, gathered whole, by name."""
    from torch.distributed.tensor import DTensor

    result = {}
    for name, p in module.named_parameters():
        assert isinstance(p, DTensor), f"{name} is not sharded"
        state = optimizer.state[p]
        assert state, f"{name} has no optimizer state"
        result[name] = {"param": p.detach().full_tensor(),
                        **{key: _full(value) for key, value in state.items()}}
    return result


def _lightning_worker(rank: int, precision: str, distributed_checkpoint: bool,
                      directory: str) -> None:
    import lightning
    from lightning.pytorch.plugins import MixedPrecision
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    # What torchrun would set: Lightning then takes the processes as started for it, and the
    # process group as made (tests/ranks.py).
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD))
    options = FULL_STATE_OPTIONS["AdamW"]

    class Module(lightning.LightningModule):
        def __init__(self, fused: bool):
            super().__init__()
            torch.manual_seed(0)
            # Odd sizes: the ranks' shards differ in size.
            self.net = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(),
                                           torch.nn.Linear(13, 3))
            self.fused = fused
            self.steps_run = 0

        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_index):
            self.steps_run += 1
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            if self.fused:
                # fused_opt clips by the global norm over the shards itself; Lightning refuses
                # gradient_clip_val for an optimizer that does (_step_supports_amp_scaling).
                return fused_opt.AdamW(self.parameters(), max_grad_norm=CLIP, **options)
            return torch.optim.AdamW(self.parameters(), **options)

    gen = torch.Generator().manual_seed(5)
    # 2 batches of 4 per rank and epoch: a checkpoint after an epoch resumes with no data loader
    # state to restore, as one after any step would need.
    data = torch.utils.data.TensorDataset(torch.randn(16, 7, generator=gen),
                                          torch.randn(16, 3, generator=gen))

    def fit(fused: bool, epochs: int, ckpt_path: str | None = None):
        plugins = []
        if precision == "16-mixed":
            # Lightning's "16-mixed" flag is refused with ModelParallelStrategy; its plugin, given
            # a scaler, is not. An init scale no fp16 grad overflows at: torch's GradScaler checks
            # each rank's shards alone and could skip on one rank only.
            scaler = (fused_opt.GradScaler if fused else torch.amp.GradScaler)(
                "cpu", init_scale=2.0**8, growth_interval=3)
            plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        module = Module(fused)
        trainer = lightning.Trainer(
            accelerator="cpu", devices=WORLD, plugins=plugins,
            strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1,
                                           save_distributed_checkpoint=distributed_checkpoint),
            gradient_clip_val=None if fused else CLIP, max_epochs=epochs, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        with warnings.catch_warnings():
            # Lightning's advice on workers, logging and weights_only says nothing about fused_opt.
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4),
                        ckpt_path=ckpt_path)
        return trainer, module

    def trained(trainer, module):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return (_gathered(module, trainer.optimizers[0]),
                None if scaler is None else scaler.state_dict())

    runs = {}
    for fused in (False, True):
        full = fit(fused, EPOCHS)
        half_trainer, _ = fit(fused, 1)
        path = os.path.join(directory, f"{'fused' if fused else 'torch'}.ckpt")
        half_trainer.save_checkpoint(path)
        resumed = fit(fused, EPOCHS, ckpt_path=path)
        # The resumed fit ran the second epoch alone: it did restore the checkpoint.
        assert (full[1].steps_run, resumed[1].steps_run) == (2 * EPOCHS, 2), fused
        runs[fused] = trained(*full), trained(*resumed)
        if fused:
            optimizer = full[0].optimizers[0]
            assert float(optimizer.last_grad_norm) > CLIP, "the last step clipped"
            # Under the scaler the step took grad_scale and found_inf in its kernels.
            assert (optimizer.last_step_skipped is not None) == (precision == "16-mixed")
            assert not float(optimizer.last_step_skipped or 0), "no step was skipped"

    for fused in (False, True):
        # Bit for bit: the checkpoint holds every param, state and the scaler.
        (full, full_scaler), (resumed, resumed_scaler) = runs[fused]
        assert full_scaler == resumed_scaler, (fused, full_scaler, resumed_scaler)
        for name, tensors in full.items():
            assert resumed[name].keys() == tensors.keys(), (fused, name)
            for key, value in tensors.items():
                assert torch.equal(resumed[name][key], value), (rank, fused, name, key)

    (torch_run, torch_scaler), _ = runs[False]
    (fused_run, fused_scaler), _ = runs[True]
    assert fused_scaler == torch_scaler
    for name, tensors in torch_run.items():
        assert fused_run[name].keys() == tensors.keys(), name
        for key, value in tensors.items():
            if key == "step":
                assert float(fused_run[name][key]) == float(value), name
                continue
            torch.testing.assert_close(
                fused_run[name][key], value, **tolerance(torch.float32),
                msg=lambda m: f"rank {rank}, {name} {key}: {m}")


@requires_lightning
@pytest.mark.parametrize("distributed_checkpoint", [True, False], ids=["sharded-ckpt", "full-ckpt"])
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_lightning_fsdp2_trains_checkpoints_and_resumes_like_torch(
        precision, distributed_checkpoint, tmp_path):
    spawn(_lightning_worker, precision, distributed_checkpoint, str(tmp_path))


def _accelerate_worker(rank: int, directory: str) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD))
    options = FULL_STATE_OPTIONS["AdamW"]
    steps = 4

    def prepared(optimizer_class):
        AcceleratorState._reset_state(True)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        # The FSDP that accelerate keeps to GPU distributed types (the module docstring).
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
        model, optimizer = accelerator.prepare(model, optimizer_class(model.parameters(), **options))
        return accelerator, model, optimizer

    def train(accelerator, model, optimizer, first, last):
        for step in range(first, last):
            gen = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(5, 7, generator=gen), torch.randn(5, 3, generator=gen)
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            norm = accelerator.clip_grad_norm_(model.parameters(), CLIP)
            assert float(norm) > CLIP, "every step clips"
            optimizer.step()
            optimizer.zero_grad()

    runs = {}
    for optimizer_class in (torch.optim.AdamW, fused_opt.AdamW):
        path = os.path.join(directory, optimizer_class.__module__)
        accelerator, model, optimizer = prepared(optimizer_class)
        train(accelerator, model, optimizer, 0, steps // 2)
        accelerator.save_state(path)
        train(accelerator, model, optimizer, steps // 2, steps)
        # accelerate's prepared optimizer wraps the one it was given.
        full = _gathered(model, optimizer.optimizer)
        accelerator, model, optimizer = prepared(optimizer_class)
        accelerator.load_state(path)
        train(accelerator, model, optimizer, steps // 2, steps)
        resumed = _gathered(model, optimizer.optimizer)
        for name, tensors in full.items():
            assert resumed[name].keys() == tensors.keys(), (optimizer_class, name)
            for key, value in tensors.items():
                assert torch.equal(resumed[name][key], value), (rank, optimizer_class, name, key)
        runs[optimizer_class] = full

    for name, tensors in runs[torch.optim.AdamW].items():
        fused = runs[fused_opt.AdamW][name]
        assert fused.keys() == tensors.keys(), name
        assert float(fused["step"]) == float(tensors["step"]) == steps, name
        for key, value in tensors.items():
            if key != "step":
                torch.testing.assert_close(
                    fused[key], value, **tolerance(torch.float32),
                    msg=lambda m: f"rank {rank}, {name} {key}: {m}")


@requires_accelerate
def test_accelerate_fsdp2_trains_checkpoints_and_resumes_like_torch(tmp_path):
    spawn(_accelerate_worker, str(tmp_path))
