"""Loads the compiled ops and gives them fake (meta) implementations.

The ops only mutate their inputs and return nothing, so their fake implementations have
nothing to compute; registering them lets torch.compile and FakeTensor tracing see the ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import importlib.util

import torch

try:
    from fused_opt import _C  # noqa: F401  (registers torch.ops.fused_opt.*)
except ImportError as exc:
    # Python words a missing _C as "partially initialized module ... circular import", which points
    # away from the cause: the extension was never built, or was built against another torch.
    if importlib.util.find_spec("fused_opt._C") is None:
        raise ImportError(
            "fused_opt's compiled extension (fused_opt._C) is not built: build it first, from the "
            "clone's root: pip install --no-build-isolation -e .  (README: Install)") from exc
    raise ImportError(
        f"fused_opt's compiled extension does not load ({exc}); it must be built against the torch "
        f"that imports it (torch {torch.__version__} here): rebuild it with "
        "pip install --no-build-isolation -e .  (README: Install)") from exc

OP_NAMES = ("adam_", "sgd_", "rmsprop_", "adagrad_", "grad_norm_")
# Elements of the float32 workspace grad_norm_ takes: room for the CUDA kernel's per-block
# partial sums and its completion counter (the CPU kernel needs none). Zeroed once by the
# caller; the kernel leaves it ready for the next call.
GRAD_NORM_WORKSPACE_NUMEL = 4096

#: The op namespace the optimizers call. Tests point it at the emulation tier's
#: ``torch.ops.fused_opt_simt``, whose ops run the CUDA kernels' code on CPU tensors.
op_namespace = torch.ops.fused_opt


def _mutates_only(*args, **kwargs) -> None:
    return None


def register_fakes(library: str) -> None:
    """Gives every op of ``library`` (which has fused_opt's schemas) its fake implementation."""
    for name in OP_NAMES:
        torch.library.register_fake(f"{library}::{name}")(_mutates_only)


register_fakes("fused_opt")


@contextlib.contextmanager
def calling(namespace) -> Iterator[None]:
    """Makes the optimizers call the ops of ``namespace`` instead of fused_opt's, for a while."""
    global op_namespace
    previous, op_namespace = op_namespace, namespace
    try:
        yield
    finally:
        op_namespace = previous


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_opt::{op_name}", dispatch_key)
