#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "fused_opt/math/adagrad.h"
#include "fused_opt/static_switch.h"
#include "fused_opt/validate.h"

namespace fused_opt::cpu {
namespace {

void adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                 at::TensorList steps, at::TensorList master_params, double lr, double lr_decay,
                 double weight_decay, double eps, bool maximize,
                 const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf,
                 const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm) {
  const ScalingArgs scaling{grad_scale, found_inf, grad_norm, max_grad_norm};
  check_adagrad_args(params, grads, state_sums, steps, master_params, lr_tensor, scaling);
  if (params.empty()) return;
  const std::optional<float> grad_factor = step_grad_factor(scaling);
  if (!grad_factor) return;

  increment_steps(steps);
  const math::AdagradHyper hyper{host_value(lr, lr_tensor), lr_decay, weight_decay, eps};
  with_bool(maximize, [&](auto kMaximize) {
    with_bool(weight_decay != 0.0, [&](auto kWeightDecay) {
      apply_elementwise<1>(params, grads, master_params, {state_sums}, *grad_factor,
                           [&](auto opmath_tag, size_t t, const auto& run) {
                             using T = decltype(opmath_tag);
                             run(math::AdagradElement<T, kMaximize, kWeightDecay>{
                                 math::adagrad_tensor_scalars<T>(hyper, step_value(steps[t]))});
                           });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CPU, m) { m.impl("adagrad_", &adagrad_cpu); }

}  // namespace fused_opt::cpu
