#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/adagrad.h"
#include "fused_opt/static_switch.h"

#include <utility>

namespace fused_opt::cuda {
namespace {

using math::L1Mode;

template <bool kMaximize, bool kWeightDecay, L1Mode kL1>
struct AdagradOp {
  using Group = AdagradGroup;
  static constexpr int kNumStates = 1;
  static constexpr bool kCountsSteps = true;

  template <typename T, typename Run>
  static __device__ void with_element(const Group& group, const TensorInfo& tensor,
                                      const Run& run) {
    math::AdagradHyper h = group.hyper;
    h.lr = value_or(group.lr, h.lr);
    run(math::AdagradElement<T, kMaximize, kWeightDecay, kL1>{
        math::adagrad_tensor_scalars<T>(h, tensor.step)});
  }
};

}  // namespace

void adagrad_step(const StepCall& call, const AdagradGroup* groups, bool maximize) {
  // L2 decay by zero adds 0 * param (NaN for an infinite param, +0 to a -0 gradient), so groups
  // without decay launch apart.
  const auto mode_of = [&](size_t g) {
    return std::pair{groups[g].hyper.weight_decay != 0.0, call.l1_modes[g]};
  };
  for_each_group_mode(call, mode_of, [&](const auto& mode, const auto& in_mode, LaunchPhase phase) {
    with_bool(maximize, [&](auto kMaximize) {
      with_bool(mode.first, [&](auto kWeightDecay) {
        with_constant<L1Mode::kNone, L1Mode::kSubgradient, L1Mode::kProximal>(
            mode.second, [&](auto kL1) {
              launch_multi_tensor<AdagradOp<kMaximize, kWeightDecay, kL1>>(call, groups, in_mode,
                                                                           phase);
            });
      });
    });
  });
}

}  // namespace fused_opt::cuda
