// Adagrad (Duchi et al. 2011) with torch.optim.Adagrad's learning-rate decay, following its
// documented algorithm.
#pragma once

#include <cmath>

#include "fused_opt/math/macros.h"

namespace fused_opt::math {

struct AdagradHyper {
  double lr, lr_decay, weight_decay, eps;
};

template <typename T>
struct AdagradTensorScalars {
  T clr, weight_decay, eps;
};

template <typename T>
FUSED_OPT_HD AdagradTensorScalars<T> adagrad_tensor_scalars(const AdagradHyper& h, double step) {
  return {static_cast<T>(h.lr / (1.0 + (step - 1.0) * h.lr_decay)), static_cast<T>(h.weight_decay),
          static_cast<T>(h.eps)};
}

template <typename T, bool kMaximize, bool kWeightDecay>
struct AdagradElement {
  using opmath = T;
  static constexpr int kNumStates = 1;  // sum

  AdagradTensorScalars<T> s;

  FUSED_OPT_HD void operator()(T& param, T grad, T* states) const {
    if constexpr (kMaximize) grad = -grad;
    if constexpr (kWeightDecay) grad += s.weight_decay * param;
    T& sum = states[0];
    sum += grad * grad;
    param -= s.clr * grad / (std::sqrt(sum) + s.eps);
  }
};

}  // namespace fused_opt::math
