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

void adagrad_step(const TensorArgs* tensors, size_t count, const math::AdagradHyper& hyper,
                  DeviceScalar lr, bool maximize, void* stream) {
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  increment_steps(tensors, count, cuda_stream);
  with_bool(maximize, [&](auto kMaximize) {
    with_bool(hyper.weight_decay != 0.0, [&](auto kWeightDecay) {
      launch_multi_tensor(tensors, count, AdagradOp<kMaximize, kWeightDecay>{hyper, lr},
                          cuda_stream);
    });
  });
}

}  // namespace fused_opt::cuda
