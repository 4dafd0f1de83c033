#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/adam.h"
#include "fused_opt/static_switch.h"

namespace fused_opt::cuda {
namespace {

using math::WeightDecay;

template <bool kAmsgrad, bool kMaximize, WeightDecay kWeightDecay>
struct AdamOp {
  static constexpr int kNumStates = kAmsgrad ? 3 : 2;
  static constexpr bool kReadsStep = true;

  math::AdamHyper hyper;
  DeviceScalar lr, beta1, beta2;

  template <typename T, typename Run>
  __device__ void with_element(const TensorInfo& tensor, const Run& run) const {
    math::AdamHyper h = hyper;
    h.lr = value_or(lr, hyper.lr);
    h.beta1 = value_or(beta1, hyper.beta1);
    h.beta2 = value_or(beta2, hyper.beta2);
    run(math::AdamElement<T, kAmsgrad, kMaximize, kWeightDecay>{
        math::adam_tensor_scalars<T>(h, *tensor.step)});
  }
};

}  // namespace

void adam_step(const StepCall& call, const math::AdamHyper& hyper, DeviceScalar beta1,
               DeviceScalar beta2, bool amsgrad, bool maximize, bool decoupled_weight_decay) {
  increment_steps(call);
  const WeightDecay mode =
      math::adam_weight_decay_mode(hyper.weight_decay, decoupled_weight_decay);
  with_bool(amsgrad, [&](auto kAmsgrad) {
    with_bool(maximize, [&](auto kMaximize) {
      with_constant<WeightDecay::kNone, WeightDecay::kL2, WeightDecay::kDecoupled>(
          mode, [&](auto kMode) {
            launch_multi_tensor(call, AdamOp<kAmsgrad, kMaximize, kMode>{hyper, call.lr, beta1, beta2});
          });
    });
  });
}

}  // namespace fused_opt::cuda
