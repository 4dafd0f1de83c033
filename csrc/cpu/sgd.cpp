#include <torch/library.h>

#include "cpu/multi_tensor.h"
#include "fused_opt/math/sgd.h"
#include "fused_opt/static_switch.h"
#include "fused_opt/validate.h"

namespace fused_opt::cpu {
namespace {

using math::Momentum;

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             const c10::List<bool>& is_first_step, double lr, double momentum, double dampening,
             double weight_decay, bool nesterov, bool maximize,
             const std::optional<at::Tensor>& lr_tensor) {
  check_sgd_args(params, grads, momentum_buffers, is_first_step, momentum, nesterov, lr_tensor);
  if (params.empty()) return;

  const math::SgdHyper hyper{effective_lr(lr, lr_tensor), momentum, dampening, weight_decay};
  const Momentum mode = math::sgd_momentum_mode(momentum, nesterov);
  with_bool(maximize, [&](auto kMaximize) {
    with_bool(weight_decay != 0.0, [&](auto kWeightDecay) {
      with_constant<Momentum::kNone, Momentum::kHeavyBall, Momentum::kNesterov>(
          mode, [&](auto kMode) {
            apply_elementwise<1>(
                params, grads, {momentum_buffers}, [&](auto opmath_tag, size_t t, const auto& run) {
                  using T = decltype(opmath_tag);
                  const auto scalars = math::sgd_tensor_scalars<T>(hyper);
                  if constexpr (kMode == Momentum::kNone) {
                    run(math::SgdElement<T, kMaximize, kWeightDecay, kMode, false>{scalars});
                  } else {
                    with_bool(is_first_step.get(t), [&](auto kFirstStep) {
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
