// L1 regularization (and, with an optimizer's weight decay, elastic net) inside every update.
//
// kSubgradient adds l1 * sign(param) to the gradient before the optimizer sees it, with
// sign(0) = 0: the gradient autograd gives for `loss + l1 * param.abs().sum()`, so a step equals
// the optimizer's step on that loss.
//
// kProximal leaves the gradient alone and, after the update, applies the proximal operator of
// lr_eff * l1 * |w|, soft-thresholding: w = sign(w) * max(|w| - lr_eff * l1, 0). Weights that the
// penalty outweighs land on exact zeros and stay there while it does. lr_eff is the step size the
// update applied to this element's gradient: for a diagonal preconditioner D the proximal step in
// D's metric is the elementwise soft-threshold by lr * l1 / D_ii (composite mirror descent,
// Duchi, Hazan & Singer, "Adaptive Subgradient Methods", JMLR 2011, section 5.1 for Adagrad; the
// same for any diagonal preconditioner as in ProxGen, Yun, Lozano & Yang, NeurIPS 2021). Each
// optimizer passes its own lr_eff (see its header).
#pragma once

#include <cmath>

#include "fused_opt/math/macros.h"

namespace fused_opt::math {

enum class L1Mode { kNone, kSubgradient, kProximal };

FUSED_OPT_HD constexpr L1Mode l1_mode(double l1_decay, bool proximal) {
  return l1_decay == 0.0 ? L1Mode::kNone : proximal ? L1Mode::kProximal : L1Mode::kSubgradient;
}

// The gradient with the L1 subgradient added in kSubgradient mode; as is otherwise. The term is
// exactly +-l1 or 0, never a product with sign(param). It is l1 given param's sign bit, masked to
// zero at param == 0: on x86 two bit operations, a compare and an and, one instruction each. Two
// compares and a nested select took a 3-uop blend besides, and a memory-bound loop on one core
// keeps fewer loads in flight the more uops each element takes.
template <L1Mode kMode, typename T>
FUSED_OPT_HD T l1_gradient(T grad, T param, T l1) {
  if constexpr (kMode == L1Mode::kSubgradient) {
    const T signed_l1 = std::copysign(l1, param);
    return grad + (param != T(0) ? signed_l1 : T(0));
  } else {
    return grad;
  }
}

// sign(param) * max(|param| - threshold, 0) for threshold >= 0, as param minus its clamp to
// [-threshold, threshold]: exactly +0 inside the band, param -+ threshold (one rounding, the same
// as |param| - threshold) outside it, and NaN stays NaN so that a diverged step is not hidden.
// The clamp is written as the two selects x86's min and max instructions compute (NaN included),
// so each CPU clone takes one instruction for each.
template <typename T>
FUSED_OPT_HD T soft_threshold(T param, T threshold) {
  const T at_most = threshold < param ? threshold : param;
  const T clamped = -threshold > at_most ? -threshold : at_most;
  return param - clamped;
}

}  // namespace fused_opt::math
