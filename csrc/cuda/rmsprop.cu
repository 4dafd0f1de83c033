#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/rmsprop.h"
#include "fused_opt/static_switch.h"

#include <utility>

namespace fused_opt::cuda {
namespace {

using math::L1Mode;

template <bool kMaximize, bool kWeightDecay, bool kCentered, bool kMomentum, L1Mode kL1>
struct RmspropOp {
  using Group = RmspropGroup;
  static constexpr int kNumStates = 1 + (kCentered ? 1 : 0) + (kMomentum ? 1 : 0);
  // The update never reads the counter; torch.optim.RMSprop keeps it, and so does the state.
  static constexpr bool kCountsSteps = true;

  template <typename T, typename Run>
  static __device__ void with_element(const Group& group, const TensorInfo&, const Run& run) {
    math::RmspropHyper h = group.hyper;
    h.lr = value_or(group.lr, h.lr);
    run(math::RmspropElement<T, kMaximize, kWeightDecay, kCentered, kMomentum, kL1>{
        math::rmsprop_tensor_scalars<T>(h)});
  }
};

}  // namespace

void rmsprop_step(const StepCall& call, const RmspropGroup* groups, bool centered,
                  bool maximize) {
  if (call.group_count == 0) return;
  const bool momentum = groups[0].hyper.momentum > 0.0;
  // L2 decay by zero adds 0 * param (NaN for an infinite param, +0 to a -0 gradient), so groups
  // without decay launch apart.
  const auto mode_of = [&](size_t g) {
    return std::pair{groups[g].hyper.weight_decay != 0.0, call.l1_modes[g]};
  };
  for_each_group_mode(call, mode_of, [&](const auto& mode, const auto& in_mode, LaunchPhase phase) {
    with_bool(maximize, [&](auto kMaximize) {
      with_bool(mode.first, [&](auto kWeightDecay) {
        with_bool(centered, [&](auto kCentered) {
          with_bool(momentum, [&](auto kMomentum) {
            with_constant<L1Mode::kNone, L1Mode::kSubgradient, L1Mode::kProximal>(
                mode.second, [&](auto kL1) {
                  launch_multi_tensor<
                      RmspropOp<kMaximize, kWeightDecay, kCentered, kMomentum, kL1>>(
                      call, groups, in_mode, phase);
                });
          });
        });
      });
    });
  });
}

}  // namespace fused_opt::cuda
