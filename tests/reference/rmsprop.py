"""RMSprop reference: the update rule from torch.optim.RMSprop's docstring."""

import numpy as np

from ._checks import check_step_inputs


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
    if weight_decay != 0:
        g = g + weight_decay * param

    state["square_avg"] = alpha * state["square_avg"] + (1 - alpha) * g * g
    v = state["square_avg"]
    if centered:
        state["grad_avg"] = alpha * state["grad_avg"] + (1 - alpha) * g
        v = v - state["grad_avg"] ** 2

    # eps goes outside the square root (TensorFlow puts it inside).
    scaled_grad = g / (np.sqrt(v) + eps)
    if momentum > 0:
        state["momentum_buffer"] = momentum * state["momentum_buffer"] + scaled_grad
        param -= lr * state["momentum_buffer"]
    else:
        param -= lr * scaled_grad
