"""Per-dtype tolerances for comparing fused_opt with the float64 references and with torch.optim.

fp32 and fp64 keep states in their own precision and differ from the references only by
rounding order. 16-bit params keep 16-bit states (as torch.optim does): fused_opt rounds each
value once per step while torch's for-loop rounds after every sub-operation, so after ten
steps the two sit a few 16-bit ulps apart.
"""

import torch

TOLERANCES = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-11},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float16: {"rtol": 1e-2, "atol": 2e-3},
    # bf16 keeps 8 significant bits, so a param of magnitude 2 to 4 has an ulp of 2**-6, above
    # an Adam-sized update (lr = 1e-2): every step rounds by up to half an ulp, in fused_opt and
    # in torch alike, and torch's separate AdamW decay multiply (1 - lr * wd) rounds back to the
    # param outright. Ten steps rounding in opposite directions leave the two up to ten ulps
    # apart, 10 * 2**-7 ~ 8% at the bottom of a binade (observed: 6% from torch, 5% from the
    # reference); fp16's rtol is the same bound for its 11 bits.
    torch.bfloat16: {"rtol": 8e-2, "atol": 1e-2},
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Tolerance for a param dtype; complex params use their real dtype's row."""
    if dtype.is_complex:
        dtype = dtype.to_real()
    return TOLERANCES[dtype]
