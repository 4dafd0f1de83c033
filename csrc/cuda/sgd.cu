#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/sgd.h"
#include "fused_opt/static_switch.h"

namespace fused_opt::cuda {
namespace {

using math::Momentum;

template <bool kMaximize, bool kWeightDecay, Momentum kMomentum>
struct SgdOp {
  static constexpr int kNumStates = kMomentum == Momentum::kNone ? 0 : 1;
  // With momentum, the counter says whether the buffer has been started.
  static constexpr bool kReadsStep = kMomentum != Momentum::kNone;

  math::SgdHyper hyper;
  DeviceScalar lr;

  template <typename T, typename Run>
  __device__ void with_element(const TensorInfo& tensor, const Run& run) const {
    math::SgdHyper h = hyper;
    h.lr = value_or(lr, hyper.lr);
    const auto scalars = math::sgd_tensor_scalars<T>(h);
    if constexpr (kMomentum == Momentum::kNone) {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, false>{scalars});
    } else if (math::sgd_first_step(*tensor.step)) {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, true>{scalars});
    } else {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, false>{scalars});
    }
  }
};

}  // namespace

void sgd_step(const StepCall& call, const math::SgdHyper& hyper, bool nesterov, bool maximize) {
  // Only the tensors of a call with momentum have counters; without, this launches nothing.
  increment_steps(call);
  const Momentum mode = math::sgd_momentum_mode(hyper.momentum, nesterov);
  with_bool(maximize, [&](auto kMaximize) {
    with_bool(hyper.weight_decay != 0.0, [&](auto kWeightDecay) {
      with_constant<Momentum::kNone, Momentum::kHeavyBall, Momentum::kNesterov>(
          mode, [&](auto kMode) {
            launch_multi_tensor(call, SgdOp<kMaximize, kWeightDecay, kMode>{hyper, call.lr});
          });
    });
  });
}

}  // namespace fused_opt::cuda
