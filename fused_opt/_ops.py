"""Loads the compiled ops and gives them fake (meta) implementations.

The ops only mutate their inputs and return nothing, so their fake implementations have
nothing to compute; registering them lets torch.compile and FakeTensor tracing see the ops.
"""

import torch

from fused_opt import _C  # noqa: F401  (registers torch.ops.fused_opt.*)

OP_NAMES = ("adam_", "sgd_", "rmsprop_", "adagrad_", "grad_norm_")
# Elements of the float32 workspace grad_norm_ takes: room for the CUDA kernel's per-block
# partial sums and its completion counter (the CPU kernel needs none). Zeroed once by the
# caller; the kernel leaves it ready for the next call.
GRAD_NORM_WORKSPACE_NUMEL = 4096


def _mutates_only(*args, **kwargs) -> None:
    return None


for _name in OP_NAMES:
    torch.library.register_fake(f"fused_opt::{_name}")(_mutates_only)


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_opt::{op_name}", dispatch_key)
