"""Blockwise 8-bit states, from the format's definition (csrc/include/fused_opt/math/quantize.h):
blocks of 256 elements, each with its float32 absolute maximum; each element's byte the code
nearest (ties to the even code) its value times 480 (signed: sign, then 4 exponent bits of bias
7 and 3 mantissa bits) or 122,880 (unsigned: 5 exponent bits of bias 15, 3 mantissa bits) over
the maximum, both in float32 as the kernels compute them; code 0 is zero, and magnitudes up to
17/16 of 2^-bias (the tie with the code 2^-bias that zero replaces included) flush to it. The codes' values are enumerated exactly in float64 and the
nearest one searched for, where the kernels round float32 bits.
"""

from __future__ import annotations

import numpy as np

BLOCK = 256
_FORMATS = {True: (4, 7), False: (5, 15)}  # exponent bits, bias


def code_values(signed: bool) -> np.ndarray:
    """The magnitude of every code (7 bits signed, 8 unsigned), in float64, exactly."""
    exponent_bits, bias = _FORMATS[signed]
    codes = np.arange(1 << (exponent_bits + 3))
    values = 2.0 ** ((codes >> 3) - bias) * (1 + (codes & 7) / 8)
    values[0] = 0.0
    return values


def max_value(signed: bool) -> float:
    return float(code_values(signed)[-1])


def nearest_codes(magnitudes: np.ndarray, signed: bool) -> np.ndarray:
    """The code nearest each magnitude (>= 0) among the nonzero codes, ties to the even code, or 0
    up to the flush threshold; above the largest code's value, the largest code."""
    _, bias = _FORMATS[signed]
    values = code_values(signed)
    a = np.asarray(magnitudes, dtype=np.float64)
    upper = np.clip(np.searchsorted(values, a, side="left"), 2, len(values) - 1)
    lower = upper - 1
    below, above = a - values[lower], values[upper] - a
    pick_upper = (above < below) | ((above == below) & (upper % 2 == 0))
    nearest = np.where(a >= values[-1], len(values) - 1, np.where(pick_upper, upper, lower))
    return np.where(a <= 2.0 ** -bias * 17 / 16, 0, nearest)


def quantize(values: np.ndarray, signed: bool) -> np.ndarray:
    """The state's bytes: codes, zeros up to a multiple of 4, then the float32 block maxima."""
    x = np.asarray(values, dtype=np.float32).reshape(-1)
    n = x.size
    blocks = -(-n // BLOCK)
    codes = np.zeros(n, dtype=np.uint8)
    maxima = np.zeros(blocks, dtype=np.float32)
    for b in range(blocks):
        part = x[b * BLOCK:(b + 1) * BLOCK]
        absmax = np.float32(np.max(np.abs(part)))
        with np.errstate(divide="ignore"):
            inverse = np.minimum(np.float32(max_value(signed)) / absmax, np.float32(3.0e38))
        scaled = (part * np.float32(inverse)).astype(np.float32)
        code = nearest_codes(np.abs(scaled), signed)
        if signed:
            code = code | np.where(np.signbit(scaled), 0x80, 0)
        codes[b * BLOCK:(b + 1) * BLOCK] = code
        maxima[b] = absmax
    padding = np.zeros((-n) % 4, dtype=np.uint8)
    return np.concatenate([codes, padding, maxima.view(np.uint8)])


def dequantize(packed: np.ndarray, n: int, signed: bool) -> np.ndarray:
    """The float64 values of a state's n elements: code value times maximum over the largest
    code's value (the kernels round that scale and the product to float32)."""
    packed = np.asarray(packed, dtype=np.uint8)
    offset = -(-n // 4) * 4
    maxima = packed[offset:].view(np.float32).astype(np.float64)
    codes = packed[:n].astype(np.int64)
    scale = np.repeat(maxima / max_value(signed), BLOCK)[:n]
    if not signed:
        return code_values(signed)[codes] * scale
    magnitude = code_values(signed)[codes & 0x7F] * scale
    return np.where(codes >= 0x80, -magnitude, magnitude)
