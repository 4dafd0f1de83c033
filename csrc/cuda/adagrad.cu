#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/adagrad.h"
#include "fused_opt/static_switch.h"

namespace fused_opt::cuda {
namespace {

template <bool kMaximize, bool kWeightDecay>
struct AdagradOp {
  using Group = AdagradGroup;
  static constexpr int kNumStates = 1;
  static constexpr bool kCountsSteps = true;

  template <typename T, typename Run>
  static __device__ void with_element(const Group& group, const TensorInfo& tensor,
                                      const Run& run) {
    math::AdagradHyper h = group.hyper;
    h.lr = value_or(group.lr, h.lr);
    run(math::AdagradElement<T, kMaximize, kWeightDecay>{
        math::adagrad_tensor_scalars<T>(h, tensor.step)});
  }
};

}  // namespace

void adagrad_step(const StepCall& call, const AdagradGroup* groups, bool maximize) {
  // L2 decay by zero adds 0 * param (NaN for an infinite param, +0 to a -0 gradient), so groups
  // without decay launch apart.
  const auto decays = [&](size_t g) { return groups[g].hyper.weight_decay != 0.0; };
  for_each_group_mode(call, decays, [&](bool weight_decay, const auto& in_mode, LaunchPhase phase) {
    with_bool(maximize, [&](auto kMaximize) {
      with_bool(weight_decay, [&](auto kWeightDecay) {
        launch_multi_tensor<AdagradOp<kMaximize, kWeightDecay>>(call, groups, in_mode, phase);
      });
    });
  });
}

}  // namespace fused_opt::cuda
