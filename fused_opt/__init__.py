"""fused_opt: whole optimizer steps in a few fused kernel calls, drop-in for torch.optim."""

from fused_opt import _ops
from fused_opt.adagrad import Adagrad
from fused_opt.adam import Adam, AdamW
from fused_opt.grad_scaler import GradScaler
from fused_opt.optimizer import FusedOptimizer
from fused_opt.rmsprop import RMSprop
from fused_opt.sgd import SGD

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "RMSprop",
    "Adagrad",
    "FusedOptimizer",
    "GradScaler",
    "built_with_cuda",
]


def built_with_cuda() -> bool:
    """Whether this build of fused_opt registered CUDA kernels for its ops."""
    return all(_ops.has_kernel(name, "CUDA") for name in _ops.OP_NAMES)
