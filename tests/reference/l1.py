"""L1 regularization, in both of fused_opt's modes (csrc/include/fused_opt/math/l1.h).

subgradient: the gradient of ``loss + l1_decay * sum(|w|)``, i.e. ``l1_decay * sign(w)`` with
sign(0) = 0, added before the optimizer sees the gradient (and before any weight decay, so that
L1 plus ``weight_decay`` is elastic net).

proximal: after the optimizer's update, the proximal operator of ``lr_eff * l1_decay * |w|``,
``w = sign(w) * max(|w| - lr_eff * l1_decay, 0)``, where lr_eff is the per-element step size the
update applied to the gradient: lr for SGD, and for diagonally preconditioned methods lr over
the preconditioner (Duchi, Hazan & Singer 2011, section 5.1, for Adagrad).
"""

import numpy as np

L1_MODES = ("subgradient", "proximal")


def check_l1(l1_decay, l1_mode) -> None:
    if not (np.isfinite(l1_decay) and l1_decay >= 0):
        raise ValueError(f"l1_decay must be a finite number >= 0, got {l1_decay}")
    if l1_mode not in L1_MODES:
        raise ValueError(f"l1_mode must be one of {L1_MODES}, got {l1_mode!r}")


def l1_subgradient(grad: np.ndarray, param: np.ndarray, l1_decay, l1_mode) -> np.ndarray:
    """The gradient the optimizer sees: with the subgradient added in that mode."""
    check_l1(l1_decay, l1_mode)
    if l1_mode == "subgradient" and l1_decay != 0:
        return grad + l1_decay * np.sign(param)
    return grad


def l1_proximal(param: np.ndarray, lr_eff, l1_decay, l1_mode) -> None:
    """Soft-thresholds ``param`` in place in proximal mode; lr_eff is a scalar or an array."""
    if l1_mode == "proximal" and l1_decay != 0:
        param[...] = np.sign(param) * np.maximum(np.abs(param) - lr_eff * l1_decay, 0.0)
