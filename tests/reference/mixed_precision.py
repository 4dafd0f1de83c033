"""What a step sees of its gradients under loss scaling and global-norm clipping.

torch.amp.GradScaler divides the gradients by the loss scale and skips the step when any of them
holds an inf or NaN; torch.nn.utils.clip_grad_norm_ then multiplies them all by
min(1, max_norm / (total_norm + 1e-6)), total_norm being the L2 norm of all of them together.
Master weights need no reference of their own: the float64 param of a reference step is the
master, and the 16-bit param is its rounding.
"""

import math

import numpy as np


def unscale_and_clip(
    grads: list[np.ndarray], scale: float | None = None, max_norm: float | None = None
) -> list[np.ndarray] | None:
    """The gradients the optimizer's update uses, or None when the scaler skips the step."""
    if scale is not None:
        grads = [g / scale for g in grads]
        if not all(np.isfinite(g).all() for g in grads):
            return None
    if max_norm is not None:
        total_norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
        coefficient = min(1.0, max_norm / (total_norm + 1e-6))
        grads = [g * coefficient for g in grads]
    return grads
