#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "fused_opt/math/rmsprop.h"
#include "fused_opt/static_switch.h"
#include "fused_opt/validate.h"

namespace fused_opt::cpu {
namespace {

using math::L1Mode;

void rmsprop_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                 at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
                 at::TensorList master_params, c10::ArrayRef<int64_t> group_sizes,
                 c10::ArrayRef<double> lr, c10::ArrayRef<double> alpha,
                 c10::ArrayRef<double> eps, c10::ArrayRef<double> weight_decay,
                 c10::ArrayRef<double> momentum, bool centered, bool maximize,
                 c10::ArrayRef<double> l1_decay, const c10::List<bool>& l1_proximal,
                 const c10::List<std::optional<int64_t>>& stochastic_rounding_seed,
                 const HyperTensors& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf,
                 const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm,
                 const std::optional<at::Tensor>& workspace) {
  const StepArgs step{ParamGroups(kRmspropOp, group_sizes, params.size()), lr, l1_decay,
                      l1_proximal, stochastic_rounding_seed, lr_tensor,
                      {grad_scale, found_inf, grad_norm, max_grad_norm}, workspace};
  check_rmsprop_args(params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
                     master_params, step, alpha, eps, weight_decay, momentum, centered);

  const auto update_group = [&](const GroupRange& group, float grad_factor) {
    const size_t g = group.group;
    const math::RmspropHyper hyper{host_value(lr[g], lr_tensor.get(g)), alpha[g], eps[g],
                                   weight_decay[g], momentum[g], l1_decay[g]};
    with_bool(maximize, [&](auto kMaximize) {
      with_bool(weight_decay[g] != 0.0, [&](auto kWeightDecay) {
        with_bool(centered, [&](auto kCentered) {
          with_bool(momentum[g] > 0.0, [&](auto kMomentum) {
            with_constant<L1Mode::kNone, L1Mode::kSubgradient, L1Mode::kProximal>(
                step.l1_mode(g), [&](auto kL1) {
                  apply_elementwise<3>(
                      group.of(params), group.of(grads), group.masters_of(master_params),
                      {group.of(square_avgs), group.of(grad_avgs), group.of(momentum_buffers)},
                      grad_factor, GroupRounding(step, group, steps),
                      [&](auto opmath_tag, size_t, const auto& run) {
                        using T = decltype(opmath_tag);
                        run(math::RmspropElement<T, kMaximize, kWeightDecay, kCentered, kMomentum,
                                                 kL1>{math::rmsprop_tensor_scalars<T>(hyper)});
                      });
                });
          });
        });
      });
    });
  };
  for_each_group_step(step, params, master_params, steps, update_group);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CPU, m) { m.impl("rmsprop_", &rmsprop_cpu); }

}  // namespace fused_opt::cpu
