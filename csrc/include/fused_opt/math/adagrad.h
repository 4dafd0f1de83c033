// Adagrad (Duchi et al. 2011) with torch.optim.Adagrad's learning-rate decay, following its
// documented algorithm.
#pragma once

#include <cmath>

#include "fused_opt/math/l1.h"
#include "fused_opt/math/macros.h"

namespace fused_opt::math {

struct AdagradHyper {
  double lr, lr_decay, weight_decay, eps, l1_decay;
};

template <typename T>
struct AdagradTensorScalars {
  T clr, weight_decay, eps;
  T l1;  // l1_decay
};

template <typename T>
FUSED_OPT_HD AdagradTensorScalars<T> adagrad_tensor_scalars(const AdagradHyper& h, double step) {
  const double clr = h.lr / (1.0 + (step - 1.0) * h.lr_decay);
  return {static_cast<T>(clr), static_cast<T>(h.weight_decay), static_cast<T>(h.eps),
          static_cast<T>(h.l1_decay)};
}

// Proximal L1 (math/l1.h): lr_eff = clr / (sqrt(sum) + eps), the diagonal form of Duchi et al.
// 2011, section 5.1 (their composite mirror descent update for l1).
template <typename T, bool kMaximize, bool kWeightDecay, L1Mode kL1>
struct AdagradElement {
  using opmath = T;
  static constexpr int kNumStates = 1;  // sum
  // Which states may be negative, bit s for state s (math/quantize.h picks their 8-bit code).
  static constexpr unsigned kSignedStates = 0;

  AdagradTensorScalars<T> s;

  FUSED_OPT_HD void operator()(T& param, T grad, T* states) const {
    if constexpr (kMaximize) grad = -grad;
    grad = l1_gradient<kL1>(grad, param, s.l1);
    if constexpr (kWeightDecay) grad += s.weight_decay * param;
    T& sum = states[0];
    sum += grad * grad;
    const T denom = std::sqrt(sum) + s.eps;
    if constexpr (kL1 == L1Mode::kProximal) {
      // One division, as without L1: the element's step size serves update and threshold.
      const T lr_eff = s.clr / denom;
      param = soft_threshold(param - lr_eff * grad, lr_eff * s.l1);
    } else {
      param -= s.clr * grad / denom;
    }
  }
};

}  // namespace fused_opt::math
