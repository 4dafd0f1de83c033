// Loss scaling (torch.amp.GradScaler) and global-norm clipping (torch.nn.utils.clip_grad_norm_)
// fold into one factor per step that every gradient is multiplied by in registers, so neither
// needs a pass that writes the gradients back. Every optimizer's update reads its gradients
// through this factor; the update math itself never sees a scaled gradient.
#pragma once

#include "fused_opt/math/macros.h"

namespace fused_opt::math {

// GradScaler.unscale_ takes the reciprocal in double and rounds it to float; doing the same
// gives the same unscaled gradients (exactly so for its power-of-two scales).
FUSED_OPT_HD float inverse_loss_scale(float scale) {
  return static_cast<float>(1.0 / static_cast<double>(scale));
}

// clip_grad_norm_: max_norm / (total_norm + 1e-6), clamped at 1. A NaN norm propagates, as
// torch.clamp propagates it.
FUSED_OPT_HD float clip_coefficient(float total_norm, float max_norm) {
  const float coefficient = max_norm / (total_norm + 1e-6f);
  return coefficient >= 1.0f ? 1.0f : coefficient;
}

// What a step needs to know about its gradients. Pointers are to one-element float32 tensors on
// the device that runs the update (host memory for the CPU kernels); a null pointer means "not
// given". grad_norm is the unscaled global norm; it is read only when clip is set.
struct GradScaling {
  const float* grad_scale;
  const float* found_inf;
  const float* grad_norm;
  float max_grad_norm;
  bool clip;
};

// A step whose gradients held an inf or NaN changes nothing, step counters included.
FUSED_OPT_HD bool skips_step(const GradScaling& g) {
  return g.found_inf != nullptr && *g.found_inf != 0.0f;
}

// The factor every raw gradient is multiplied by before the update math sees it.
FUSED_OPT_HD float grad_factor(const GradScaling& g) {
  float factor = g.grad_scale != nullptr ? inverse_loss_scale(*g.grad_scale) : 1.0f;
  if (g.clip) factor *= clip_coefficient(*g.grad_norm, g.max_grad_norm);
  return factor;
}

}  // namespace fused_opt::math
