"""SGD reference: the update rule from torch.optim.SGD's docstring."""

import numpy as np

from ._checks import check_step_inputs
from .l1 import l1_proximal, l1_subgradient


def sgd_step(
    param: np.ndarray,
    grad: np.ndarray,
    state: dict,
    *,
    lr,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    maximize=False,
    l1_decay=0.0,
    l1_mode="subgradient",
) -> None:
    check_step_inputs(param, grad)
    # torch.optim.SGD rejects this combination in its constructor, so no
    # semantics exist to reproduce for it.
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    g = -grad if maximize else grad
    g = l1_subgradient(g, param, l1_decay, l1_mode)
    if weight_decay != 0:
        g = g + weight_decay * param

    if momentum != 0:
        if "momentum_buffer" in state:
            state["momentum_buffer"] = momentum * state["momentum_buffer"] + (1 - dampening) * g
        else:
            # The first step seeds the buffer with the gradient itself, undampened.
            state["momentum_buffer"] = g.copy()
        buf = state["momentum_buffer"]
        g = g + momentum * buf if nesterov else buf

    param -= lr * g
    l1_proximal(param, lr, l1_decay, l1_mode)
