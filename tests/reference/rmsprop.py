"""RMSprop reference: the update rule from torch.optim.RMSprop's docstring."""

import numpy as np

from ._checks import check_step_inputs
from .l1 import l1_proximal, l1_subgradient


def rmsprop_step(
    param: np.ndarray,
    grad: np.ndarray,
    state: dict,
    *,
    lr,
    alpha=0.99,
    eps=1e-8,
    weight_decay=0.0,
    momentum=0.0,
    centered=False,
    maximize=False,
    l1_decay=0.0,
    l1_mode="subgradient",
) -> None:
    check_step_inputs(param, grad)

    if not state:
        # Unlike SGD, RMSprop's momentum buffer starts at zero.
        state["step"] = 0
        state["square_avg"] = np.zeros_like(param)
        if momentum > 0:
            state["momentum_buffer"] = np.zeros_like(param)
        if centered:
            state["grad_avg"] = np.zeros_like(param)
    # RMSprop has no bias correction; the step count is bookkeeping only.
    state["step"] += 1

    # The docstring omits maximize; torch negates the raw gradient before weight
    # decay, like the other optimizers.
    g = -grad if maximize else grad
    g = l1_subgradient(g, param, l1_decay, l1_mode)
    if weight_decay != 0:
        g = g + weight_decay * param

    state["square_avg"] = alpha * state["square_avg"] + (1 - alpha) * g * g
    v = state["square_avg"]
    if centered:
        state["grad_avg"] = alpha * state["grad_avg"] + (1 - alpha) * g
        v = v - state["grad_avg"] ** 2

    # eps goes outside the square root (TensorFlow puts it inside).
    avg = np.sqrt(v) + eps
    scaled_grad = g / avg
    if momentum > 0:
        state["momentum_buffer"] = momentum * state["momentum_buffer"] + scaled_grad
        param -= lr * state["momentum_buffer"]
    else:
        param -= lr * scaled_grad
    # The step this update gives its own gradient; with momentum, the buffer's earlier steps had
    # their thresholds applied when they were taken.
    l1_proximal(param, lr / avg, l1_decay, l1_mode)
