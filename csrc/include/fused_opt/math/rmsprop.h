// RMSprop (Hinton, lecture 6e; centered form from Graves 2013), following torch.optim.RMSprop's
// documented algorithm.
#pragma once

#include <cmath>

#include "fused_opt/math/l1.h"
#include "fused_opt/math/lerp.h"
#include "fused_opt/math/macros.h"

namespace fused_opt::math {

struct RmspropHyper {
  double lr, alpha, eps, weight_decay, momentum, l1_decay;
};

// 1 - alpha is taken in double and rounded once, as torch does (see AdamTensorScalars).
template <typename T>
struct RmspropTensorScalars {
  T lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  LerpWeight<T> grad_avg_weight;  // 1 - alpha
  // l1_decay, and l1_decay * lr: the proximal threshold before the division by avg.
  T l1, l1_step;
};

template <typename T>
FUSED_OPT_HD RmspropTensorScalars<T> rmsprop_tensor_scalars(const RmspropHyper& h) {
  return {static_cast<T>(h.lr),
          static_cast<T>(h.alpha),
          static_cast<T>(1.0 - h.alpha),
          static_cast<T>(h.eps),
          static_cast<T>(h.weight_decay),
          static_cast<T>(h.momentum),
          lerp_weight<T>(1.0 - h.alpha),
          static_cast<T>(h.l1_decay),
          static_cast<T>(h.l1_decay * h.lr)};
}

// Proximal L1 (math/l1.h): lr_eff = lr / avg, the step this update gives its own gradient
// (with momentum, the buffer also carries earlier steps, whose thresholds were applied then).
template <typename T, bool kMaximize, bool kWeightDecay, bool kCentered, bool kMomentum,
          L1Mode kL1>
struct RmspropElement {
  using opmath = T;
  // square_avg[, grad_avg][, momentum_buffer]
  static constexpr int kNumStates = 1 + (kCentered ? 1 : 0) + (kMomentum ? 1 : 0);
  // Which states may be negative, bit s for state s (math/quantize.h picks their 8-bit code):
  // all but square_avg.
  static constexpr unsigned kSignedStates = ((1u << kNumStates) - 1u) & ~1u;

  RmspropTensorScalars<T> s;

  FUSED_OPT_HD void operator()(T& param, T grad, T* states) const {
    if constexpr (kMaximize) grad = -grad;
    grad = l1_gradient<kL1>(grad, param, s.l1);
    if constexpr (kWeightDecay) grad += s.weight_decay * param;

    T& square_avg = states[0];
    square_avg = s.alpha * square_avg + s.one_minus_alpha * grad * grad;
    T variance = square_avg;
    if constexpr (kCentered) {
      T& grad_avg = states[1];
      grad_avg = lerp(grad_avg, grad, s.grad_avg_weight);
      variance -= grad_avg * grad_avg;
    }
    const T avg = std::sqrt(variance) + s.eps;
    // Proximal L1 divides once, as the step without it does: the quotient serves the update and
    // the threshold.
    if constexpr (kMomentum) {
      T& buffer = states[kCentered ? 2 : 1];
      if constexpr (kL1 == L1Mode::kProximal) {
        const T inverse_avg = T(1) / avg;
        buffer = s.momentum * buffer + grad * inverse_avg;
        param = soft_threshold(param - s.lr * buffer, s.l1_step * inverse_avg);
      } else {
        buffer = s.momentum * buffer + grad / avg;
        param -= s.lr * buffer;
      }
    } else if constexpr (kL1 == L1Mode::kProximal) {
      const T lr_eff = s.lr / avg;
      param = soft_threshold(param - lr_eff * grad, lr_eff * s.l1);
    } else {
      param -= s.lr * grad / avg;
    }
  }
};

}  // namespace fused_opt::math
