#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/adam.h"
#include "fused_opt/static_switch.h"

#include <utility>

namespace fused_opt::cuda {
namespace {

using math::L1Mode;
using math::WeightDecay;

template <bool kAmsgrad, bool kMaximize, WeightDecay kWeightDecay, L1Mode kL1>
struct AdamOp {
  using Group = AdamGroup;
  static constexpr int kNumStates = kAmsgrad ? 3 : 2;
  static constexpr bool kCountsSteps = true;

  template <typename T, typename Run>
  static __device__ void with_element(const Group& group, const TensorInfo& tensor,
                                      const Run& run) {
    math::AdamHyper h = group.hyper;
    h.lr = value_or(group.lr, h.lr);
    h.beta1 = value_or(group.beta1, h.beta1);
    h.beta2 = value_or(group.beta2, h.beta2);
    run(math::AdamElement<T, kAmsgrad, kMaximize, kWeightDecay, kL1>{
        math::adam_tensor_scalars<T>(h, tensor.step)});
  }
};

}  // namespace

void adam_step(const StepCall& call, const AdamGroup* groups, bool amsgrad, bool maximize,
               bool decoupled_weight_decay) {
  // Decoupled decay by zero multiplies the param by exactly one, so AdamW's groups with and
  // without decay share a launch; L2 decay by zero adds 0 * param (NaN for an infinite param,
  // +0 to a -0 gradient), so L2 groups without decay launch apart.
  bool any_decay = false;
  for (size_t g = 0; g < call.group_count; ++g) any_decay |= groups[g].hyper.weight_decay != 0.0;
  const auto mode_of = [&](size_t g) {
    const WeightDecay decay =
        decoupled_weight_decay ? (any_decay ? WeightDecay::kDecoupled : WeightDecay::kNone)
                               : math::adam_weight_decay_mode(groups[g].hyper.weight_decay, false);
    return std::pair{decay, call.l1_modes[g]};
  };
  for_each_group_mode(call, mode_of, [&](const auto& mode, const auto& in_mode, LaunchPhase phase) {
    with_bool(amsgrad, [&](auto kAmsgrad) {
      with_bool(maximize, [&](auto kMaximize) {
        with_constant<WeightDecay::kNone, WeightDecay::kL2, WeightDecay::kDecoupled>(
            mode.first, [&](auto kMode) {
              with_constant<L1Mode::kNone, L1Mode::kSubgradient, L1Mode::kProximal>(
                  mode.second, [&](auto kL1) {
                    launch_multi_tensor<AdamOp<kAmsgrad, kMaximize, kMode, kL1>>(call, groups,
                                                                                in_mode, phase);
                  });
            });
      });
    });
  });
}

}  // namespace fused_opt::cuda
