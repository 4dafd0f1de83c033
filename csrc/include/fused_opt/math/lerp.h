// Linear interpolation of a running average toward a new value, as torch.lerp computes it
// (ATen/native/Lerp.h). An average updated as `avg + (x - avg) * weight` is exact only at weight
// 0: at weight 1 (Adam's beta1 = 0, RMSprop's alpha = 0) `avg + (x - avg)` loses every digit of a
// small x that follows a large avg. torch counts from `avg` below weight 0.5 and from `x` above,
// so both ends are exact; the formula is picked once per tensor, never per element.
#pragma once

#include "fused_opt/math/macros.h"

namespace fused_opt::math {

template <typename T>
struct LerpWeight {
  // weight when counting from the start, weight - 1 when counting from the end
  T coefficient;
  // 1 when counting from the end, else 0: a number, not a bool, so that the per-element select
  // stays a vector blend in every CPU clone (a bool member kept GCC's AVX-512 clone scalar).
  T from_end;
};

// `weight` is taken in double (1 - beta computed there) and rounded once to T, as torch rounds
// its Python-float weight once to the tensor's opmath type.
template <typename T>
FUSED_OPT_HD LerpWeight<T> lerp_weight(double weight) {
  const T w = static_cast<T>(weight);
  const bool from_end = !(w < T(0.5) && w > T(-0.5));
  // For |w| >= 0.5, w - 1 is exact, and `end + (w - 1) * (end - start)` has the bits of torch's
  // `end - (end - start) * (1 - w)`: IEEE rounding is symmetric in sign.
  return {from_end ? w - T(1) : w, from_end ? T(1) : T(0)};
}

template <typename T>
FUSED_OPT_HD T lerp(T start, T end, const LerpWeight<T>& weight) {
  return (weight.from_end != T(0) ? end : start) + weight.coefficient * (end - start);
}

}  // namespace fused_opt::math
