#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "fused_opt/math/sgd.h"
#include "fused_opt/static_switch.h"
#include "fused_opt/validate.h"

namespace fused_opt::cpu {
namespace {

using math::Momentum;

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             at::TensorList steps, at::TensorList master_params, double lr, double momentum,
             double dampening, double weight_decay, bool nesterov, bool maximize,
             const std::optional<at::Tensor>& lr_tensor,
             const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf,
             const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm) {
  const ScalingArgs scaling{grad_scale, found_inf, grad_norm, max_grad_norm};
  check_sgd_args(params, grads, momentum_buffers, steps, master_params, momentum, nesterov,
                 lr_tensor, scaling);
  if (params.empty()) return;
  const std::optional<float> grad_factor = step_grad_factor(scaling);
  if (!grad_factor) return;

  increment_steps(steps);
  const math::SgdHyper hyper{host_value(lr, lr_tensor), momentum, dampening, weight_decay};
  const Momentum mode = math::sgd_momentum_mode(momentum, nesterov);
  with_bool(maximize, [&](auto kMaximize) {
    with_bool(weight_decay != 0.0, [&](auto kWeightDecay) {
      with_constant<Momentum::kNone, Momentum::kHeavyBall, Momentum::kNesterov>(
          mode, [&](auto kMode) {
            apply_elementwise<1>(
                params, grads, master_params, {momentum_buffers}, *grad_factor,
                [&](auto opmath_tag, size_t t, const auto& run) {
                  using T = decltype(opmath_tag);
                  const auto scalars = math::sgd_tensor_scalars<T>(hyper);
                  if constexpr (kMode == Momentum::kNone) {
                    run(math::SgdElement<T, kMaximize, kWeightDecay, kMode, false>{scalars});
                  } else {
                    with_bool(math::sgd_first_step(step_value(steps[t])), [&](auto kFirstStep) {
                      run(math::SgdElement<T, kMaximize, kWeightDecay, kMode, kFirstStep>{
                          scalars});
                    });
                  }
                });
          });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CPU, m) { m.impl("sgd_", &sgd_cpu); }

}  // namespace fused_opt::cpu
