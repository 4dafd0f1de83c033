// Adam / AdamW per-element update (Kingma & Ba 2015; Loshchilov & Hutter 2019 for the
// decoupled weight decay), following torch.optim.Adam's documented algorithm.
#pragma once

#include <cmath>

#include "fused_opt/math/l1.h"
#include "fused_opt/math/lerp.h"
#include "fused_opt/math/macros.h"

namespace fused_opt::math {

enum class WeightDecay { kNone, kL2, kDecoupled };

FUSED_OPT_HD constexpr WeightDecay adam_weight_decay_mode(double weight_decay, bool decoupled) {
  return weight_decay == 0.0 ? WeightDecay::kNone
         : decoupled         ? WeightDecay::kDecoupled
                             : WeightDecay::kL2;
}

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay, l1_decay;
};

// Everything that depends only on the hyperparameters and the tensor's own step, computed
// once per tensor so the element loop does no pow(). Every `1 - beta` is taken in double and
// rounded once, as torch does: in T, 1 - T(beta) keeps the rounding error of T(beta) and makes
// it relative to a small number (beta2 = 0.9999 in float32: the second moment 1.7e-4 too
// large, 0.9999999: 19%).
template <typename T>
struct AdamTensorScalars {
  LerpWeight<T> exp_avg_weight;  // 1 - beta1
  T beta2, one_minus_beta2, eps, l2, param_decay, step_size, bias_correction2_sqrt;
  T l1;  // l1_decay
};

template <typename T>
FUSED_OPT_HD AdamTensorScalars<T> adam_tensor_scalars(const AdamHyper& h, double step) {
  const double bias_correction1 = 1.0 - std::pow(h.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(h.beta2, step);
  AdamTensorScalars<T> s;
  s.exp_avg_weight = lerp_weight<T>(1.0 - h.beta1);
  s.beta2 = static_cast<T>(h.beta2);
  s.one_minus_beta2 = static_cast<T>(1.0 - h.beta2);
  s.eps = static_cast<T>(h.eps);
  s.l2 = static_cast<T>(h.weight_decay);
  s.param_decay = static_cast<T>(1.0 - h.lr * h.weight_decay);
  s.step_size = static_cast<T>(h.lr / bias_correction1);
  s.bias_correction2_sqrt = static_cast<T>(std::sqrt(bias_correction2));
  s.l1 = static_cast<T>(h.l1_decay);
  return s;
}

// Proximal L1 (math/l1.h): lr_eff = step_size / denom, the factor the update multiplies
// exp_avg by, so the threshold is l1 * step_size / denom.
template <typename T, bool kAmsgrad, bool kMaximize, WeightDecay kWeightDecay,
          L1Mode kL1>
struct AdamElement {
  using opmath = T;
  static constexpr int kNumStates = kAmsgrad ? 3 : 2;  // exp_avg, exp_avg_sq[, max_exp_avg_sq]
  // Which states may be negative, bit s for state s (math/quantize.h picks their 8-bit code).
  static constexpr unsigned kSignedStates = 0b001;

  AdamTensorScalars<T> s;

  FUSED_OPT_HD void operator()(T& param, T grad, T* states) const {
    T& exp_avg = states[0];
    T& exp_avg_sq = states[1];
    if constexpr (kMaximize) grad = -grad;
    // Before any decay, so the sign is that of the weight the loss saw.
    grad = l1_gradient<kL1>(grad, param, s.l1);
    if constexpr (kWeightDecay == WeightDecay::kL2) grad += s.l2 * param;
    if constexpr (kWeightDecay == WeightDecay::kDecoupled) param *= s.param_decay;

    exp_avg = lerp(exp_avg, grad, s.exp_avg_weight);
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * grad * grad;

    T second_moment = exp_avg_sq;
    if constexpr (kAmsgrad) {
      T& max_exp_avg_sq = states[2];
      max_exp_avg_sq = max_exp_avg_sq > exp_avg_sq ? max_exp_avg_sq : exp_avg_sq;
      second_moment = max_exp_avg_sq;
    }
    const T denom = std::sqrt(second_moment) / s.bias_correction2_sqrt + s.eps;
    if constexpr (kL1 == L1Mode::kProximal) {
      // One division, as without L1: the element's step size serves update and threshold.
      const T lr_eff = s.step_size / denom;
      param = soft_threshold(param - lr_eff * exp_avg, lr_eff * s.l1);
    } else {
      param -= s.step_size * exp_avg / denom;
    }
  }
};

}  // namespace fused_opt::math
