"""Adam / AdamW reference: the update rule from torch.optim.Adam's and AdamW's docstrings."""

import numpy as np

from ._checks import check_step_inputs
from .l1 import l1_proximal, l1_subgradient


def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    state: dict,
    *,
    lr,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    amsgrad=False,
    maximize=False,
    decoupled_weight_decay=False,
    l1_decay=0.0,
    l1_mode="subgradient",
) -> None:
    check_step_inputs(param, grad)
    beta1, beta2 = betas

    if not state:
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(param)
        state["exp_avg_sq"] = np.zeros_like(param)
        if amsgrad:
            state["max_exp_avg_sq"] = np.zeros_like(param)
    state["step"] += 1
    t = state["step"]

    g = -grad if maximize else grad
    g = l1_subgradient(g, param, l1_decay, l1_mode)
    if weight_decay != 0:
        if decoupled_weight_decay:
            # AdamW: decay the weights directly (scaled by the plain lr, not the
            # bias-corrected step size), so the decay never enters the moments.
            param *= 1 - lr * weight_decay
        else:
            g = g + weight_decay * param

    state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * g
    state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g

    m_hat = state["exp_avg"] / (1 - beta1**t)
    if amsgrad:
        # The running maximum is kept over the raw second moment; bias correction
        # is applied afterwards with the current step's factor.
        state["max_exp_avg_sq"] = np.maximum(state["max_exp_avg_sq"], state["exp_avg_sq"])
        v_hat = state["max_exp_avg_sq"] / (1 - beta2**t)
    else:
        v_hat = state["exp_avg_sq"] / (1 - beta2**t)

    param -= lr * m_hat / (np.sqrt(v_hat) + eps)
    # The step multiplies exp_avg by lr / (1 - beta1**t) / (sqrt(v_hat) + eps).
    l1_proximal(param, lr / (1 - beta1**t) / (np.sqrt(v_hat) + eps), l1_decay, l1_mode)


def adamw_step(
    param: np.ndarray,
    grad: np.ndarray,
    state: dict,
    *,
    lr,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-2,
    amsgrad=False,
    maximize=False,
    l1_decay=0.0,
    l1_mode="subgradient",
) -> None:
    adam_step(
        param,
        grad,
        state,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
        l1_decay=l1_decay,
        l1_mode=l1_mode,
    )
