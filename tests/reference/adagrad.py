"""Adagrad reference: the update rule from torch.optim.Adagrad's docstring."""

import numpy as np

from ._checks import check_step_inputs
from .l1 import l1_proximal, l1_subgradient


def adagrad_step(
    param: np.ndarray,
    grad: np.ndarray,
    state: dict,
    *,
    lr,
    lr_decay=0.0,
    weight_decay=0.0,
    initial_accumulator_value=0.0,
    eps=1e-10,
    maximize=False,
    l1_decay=0.0,
    l1_mode="subgradient",
) -> None:
    check_step_inputs(param, grad)

    if not state:
        state["step"] = 0
        state["sum"] = np.full_like(param, initial_accumulator_value)
    state["step"] += 1
    t = state["step"]

    # The docstring omits maximize; torch negates the raw gradient before weight
    # decay, like the other optimizers.
    g = -grad if maximize else grad
    g = l1_subgradient(g, param, l1_decay, l1_mode)
    if weight_decay != 0:
        g = g + weight_decay * param

    # (t - 1): the first step uses the undecayed lr.
    decayed_lr = lr / (1 + (t - 1) * lr_decay)

    state["sum"] = state["sum"] + g * g
    denom = np.sqrt(state["sum"]) + eps
    param -= decayed_lr * g / denom
    l1_proximal(param, decayed_lr / denom, l1_decay, l1_mode)
