"""Float64 NumPy reference optimizers that define correctness for fused_opt.

Each ``*_step(param, grad, state, **hyperparameters)`` performs one step on one
real float64 array, updating ``param`` in place and ``state`` (keyed exactly
like torch.optim's per-parameter state, with ``step`` as a Python int). An
empty ``state`` means the first step.
"""

from .adagrad import adagrad_step
from .adam import adam_step, adamw_step
from .mixed_precision import unscale_and_clip
from .rmsprop import rmsprop_step
from .sgd import sgd_step

__all__ = [
    "REFERENCES",
    "adagrad_step",
    "adam_step",
    "adamw_step",
    "rmsprop_step",
    "sgd_step",
    "unscale_and_clip",
]

REFERENCES = {
    "Adam": adam_step,
    "AdamW": adamw_step,
    "SGD": sgd_step,
    "RMSprop": rmsprop_step,
    "Adagrad": adagrad_step,
}
