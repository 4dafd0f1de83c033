// The boundary between the torch glue (ops_cuda.cpp, compiled by the C++ compiler against torch)
// and the kernels (*.cu, compiled by nvcc without torch): plain pointers and the math headers'
// hyperparameter structs only, so each side builds without the other's headers. Streams travel as
// void* (a cudaStream_t) for the same reason.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fused_opt/math/adagrad.h"
#include "fused_opt/math/adam.h"
#include "fused_opt/math/rmsprop.h"
#include "fused_opt/math/sgd.h"

namespace fused_opt::cuda {

// Storage dtype of one param and all of its tensors (the validation makes them agree).
enum class DType : uint8_t { kFloat32, kFloat64, kFloat16, kBFloat16 };

constexpr int kMaxStates = 3;

// One param's tensors. All of them cover the same numel elements in the same flat order; states
// beyond the optimizer's count are ignored; step is null for optimizers without a counter.
struct TensorArgs {
  void* param;
  const void* grad;
  void* states[kMaxStates];
  float* step;
  int64_t numel;
  DType dtype;
  bool first_step;  // SGD: the momentum buffer has never been written
};

// A one-element tensor the kernels read on the device when ptr is set, so that a value changed
// in place (a scheduler's tensor lr) reaches graph replays; when ptr is null the host value holds.
struct DeviceScalar {
  const void* ptr;
  DType dtype;
};

// Each call updates every tensor of the list in place on `stream`, without synchronizing with the
// host and without allocating memory. Modes that select a compiled kernel are explicit arguments;
// the rest (weight decay on or off, momentum on or off) follow from the hyperparameters as in the
// CPU kernels. Failures to launch throw std::runtime_error.
void adam_step(const TensorArgs* tensors, size_t count, const math::AdamHyper& hyper,
               DeviceScalar lr, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               void* stream);

void sgd_step(const TensorArgs* tensors, size_t count, const math::SgdHyper& hyper, DeviceScalar lr,
              bool nesterov, bool maximize, void* stream);

void rmsprop_step(const TensorArgs* tensors, size_t count, const math::RmspropHyper& hyper,
                  DeviceScalar lr, bool centered, bool maximize, void* stream);

void adagrad_step(const TensorArgs* tensors, size_t count, const math::AdagradHyper& hyper,
                  DeviceScalar lr, bool maximize, void* stream);

}  // namespace fused_opt::cuda
