// A float32's bits and back, on the host and the device alike: the rounding helpers
// (rounding.h, quantize.h) work on them with integer operations, which vectorize.
#pragma once

#include <cstdint>
#include <cstring>

#include "fused_opt/math/macros.h"

namespace fused_opt::math {

FUSED_OPT_HD uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

FUSED_OPT_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

}  // namespace fused_opt::math
