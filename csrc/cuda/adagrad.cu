#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/adagrad.h"
#include "fused_opt/static_switch.h"

namespace fused_opt::cuda {
namespace {

template <bool kMaximize, bool kWeightDecay>
struct AdagradOp {
  static constexpr int kNumStates = 1;
  static constexpr bool kReadsStep = true;

  math::AdagradHyper hyper;
  DeviceScalar lr;

  template <typename T, typename Run>
  __device__ void with_element(const TensorInfo& tensor, const Run& run) const {
    math::AdagradHyper h = hyper;
    h.lr = value_or(lr, hyper.lr);
    run(math::AdagradElement<T, kMaximize, kWeightDecay>{
        math::adagrad_tensor_scalars<T>(h, *tensor.step)});
  }
};

}  // namespace

void adagrad_step(const StepCall& call, const math::AdagradHyper& hyper, bool maximize) {
  increment_steps(call);
  with_bool(maximize, [&](auto kMaximize) {
    with_bool(hyper.weight_decay != 0.0, [&](auto kWeightDecay) {
      launch_multi_tensor(call, AdagradOp<kMaximize, kWeightDecay>{hyper, call.lr});
    });
  });
}

}  // namespace fused_opt::cuda
