// Blockwise 8-bit storage of optimizer states (state_dtype=torch.uint8), after Dettmers et al.,
// "8-bit Optimizers via Block-wise Quantization" (ICLR 2022): each block of kQuantBlock
// consecutive elements shares one float32 scale, its absolute maximum, and each element keeps one
// byte of a nonlinear code of its value over that maximum. A block's outlier then costs only its
// own block precision, and a nonlinear code keeps the small values, which are most of a moment's
// elements, from rounding to zero.
//
// The codes are 8-bit floats, not the paper's lookup-table "dynamic" code: their rounding is a
// few integer operations on the float32 bits, which vectorize on the CPU and run in registers on
// the GPU, where searching a table costs a gather per comparison.
//   - Signed states (first moments, momentum buffers): a sign bit, then 4 exponent bits (bias 7)
//     and 3 mantissa bits: magnitudes 2^(e - 7) * (1 + m / 8), from 1.125 * 2^-7 up to 480, which
//     the block's maximum maps to; so within a block 15.7 binary orders of magnitude below the
//     maximum survive.
//   - Non-negative states (second moments, sums of squares): 5 exponent bits (bias 15) and 3
//     mantissa bits, up to 122,880: 31.7 orders, about twice the signed range, as the square of a
//     value spans twice its orders of magnitude, so an element whose second moment flushes to
//     zero has a first moment that already did (Adam divides one by the other's root).
// Code 0 (of the magnitude) is zero, in place of the smallest exponent's first value, 2^-bias. A
// value rounds to the nearest code, ties to the even code, except up to 17/16 of 2^-bias (its tie
// with the next code), where it flushes to zero: no subnormal codes, whose rounding would double
// the cost of every element, for the bottom 3 binary orders of a block's range. Every byte is a
// finite value; the relative error within range is at most 2^-4.
//
// A quantized state is one uint8 tensor: the codes of its n elements in the param's memory order,
// zero bytes up to a multiple of 4, then the float32 maximum of each block.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fused_opt/math/bits.h"
#include "fused_opt/math/macros.h"

namespace fused_opt::math {

constexpr int64_t kQuantBlock = 256;

FUSED_OPT_HD constexpr int64_t quantized_blocks(int64_t numel) {
  return (numel + kQuantBlock - 1) / kQuantBlock;
}

// Bytes from the start of a quantized state to its first block maximum.
FUSED_OPT_HD constexpr int64_t quantized_scales_offset(int64_t numel) {
  return (numel + 3) / 4 * 4;
}

FUSED_OPT_HD constexpr int64_t quantized_state_bytes(int64_t numel) {
  return quantized_scales_offset(numel) + quantized_blocks(numel) * int64_t{4};
}

// An 8-bit float code without sign: kExponentBits, 3 mantissa bits, exponent bias kBias; code 0 is
// zero.
template <int kExponentBits, int kBias>
struct MagnitudeCode {
  static constexpr int kMantissaBits = 3;
  static constexpr uint32_t kMaxCode = (1u << (kExponentBits + kMantissaBits)) - 1;
  // float32's exponent bias less ours, in code units.
  static constexpr uint32_t kExponentShift = static_cast<uint32_t>(127 - kBias) << kMantissaBits;
  static constexpr int kDroppedBits = 23 - kMantissaBits;

  FUSED_OPT_HD static constexpr float pow2(int e) {
    float value = 1.0f;
    for (int i = 0; i < e; ++i) value *= 2.0f;
    for (int i = 0; i > e; --i) value *= 0.5f;
    return value;
  }
  // (1 + 7/8) * 2^(max exponent - bias): the value of kMaxCode, which a block's maximum maps to.
  static constexpr float kMax = 1.875f * pow2(static_cast<int>((1u << kExponentBits) - 1) - kBias);

  // The code of a magnitude (NaN and values above kMax take kMaxCode).
  FUSED_OPT_HD static uint32_t encode(float magnitude) {
    // float32's mantissa rounded to 3 bits, ties to even, by integer addition; a carry into the
    // exponent is the next code up, as the codes are ordered like the values. Below our smallest
    // exponent the difference is negative: zero.
    const uint32_t bits = float_bits(magnitude);
    const uint32_t rounded =
        (bits + ((1u << (kDroppedBits - 1)) - 1u) + ((bits >> kDroppedBits) & 1u)) >>
        kDroppedBits;
    const uint32_t code = rounded > kExponentShift ? rounded - kExponentShift : 0u;
    return code < kMaxCode ? code : kMaxCode;
  }

  FUSED_OPT_HD static float decode(uint32_t code) {
    return code == 0 ? 0.0f : float_from_bits((code + kExponentShift) << kDroppedBits);
  }
};

using SignedStateCode = MagnitudeCode<4, 7>;
using UnsignedStateCode = MagnitudeCode<5, 15>;

// A block's scales from its maximum: what a code's value is multiplied by to give the state, and
// what a state is multiplied by to give a value to encode. The inverse stays finite for a zero
// or tiny maximum, whose block then holds zeros (or values below the maximum's own precision).
template <bool kSigned>
struct StateCode {
  using Code = std::conditional_t<kSigned, SignedStateCode, UnsignedStateCode>;

  // A product, not a quotient, so that fused_opt/_quantize.py's torch ops, which may turn a
  // division by a number into a multiplication, give the same bits.
  FUSED_OPT_HD static float scale(float absmax) { return absmax * (1.0f / Code::kMax); }

  FUSED_OPT_HD static float inverse_scale(float absmax) {
    const float inverse = Code::kMax / absmax;
    return inverse < 3.0e38f ? inverse : 3.0e38f;
  }

  // The byte of `value` times `inverse_scale`: sign and magnitude (unsigned states, value >= 0:
  // a negative value, which the math never makes, is stored as its magnitude's code).
  FUSED_OPT_HD static uint8_t encode(float value, float inverse) {
    const uint32_t bits = float_bits(value * inverse);
    const uint32_t magnitude = Code::encode(float_from_bits(bits & 0x7fffffffu));
    if constexpr (kSigned) {
      return static_cast<uint8_t>(((bits >> 24) & 0x80u) | magnitude);
    } else {
      return static_cast<uint8_t>(magnitude);
    }
  }

  FUSED_OPT_HD static float decode(uint8_t byte, float scale) {
    if constexpr (kSigned) {
      const float magnitude = Code::decode(byte & 0x7fu) * scale;
      return float_from_bits(float_bits(magnitude) | (static_cast<uint32_t>(byte & 0x80u) << 24));
    } else {
      return Code::decode(byte) * scale;
    }
  }
};

// Whether state s of an element functor is signed: bit s of its kSignedStates.
template <typename Element>
FUSED_OPT_HD constexpr bool signed_state(int s) {
  return ((Element::kSignedStates >> s) & 1u) != 0;
}

}  // namespace fused_opt::math
