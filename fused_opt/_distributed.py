"""DTensor params (FSDP2's ``fully_shard``, tensor parallelism): what a step needs to know of them.

A fused step is elementwise, so it steps each rank's local shard with one op call per device, as
for plain tensors: the states are DTensors with the param's placements (``zeros_like`` of the
param), so checkpoints (torch.distributed.checkpoint, ``get_optimizer_state_dict``) see what
torch.optim leaves. Only the global gradient norm and the inf/NaN flag look across ranks.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

if torch.distributed.is_available():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
else:  # a torch built without distributed support has no DTensors to step
    dist = None
    DTensor = ()


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def placement_problem(p: Tensor, grad: Tensor) -> str | None:
    """Why a param and its grad cannot be stepped shard by shard, or None."""
    if is_dtensor(p) != is_dtensor(grad):
        kinds = ("a DTensor" if is_dtensor(t) else "a plain tensor" for t in (grad, p))
        return "the grad is {} but the param is {}".format(*kinds)
    if is_dtensor(p) and grad.device_mesh != p.device_mesh:
        return f"the grad is on device mesh {grad.device_mesh} but the param on {p.device_mesh}"
    return None


def local_grad(p: Tensor, grad: Tensor) -> Tensor:
    """This rank's part of a DTensor grad, laid out as the param's local shard: a grad placed
    otherwise (Partial sums, another sharding) is redistributed first, as torch.optim's ops would
    by sharding propagation."""
    if grad.placements != p.placements:
        grad = grad.redistribute(p.device_mesh, p.placements)
    return grad.to_local()


def local_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state with each DTensor replaced by its local shard (the step counter is a plain
    tensor, as torch.optim keeps it for DTensor params)."""
    return {key: value.to_local() if is_dtensor(value) else value for key, value in state.items()}


def replicas(t: Tensor) -> int:
    """How many ranks of its mesh hold each element of a DTensor's local shard: the product of
    the sizes of the mesh dimensions it is replicated over."""
    count = 1
    for dim, placement in enumerate(t.placements):
        if placement.is_replicate():
            count *= t.device_mesh.size(dim)
    return count


def all_reduce_sum(t: Tensor, mesh: Any) -> None:
    """Sums ``t`` over every rank of ``mesh`` in place: one collective when the mesh spans the
    whole world (FSDP2's usual mesh), else one per mesh dimension."""
    if mesh.size() == dist.get_world_size():
        dist.all_reduce(t)
        return
    for dim in range(mesh.ndim):
        dist.all_reduce(t, group=mesh.get_group(dim))


def check_shard_group(value: Any) -> None:
    """Refuses a ``shard_group`` that names no process group, before the optimizer exists."""
    if value is None:
        return
    if dist is None:
        raise RuntimeError("shard_group needs torch.distributed, which this torch build lacks")
    if value is True:
        if not dist.is_initialized():
            raise RuntimeError(
                "shard_group=True sums over the default process group, which is not initialized: "
                "call torch.distributed.init_process_group() first"
            )
        return
    if not isinstance(value, dist.ProcessGroup):
        raise TypeError(
            "shard_group must be None, True (the default process group) or a "
            f"torch.distributed.ProcessGroup, got {value!r}"
        )


def process_group(shard_group: Any) -> Any:
    """The process group a ``shard_group`` option names: True is the default group, looked up
    when used, so that it is the one in force then."""
    return dist.group.WORLD if shard_group is True else shard_group


def local_optimizer(optimizer: Any) -> Any:
    """The optimizer that steps this rank's params: ZeroRedundancyOptimizer's local one, else the
    optimizer itself."""
    # Only an imported module's class can have instances: looking the module up costs nothing
    # per step, where an import statement took microseconds (and importing it up front scripts
    # TorchScript classes).
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer):
        return optimizer.optim
    return optimizer
