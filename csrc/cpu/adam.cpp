#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "fused_opt/math/adam.h"
#include "fused_opt/static_switch.h"
#include "fused_opt/validate.h"

namespace fused_opt::cpu {
namespace {

using math::WeightDecay;

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
              at::TensorList master_params, double lr, double beta1, double beta2,
              double weight_decay, double eps, bool amsgrad, bool maximize,
              bool decoupled_weight_decay, const std::optional<at::Tensor>& beta1_tensor,
              const std::optional<at::Tensor>& beta2_tensor,
              const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm) {
  const ScalingArgs scaling{grad_scale, found_inf, grad_norm, max_grad_norm};
  check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params,
                  amsgrad, lr_tensor, beta1_tensor, beta2_tensor, scaling);
  if (params.empty()) return;
  const std::optional<float> grad_factor = step_grad_factor(scaling);
  if (!grad_factor) return;

  increment_steps(steps);
  const math::AdamHyper hyper{host_value(lr, lr_tensor), host_value(beta1, beta1_tensor),
                              host_value(beta2, beta2_tensor), eps, weight_decay};
  const WeightDecay mode = math::adam_weight_decay_mode(weight_decay, decoupled_weight_decay);
  with_bool(amsgrad, [&](auto kAmsgrad) {
    with_bool(maximize, [&](auto kMaximize) {
      with_constant<WeightDecay::kNone, WeightDecay::kL2, WeightDecay::kDecoupled>(
          mode, [&](auto kMode) {
            apply_elementwise<3>(
                params, grads, master_params, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                *grad_factor, [&](auto opmath_tag, size_t t, const auto& run) {
                  using T = decltype(opmath_tag);
                  run(math::AdamElement<T, kAmsgrad, kMaximize, kMode>{
                      math::adam_tensor_scalars<T>(hyper, step_value(steps[t]))});
                });
          });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CPU, m) { m.impl("adam_", &adam_cpu); }

}  // namespace fused_opt::cpu
