"""Blockwise 8-bit states (``state_dtype=torch.uint8``) outside the step: making them from float
states and back, for state creation, checkpoints and torch.optim interchange. The format and its
codes are those of csrc/include/fused_opt/math/quantize.h, which the kernels use; these torch ops
give the same bytes and values bit for bit, on any device.

A quantized state is one flat uint8 tensor: the codes of the param's elements in its memory
order, zero bytes up to a multiple of 4, then one float32 maximum per block of 256 elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The name of the format, saved in a checkpoint's param groups beside quantized states.
FORMAT = "blockwise8-256-e4m3-e5m3"
#: The group key that names the format of a checkpoint's quantized states.
FORMAT_KEY = "state_format"
BLOCK = 256
#: Params with fewer elements keep float32 states under state_dtype=torch.uint8: their bytes are
#: few, and a block maximum per 256 elements would cost as much as it saves.
MIN_NUMEL = 4096

_MANTISSA_BITS = 3
_DROPPED_BITS = 23 - _MANTISSA_BITS
# (exponent bits, bias) of the signed code's magnitude and of the unsigned code.
_CODES = {True: (4, 7), False: (5, 15)}


def state_bytes(numel: int) -> int:
    return _scales_offset(numel) + 4 * _blocks(numel)


def _blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def _scales_offset(numel: int) -> int:
    return (numel + 3) // 4 * 4


def _max_value(signed: bool) -> float:
    exponent_bits, bias = _CODES[signed]
    return 1.875 * 2.0 ** ((1 << exponent_bits) - 1 - bias)


def _float32_reciprocal(value: float, device: torch.device) -> Tensor:
    """1 / value rounded once to float32, as the kernels' constant is (a Python float would be
    rounded to double first)."""
    return torch.ones((), dtype=torch.float32, device=device) / torch.tensor(
        value, dtype=torch.float32, device=device
    )


def _shift(signed: bool) -> int:
    """float32's exponent bias less the code's, in code units."""
    return (127 - _CODES[signed][1]) << _MANTISSA_BITS


def _encode_magnitude(
    magnitude: Tensor, signed: bool, generator: torch.Generator | None
) -> Tensor:
    exponent_bits, _ = _CODES[signed]
    max_code = (1 << (exponent_bits + _MANTISSA_BITS)) - 1
    bits = magnitude.view(torch.int32).to(torch.int64)
    if generator is None:  # to nearest, ties to even
        offset = ((1 << (_DROPPED_BITS - 1)) - 1) + ((bits >> _DROPPED_BITS) & 1)
    else:  # up with the probability of the dropped bits' fraction
        offset = torch.randint(0, 1 << _DROPPED_BITS, bits.shape, generator=generator,
                               dtype=torch.int64, device=bits.device)
    rounded = (bits + offset) >> _DROPPED_BITS
    return torch.clamp(rounded - _shift(signed), min=0, max=max_code)


def _decode_magnitude(code: Tensor, signed: bool) -> Tensor:
    normal = ((code + _shift(signed)) << _DROPPED_BITS).to(torch.int32).view(torch.float32)
    return torch.where(code == 0, 0.0, normal)


def quantize(values: Tensor, signed: bool, generator: torch.Generator | None = None) -> Tensor:
    """The quantized state of the float32 ``values`` (a 1-D tensor in the param's memory order);
    ``signed``: the state may be negative (the optimizer's element functor says which are).
    Values round to the nearest code, as the kernels do, or with a ``generator`` stochastically
    (benchmarks/state_rounding_experiment.py measures what that would give)."""
    numel = values.numel()
    blocks = _blocks(numel)
    padded = torch.zeros(blocks * BLOCK, dtype=torch.float32, device=values.device)
    padded[:numel] = values
    rows = padded.view(blocks, BLOCK)
    absmax = rows.abs().amax(dim=1) if blocks else padded[:0]
    # Divisions of tensors by tensors, correctly rounded as in the kernels: torch computes a
    # number over a tensor through the tensor's reciprocal.
    inverse = torch.clamp(torch.full_like(absmax, _max_value(signed)) / absmax, max=3.0e38)
    scaled = rows * inverse[:, None]
    code = _encode_magnitude(scaled.abs(), signed, generator)
    if signed:
        code = code | torch.where(torch.signbit(scaled), 0x80, 0)
    packed = torch.zeros(state_bytes(numel), dtype=torch.uint8, device=values.device)
    packed[:numel] = code.reshape(-1)[:numel].to(torch.uint8)
    packed[_scales_offset(numel):].view(torch.float32).copy_(absmax)
    return packed


def dequantize(packed: Tensor, numel: int, signed: bool) -> Tensor:
    """The float32 values (1-D, in the param's memory order) of a quantized state of ``numel``
    elements."""
    absmax = packed[_scales_offset(numel):].view(torch.float32)
    scale = absmax * _float32_reciprocal(_max_value(signed), packed.device)
    code = packed[:numel].to(torch.int64)
    block_scale = scale.repeat_interleave(BLOCK)[:numel]
    if not signed:
        return _decode_magnitude(code, signed) * block_scale
    magnitude = _decode_magnitude(code & 0x7F, signed) * block_scale
    # The sign bit set on the magnitude, as the kernels do: code 0x80 is -0.0.
    return torch.where(code >= 0x80, -magnitude, magnitude)
