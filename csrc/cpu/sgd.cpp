#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "fused_opt/math/sgd.h"
#include "fused_opt/static_switch.h"
#include "fused_opt/validate.h"

namespace fused_opt::cpu {
namespace {

using math::L1Mode;
using math::Momentum;

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             at::TensorList steps, at::TensorList master_params,
             c10::ArrayRef<int64_t> group_sizes, c10::ArrayRef<double> lr,
             c10::ArrayRef<double> momentum, c10::ArrayRef<double> dampening,
             c10::ArrayRef<double> weight_decay, bool nesterov, bool maximize,
             c10::ArrayRef<double> l1_decay, const c10::List<bool>& l1_proximal,
             const c10::List<std::optional<int64_t>>& stochastic_rounding_seed,
             const HyperTensors& lr_tensor, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf,
             const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm,
             const std::optional<at::Tensor>& workspace) {
  const StepArgs step{ParamGroups(kSgdOp, group_sizes, params.size()), lr, l1_decay,
                      l1_proximal, stochastic_rounding_seed, lr_tensor,
                      {grad_scale, found_inf, grad_norm, max_grad_norm}, workspace};
  check_sgd_args(params, grads, momentum_buffers, steps, master_params, step, momentum,
                 dampening, weight_decay, nesterov);

  const auto update_group = [&](const GroupRange& group, float grad_factor) {
    const size_t g = group.group;
    const math::SgdHyper hyper{host_value(lr[g], lr_tensor.get(g)), momentum[g], dampening[g],
                               weight_decay[g], l1_decay[g]};
    const at::TensorList group_steps = group.of(steps);
    const Momentum mode = math::sgd_momentum_mode(momentum[g], nesterov);
    with_bool(maximize, [&](auto kMaximize) {
      with_bool(weight_decay[g] != 0.0, [&](auto kWeightDecay) {
        with_constant<Momentum::kNone, Momentum::kHeavyBall, Momentum::kNesterov>(
            mode, [&](auto kMode) {
              with_constant<L1Mode::kNone, L1Mode::kSubgradient, L1Mode::kProximal>(
                  step.l1_mode(g), [&](auto kL1) {
                    apply_elementwise<1>(
                        group.of(params), group.of(grads), group.masters_of(master_params),
                        {group.of(momentum_buffers)}, grad_factor,
                        GroupRounding(step, group, steps),
                        [&](auto opmath_tag, size_t t, const auto& run) {
                          using T = decltype(opmath_tag);
                          const auto scalars = math::sgd_tensor_scalars<T>(hyper);
                          if constexpr (kMode == Momentum::kNone) {
                            run(math::SgdElement<T, kMaximize, kWeightDecay, kMode, false, kL1>{
                                scalars});
                          } else {
                            with_bool(math::sgd_first_step(step_value(group_steps[t])),
                                      [&](auto kFirstStep) {
                                        run(math::SgdElement<T, kMaximize, kWeightDecay, kMode,
                                                             kFirstStep, kL1>{scalars});
                                      });
                          }
                        });
                  });
            });
      });
    });
  };
  for_each_group_step(step, params, master_params, steps, update_group);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CPU, m) { m.impl("sgd_", &sgd_cpu); }

}  // namespace fused_opt::cpu
