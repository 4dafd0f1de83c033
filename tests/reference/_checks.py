import numpy as np


def check_step_inputs(param: np.ndarray, grad: np.ndarray) -> None:
    # In-place numpy arithmetic silently downcasts and broadcasts, so a float32
    # param or a mis-shaped grad would quietly produce a wrong "reference".
    if param.dtype != np.float64 or grad.dtype != np.float64:
        raise TypeError(f"references are float64-only, got {param.dtype} and {grad.dtype}")
    if param.shape != grad.shape:
        raise ValueError(f"param shape {param.shape} != grad shape {grad.shape}")
