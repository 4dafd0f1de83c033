#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/sgd.h"
#include "fused_opt/static_switch.h"

#include <utility>

namespace fused_opt::cuda {
namespace {

using math::L1Mode;
using math::Momentum;

// kStepCounters: the tensors have step counters, which they have with momentum (the counter
// says whether the buffer has been started) or with stochastic rounding (which hashes the step).
template <bool kMaximize, bool kWeightDecay, Momentum kMomentum, L1Mode kL1, bool kStepCounters>
struct SgdOp {
  using Group = SgdGroup;
  static constexpr int kNumStates = kMomentum == Momentum::kNone ? 0 : 1;
  static constexpr bool kCountsSteps = kStepCounters;

  template <typename T, typename Run>
  static __device__ void with_element(const Group& group, const TensorInfo& tensor,
                                      const Run& run) {
    math::SgdHyper h = group.hyper;
    h.lr = value_or(group.lr, h.lr);
    const auto scalars = math::sgd_tensor_scalars<T>(h);
    if constexpr (kMomentum == Momentum::kNone) {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, false, kL1>{scalars});
    } else if (math::sgd_first_step(tensor.step)) {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, true, kL1>{scalars});
    } else {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, false, kL1>{scalars});
    }
  }
};

}  // namespace

void sgd_step(const StepCall& call, const SgdGroup* groups, bool nesterov, bool maximize) {
  if (call.group_count == 0) return;
  const Momentum mode = math::sgd_momentum_mode(groups[0].hyper.momentum, nesterov);
  const bool step_counters = call.count > 0 && call.tensors[0].step != nullptr;
  // L2 decay by zero adds 0 * param (NaN for an infinite param, +0 to a -0 gradient), so groups
  // without decay launch apart.
  const auto mode_of = [&](size_t g) {
    return std::pair{groups[g].hyper.weight_decay != 0.0, call.l1_modes[g]};
  };
  for_each_group_mode(call, mode_of, [&](const auto& group_mode, const auto& in_mode,
                                         LaunchPhase phase) {
    with_bool(maximize, [&](auto kMaximize) {
      with_bool(group_mode.first, [&](auto kWeightDecay) {
        with_constant<Momentum::kNone, Momentum::kHeavyBall, Momentum::kNesterov>(
            mode, [&](auto kMode) {
              with_constant<L1Mode::kNone, L1Mode::kSubgradient, L1Mode::kProximal>(
                  group_mode.second, [&](auto kL1) {
                    with_bool(step_counters, [&](auto kStepCounters) {
                      // Momentum always comes with counters (validate.cpp).
                      if constexpr (kMode == Momentum::kNone || kStepCounters) {
                        launch_multi_tensor<SgdOp<kMaximize, kWeightDecay, kMode, kL1,
                                                  kStepCounters>>(call, groups, in_mode, phase);
                      }
                    });
                  });
            });
      });
    });
  });
}

}  // namespace fused_opt::cuda
