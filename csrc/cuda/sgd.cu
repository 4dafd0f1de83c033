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
  static constexpr bool kReadsStep = false;

  math::SgdHyper hyper;
  DeviceScalar lr;

  template <typename T, typename Run>
  __device__ void with_element(const TensorInfo& tensor, const Run& run) const {
    math::SgdHyper h = hyper;
    h.lr = value_or(lr, hyper.lr);
    const auto scalars = math::sgd_tensor_scalars<T>(h);
    if constexpr (kMomentum == Momentum::kNone) {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, false>{scalars});
    } else if (tensor.first_step) {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, true>{scalars});
    } else {
      run(math::SgdElement<T, kMaximize, kWeightDecay, kMomentum, false>{scalars});
    }
  }
};

}  // namespace

void sgd_step(const TensorArgs* tensors, size_t count, const math::SgdHyper& hyper, DeviceScalar lr,
              bool nesterov, bool maximize, void* stream) {
  const Momentum mode = math::sgd_momentum_mode(hyper.momentum, nesterov);
  with_bool(maximize, [&](auto kMaximize) {
    with_bool(hyper.weight_decay != 0.0, [&](auto kWeightDecay) {
      with_constant<Momentum::kNone, Momentum::kHeavyBall, Momentum::kNesterov>(
          mode, [&](auto kMode) {
            launch_multi_tensor(tensors, count, SgdOp<kMaximize, kWeightDecay, kMode>{hyper, lr},
                                static_cast<cudaStream_t>(stream));
          });
    });
  });
}

}  // namespace fused_opt::cuda
