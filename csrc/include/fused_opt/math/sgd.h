// SGD with optional momentum, dampening, Nesterov momentum and L2 weight decay, following
// torch.optim.SGD's documented algorithm (Sutskever et al. 2013 for the Nesterov form).
#pragma once

#include "fused_opt/math/l1.h"
#include "fused_opt/math/macros.h"

namespace fused_opt::math {

enum class Momentum { kNone, kHeavyBall, kNesterov };

FUSED_OPT_HD constexpr Momentum sgd_momentum_mode(double momentum, bool nesterov) {
  return momentum == 0.0 ? Momentum::kNone : nesterov ? Momentum::kNesterov : Momentum::kHeavyBall;
}

// The momentum buffer is started from the gradient on the step that takes its counter to one.
// The counter sits beside the buffer on the param's device and does not advance on a skipped
// step, so the kernel, not the host, knows whether the buffer holds anything yet.
FUSED_OPT_HD constexpr bool sgd_first_step(double step_after_increment) {
  return step_after_increment == 1.0;
}

struct SgdHyper {
  double lr, momentum, dampening, weight_decay, l1_decay;
};

template <typename T>
struct SgdTensorScalars {
  T lr, momentum, one_minus_dampening, weight_decay;
  // l1_decay, and the proximal threshold l1_decay * lr.
  T l1, l1_threshold;
};

template <typename T>
FUSED_OPT_HD SgdTensorScalars<T> sgd_tensor_scalars(const SgdHyper& h) {
  return {static_cast<T>(h.lr),           static_cast<T>(h.momentum),
          static_cast<T>(1.0 - h.dampening), static_cast<T>(h.weight_decay),
          static_cast<T>(h.l1_decay),        static_cast<T>(h.l1_decay * h.lr)};
}

// kFirstStep: the momentum buffer has never been written, and takes the gradient as is
// (no dampening), as torch.optim.SGD does. Proximal L1 (math/l1.h): lr_eff = lr, the plain
// proximal gradient step (with momentum, the step along the buffer).
template <typename T, bool kMaximize, bool kWeightDecay, Momentum kMomentum, bool kFirstStep,
          L1Mode kL1>
struct SgdElement {
  using opmath = T;
  static constexpr int kNumStates = kMomentum == Momentum::kNone ? 0 : 1;  // momentum_buffer
  // Which states may be negative, bit s for state s (math/quantize.h picks their 8-bit code).
  static constexpr unsigned kSignedStates = 0b1;

  SgdTensorScalars<T> s;

  FUSED_OPT_HD void operator()(T& param, T grad, T* states) const {
    if constexpr (kMaximize) grad = -grad;
    grad = l1_gradient<kL1>(grad, param, s.l1);
    if constexpr (kWeightDecay) grad += s.weight_decay * param;
    if constexpr (kMomentum != Momentum::kNone) {
      T& buffer = states[0];
      if constexpr (kFirstStep) {
        buffer = grad;
      } else {
        buffer = s.momentum * buffer + s.one_minus_dampening * grad;
      }
      if constexpr (kMomentum == Momentum::kNesterov) {
        grad += s.momentum * buffer;
      } else {
        grad = buffer;
      }
    }
    param -= s.lr * grad;
    if constexpr (kL1 == L1Mode::kProximal) param = soft_threshold(param, s.l1_threshold);
  }
};

}  // namespace fused_opt::math
