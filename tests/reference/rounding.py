"""Rounding float32 values to bfloat16 params, written from the description in
csrc/include/fused_opt/math/rounding.h with NumPy's unsigned 32-bit integers.

Stochastically (param_rounding="stochastic"): the counter-based random bits of (seed, tensor
index in the op call, step, element index), and the rounding that adds 16 of them below
bfloat16's last bit and truncates. With a Kahan compensation (param_rounding="kahan"): to nearest,
keeping what the param lacks of the value in a second bfloat16."""

from __future__ import annotations

import numpy as np

_U32 = np.uint32


def mix32(x):
    """Wellons' lowbias32 of an array (or scalar) of uint32."""
    x = np.asarray(x, dtype=_U32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U32(16))
        x = x * _U32(0x7FEB352D)
        x = x ^ (x >> _U32(15))
        x = x * _U32(0x846CA68B)
        x = x ^ (x >> _U32(16))
    return x


def hash_combine(h, v):
    h = np.asarray(h, dtype=_U32)
    v = np.asarray(v, dtype=_U32)
    with np.errstate(over="ignore"):
        return mix32(h ^ (v + _U32(0x9E3779B9) + (h << _U32(6)) + (h >> _U32(2))))


def _low(value: int) -> np.uint32:
    return _U32(value & 0xFFFFFFFF)


def tensor_key(seed: int, tensor_index: int) -> np.uint32:
    h = hash_combine(0, _low(seed))
    h = hash_combine(h, _low(seed >> 32))
    h = hash_combine(h, _low(tensor_index))
    return hash_combine(h, _low(tensor_index >> 32))


def step_key(key: np.uint32, step: int) -> np.uint32:
    return hash_combine(key, _low(step))


def random_bits(key: np.uint32, numel: int) -> np.ndarray:
    """The 32 random bits of elements 0 .. numel - 1 (below 2**32: all in the first block)."""
    assert numel <= 2**32
    block_key = hash_combine(key, 0)
    return mix32(np.arange(numel, dtype=np.uint64).astype(_U32) ^ block_key)


def round_bfloat16_stochastic(values: np.ndarray, random: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) of float32 ``values`` rounded with ``random`` (uint32 each)."""
    bits = np.asarray(values, dtype=np.float32).view(_U32)
    with np.errstate(over="ignore"):
        rounded = ((bits + (random >> _U32(16))) >> _U32(16)).astype(np.uint16)
    quiet_nan = ((bits >> _U32(16)) | _U32(0x0040)).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded)



def round_bfloat16_nearest(values: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) of finite float32 ``values`` rounded to nearest, ties to even."""
    bits = np.asarray(values, dtype=np.float32).view(_U32)
    with np.errstate(over="ignore"):
        return ((bits + _U32(0x7FFF) + ((bits >> _U32(16)) & _U32(1))) >> _U32(16)).astype(
            np.uint16)


def bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bfloat16 ``bits`` (uint16)."""
    return (np.asarray(bits, dtype=np.uint16).astype(_U32) << _U32(16)).view(np.float32)


def kahan_store(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """param_rounding="kahan": the bfloat16 bits of the param and of its compensation that store
    the updated float32 ``value``: the param rounded to nearest, and what it lacks of the value,
    rounded to nearest (Kahan's compensated summation, with a bfloat16 compensation)."""
    value = np.asarray(value, dtype=np.float32)
    param = round_bfloat16_nearest(value)
    return param, round_bfloat16_nearest(value - bfloat16_values(param))
