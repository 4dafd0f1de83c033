#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/sgd.h"
#include "fused_opt/static_switch.h"

namespace fused_opt::cuda {
namespace {

using math::Momentum;

template <bool kMaximize, bool kWeightDecay, Momentum kMomentum>
struct SgdOp {
  using Group = SgdGroup;
  static constexpr int kNumStates = kMomentum == Momentum::kNone ? 0 : 1;
  // With momentum, the counter says whether the buffer has been started.
  static constexpr bool kCountsSteps = kMomentum != Momentum::kNone;

  template <typename T, typename Run>
  static __device__ void with_element(const Group& group, const TensorInfo& tensor,
                                      const Run& run) {
    math::SgdHyper h = group.hyper;
    h.lr = value_or(group.lr, h.lr);
    const auto scalars = math::sgd_tensor_scalars<T>(h);
    if constexpr (kMomentum == Momentum::kNone) {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, false>{scalars});
    } else if (math::sgd_first_step(tensor.step)) {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, true>{scalars});
    } else {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, false>{scalars});
    }
  }
};

}  // namespace

void sgd_step(const StepCall& call, const SgdGroup* groups, bool nesterov, bool maximize) {
  if (call.group_count == 0) return;
  const Momentum mode = math::sgd_momentum_mode(groups[0].hyper.momentum, nesterov);
  // L2 decay by zero adds 0 * param (NaN for an infinite param, +0 to a -0 gradient), so groups
  // without decay launch apart.
  const auto decays = [&](size_t g) { return groups[g].hyper.weight_decay != 0.0; };
  for_each_group_mode(call, decays, [&](bool weight_decay, const auto& in_mode, LaunchPhase phase) {
    with_bool(maximize, [&](auto kMaximize) {
      with_bool(weight_decay, [&](auto kWeightDecay) {
        with_constant<Momentum::kNone, Momentum::kHeavyBall, Momentum::kNesterov>(
            mode, [&](auto kMode) {
              launch_multi_tensor<SgdOp<kMaximize, kWeightDecay, kMode>>(call, groups, in_mode,
                                                                         phase);
            });
      });
    });
  });
}

}  // namespace fused_opt::cuda
