#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/rmsprop.h"
#include "fused_opt/static_switch.h"

namespace fused_opt::cuda {
namespace {

template <bool kMaximize, bool kWeightDecay, bool kCentered, bool kMomentum>
struct RmspropOp {
  static constexpr int kNumStates = 1 + (kCentered ? 1 : 0) + (kMomentum ? 1 : 0);
  static constexpr bool kReadsStep = false;

  math::RmspropHyper hyper;
  DeviceScalar lr;

  template <typename T, typename Run>
  __device__ void with_element(const TensorInfo&, const Run& run) const {
    math::RmspropHyper h = hyper;
    h.lr = value_or(lr, hyper.lr);
    run(math::RmspropElement<T, kMaximize, kWeightDecay, kCentered, kMomentum>{
        math::rmsprop_tensor_scalars<T>(h)});
  }
};

}  // namespace

void rmsprop_step(const StepCall& call, const math::RmspropHyper& hyper, bool centered,
                  bool maximize) {
  // The update never reads the counter; torch.optim.RMSprop keeps it, and so does the state.
  increment_steps(call);
  with_bool(maximize, [&](auto kMaximize) {
    with_bool(hyper.weight_decay != 0.0, [&](auto kWeightDecay) {
      with_bool(centered, [&](auto kCentered) {
        with_bool(hyper.momentum > 0.0, [&](auto kMomentum) {
          launch_multi_tensor(
              call, RmspropOp<kMaximize, kWeightDecay, kCentered, kMomentum>{hyper, call.lr});
        });
      });
    });
  });
}

}  // namespace fused_opt::cuda
