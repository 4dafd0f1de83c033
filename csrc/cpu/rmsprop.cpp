#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "fused_opt/math/rmsprop.h"
#include "fused_opt/static_switch.h"
#include "fused_opt/validate.h"

namespace fused_opt::cpu {
namespace {

void rmsprop_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                 at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
                 at::TensorList master_params, double lr, double alpha, double eps,
                 double weight_decay, double momentum, bool centered, bool maximize,
                 const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf,
                 const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm) {
  const ScalingArgs scaling{grad_scale, found_inf, grad_norm, max_grad_norm};
  check_rmsprop_args(params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
                     master_params, momentum, centered, lr_tensor, scaling);
  if (params.empty()) return;
  const std::optional<float> grad_factor = step_grad_factor(scaling);
  if (!grad_factor) return;
  const bool has_momentum = momentum > 0.0;

  increment_steps(steps);
  const math::RmspropHyper hyper{host_value(lr, lr_tensor), alpha, eps, weight_decay, momentum};
  with_bool(maximize, [&](auto kMaximize) {
    with_bool(weight_decay != 0.0, [&](auto kWeightDecay) {
      with_bool(centered, [&](auto kCentered) {
        with_bool(has_momentum, [&](auto kMomentum) {
          apply_elementwise<3>(
              params, grads, master_params, {square_avgs, grad_avgs, momentum_buffers},
              *grad_factor, [&](auto opmath_tag, size_t, const auto& run) {
                using T = decltype(opmath_tag);
                run(math::RmspropElement<T, kMaximize, kWeightDecay, kCentered, kMomentum>{
                    math::rmsprop_tensor_scalars<T>(hyper)});
              });
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CPU, m) { m.impl("rmsprop_", &rmsprop_cpu); }

}  // namespace fused_opt::cpu
